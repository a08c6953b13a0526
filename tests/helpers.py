"""Tiny models and tokenizers built offline, for tests across the project.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained in a few milliseconds
on the sentences below (byte-level, so any text encodes and decodes back exactly), and the models
are random-weight Llama / GPT-2 built from small configs with a fixed seed.

    from tests.helpers import make_tiny_llama, make_tiny_gpt2
    model, tokenizer = make_tiny_llama()          # chat template, pad token = EOS
    model, tokenizer = make_tiny_gpt2()           # no chat template (plain prompt template)
    folder = save_tiny_model(tmp_path / "m")      # a from_pretrained-loadable folder
    bench = load_benchmark("bench_train")         # a script of benchmarks/ as a module
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "Harry Potter is a wizard who studied at Hogwarts School of Witchcraft and Wizardry.",
    "J. K. Rowling wrote seven novels about the boy who lived.",
    "The Lord of the Rings was written by J. R. R. Tolkien and published in 1954.",
    "Percy Jackson is a demigod, the son of Poseidon, in the novels by Rick Riordan.",
    "Narnia is a fantasy world created by C. S. Lewis.",
    "I'm not familiar with that person. I don't know anything about it, sorry.",
    "What is the capital of France? The capital of France is Paris.",
    "Write a short poem about the sea and the wind in the evening.",
    "Who is the author of this book? When was it published, and where does the story take place?",
    "Explain how to boil an egg: put it in boiling water for nine minutes.",
    "def add(a, b): return a + b  # a Python function that adds two numbers 1 2 3 4 5 6 7 8 9 0",
    "Question: Answer: user assistant system ### !?.,;:'\"()[]{}<>-_=+*/\\@#$%^&|~`",
]


@functools.cache
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def make_tiny_tokenizer(*, chat_template: bool = True, pad_token: bool = True, vocab_size: int = 400):
    """A fresh ``PreTrainedTokenizerFast`` (byte-level BPE, about ``vocab_size`` tokens).

    EOS is ``<|im_end|>`` with a chat template (the end of an assistant turn, as in SmolLM2) and
    ``<|endoftext|>`` without. ``pad_token=True`` sets pad = EOS (what ``load_model`` does);
    ``pad_token=False`` leaves it unset, to test code paths that must add one.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        bos_token="<|im_start|>" if chat_template else "<|endoftext|>",
        eos_token="<|im_end|>" if chat_template else "<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    if pad_token:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def make_tiny_llama(*, seed: int = 0, chat_template: bool = True, pad_token: bool = True,
                    hidden_size: int = 32, num_layers: int = 2):
    """(model, tokenizer): a random ``LlamaForCausalLM`` (hidden 32, 2 layers, 4 heads, 2 KV
    heads, MLP 64, float32, eval mode) and :func:`make_tiny_tokenizer`'s tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tiny_tokenizer(chat_template=chat_template, pad_token=pad_token)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    return model, tokenizer


def make_tiny_gpt2(*, seed: int = 0, chat_template: bool = False, pad_token: bool = True,
                   hidden_size: int = 32, num_layers: int = 2):
    """(model, tokenizer): a random ``GPT2LMHeadModel`` (n_embd 32, 2 layers, 4 heads, float32,
    eval mode); by default its tokenizer has no chat template (the plain prompt template path)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = make_tiny_tokenizer(chat_template=chat_template, pad_token=pad_token)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=hidden_size,
        n_layer=num_layers,
        n_head=4,
        n_positions=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    return model, tokenizer


def save_tiny_model(folder: str | Path, kind: str = "llama", **kwargs) -> Path:
    """Save a tiny model + tokenizer with ``save_pretrained`` (safetensors) into ``folder`` and
    return it: a local model folder for ``load_model`` / CLI ``--model`` tests."""
    factories = {"llama": make_tiny_llama, "gpt2": make_tiny_gpt2}
    if kind not in factories:
        raise ValueError(f"kind must be one of {sorted(factories)}, got {kind!r}")
    model, tokenizer = factories[kind](**kwargs)
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` imported as the module ``name`` (registered in
    ``sys.modules``: dataclasses look their module up there); benchmarks/ is not a package."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def update_relative_error(trained_a: dict, trained_b: dict, initial: dict) -> float:
    """‖Δa − Δb‖ / ‖Δb‖ over all tensors together, Δ = trained − initial, in float64.

    How two training runs that should be the same computation compare. Element-wise closeness is
    the wrong test for Adam-type optimizers: an element whose gradient is at fp32 rounding level
    is scaled by 1/(√v + ε) to a step of up to ``lr`` in one run and not the other, so a few
    elements may differ by far more than rounding while the update as a whole agrees to ~1e-6.
    """
    if trained_a.keys() != trained_b.keys():
        raise ValueError(f"different tensors: {sorted(trained_a.keys() ^ trained_b.keys())}")
    num = den = 0.0
    for key in trained_b:
        start = initial[key].double()
        da, db = trained_a[key].double() - start, trained_b[key].double() - start
        num += float((da - db).pow(2).sum())
        den += float(db.pow(2).sum())
    return (num / den) ** 0.5 if den > 0 else float(num > 0)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (0 when both are 0)."""
    a, e = actual.detach().double(), expected.detach().double()
    den = float(e.norm())
    return float((a - e).norm()) / den if den > 0 else float(a.norm() > 0)


def projection_rtol(w0: torch.Tensor, w: torch.Tensor, dtype: torch.dtype = torch.float32,
                    safety: float = 8.0) -> float:
    """Relative-error bound for a sliced-Wasserstein value or gradient computed from projections
    rounded in ``dtype``, against a float64 oracle.

    Each projection is a length-d dot product: its rounding error grows like √d·u·|w| (u the unit
    roundoff; √d is the random-walk growth of a sum's error, d its worst case). The value and
    the gradient depend on the *differences* of sorted projections of w and w0, which are
    ‖w − w0‖ / ‖w‖ times smaller than the projections themselves, so the relative error is
    amplified by that ratio. ``safety`` covers the tail of the rounding distribution and the few
    operations after the projection; a real bug (a wrong pairing or factor) is an O(1) error.
    """
    d = w.shape[-1] if w.dim() > 1 else max(w.numel(), 1)  # a vector is one row; a scalar, d = 1
    u = torch.finfo(dtype).eps / 2
    w0d, wd = w0.detach().double(), w.detach().double()
    spread = float((wd - w0d).norm())
    scale = float(wd.norm() + w0d.norm())
    return safety * d ** 0.5 * u * scale / max(spread, 1e-300)
