"""L2-SP: the plain "stay close to the initial weights" penalty, ``Σ_t ‖W_t − W0_t‖_F²``.

The obvious alternative to the sliced-Wasserstein regularizer (Xuhong et al., 2018, "L2-SP"), on
the same tensors, with the same call, state and ``normalize`` option, so an experiment swaps one
for the other (``--reg-kind l2sp``). Where SWD lets the rows of a tensor move as a set (any
permutation of the rows costs nothing), L2-SP pins every element to its initial value.

A plain parameter keeps a float32 copy of W0. A LoRA layer needs none: with ΔW = s·U V,
``‖ΔW‖_F² = s² · tr((UᵀU)(V Vᵀ))``, two r×r Grams, O((n + d)·r²) and never n×d.
"""

from __future__ import annotations

import torch

from .terms import ParamFilter, RegularizedTerm, select_terms

__all__ = ["L2SPRegularizer"]


class L2SPRegularizer:
    """``Σ_t ‖W_t − W0_t‖_F²`` over the trainable tensors of ``model`` (or those a filter keeps).

    Args:
        model: the model; its parameters are read at construction (the snapshot) and at every call.
        param_filter: ``f(name, param) -> bool`` choosing among trainable parameters (default: all).
            Tied parameters are counted once; LoRA layers are regularized through their factors.
        normalize: divide each tensor's term by ``‖W0_t‖_F²`` (a relative squared distance, the
            same for W0 and W scaled together), like the SWD regularizer's ``normalize``.

    Calling the object returns a float32 0-dim tensor with autograd.
    """

    def __init__(self, model: torch.nn.Module, *, param_filter: ParamFilter | None = None, normalize: bool = False):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
        self.normalize = normalize
        self.terms: list[RegularizedTerm] = select_terms(
            model, param_filter, plain=lambda name, param: RegularizedTerm(name, param, torch.float32))
        with torch.no_grad():
            norms = [t.factors.base.double().square().sum() if hasattr(t, "factors") else t.initial.double().square().sum()
                     for t in self.terms]
        # 1 / ‖W0‖² per tensor (1 without normalize, or for an all-zero W0: nothing to scale by)
        self._weights = [1.0 if not normalize or float(n) == 0 else 1.0 / float(n) for n in norms]

    @property
    def parameter_names(self) -> list[str]:
        return [t.name for t in self.terms]

    def __call__(self) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=self.terms[0].device)
        for term, weight in zip(self.terms, self._weights):
            total = total + weight * _squared_distance(term)
        return total

    def cache_nbytes(self) -> int:
        return sum(t.nbytes_kept() for t in self.terms)

    def state_dict(self, include_initial: bool = True) -> dict:
        """The kept copies of W0 (LoRA layers keep none: their base is the initial weight)."""
        state: dict = {"kind": "l2sp", "names": self.parameter_names, "normalize": self.normalize,
                       "weights": list(self._weights)}
        if include_initial:
            state["initial"] = [t.initial for t in self.terms]
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "l2sp":
            raise ValueError(f"state is for a {state.get('kind', 'sliced-Wasserstein')!r} regularizer, not L2-SP")
        if list(state.get("names", [])) != self.parameter_names or state.get("normalize") != self.normalize:
            raise ValueError("state is for other parameters or another normalize setting")
        self._weights = list(state["weights"])
        for term, w0 in zip(self.terms, state.get("initial") or []):
            if w0 is not None:
                term.initial = w0.to(term.device)


def _squared_distance(term: RegularizedTerm) -> torch.Tensor:
    """‖W − W0‖_F² of one term, float32, with autograd to its trainable tensors."""
    if hasattr(term, "factors"):  # LoRA: s² tr((UᵀU)(V Vᵀ)), never the n×d ΔW
        u, v = (x.float() for x in term.factors.uv())
        return term.factors.scaling ** 2 * ((u.t() @ u) * (v @ v.t())).sum()
    diff = term.param.float().reshape(term.initial.shape) - term.initial
    return diff.square().sum()
