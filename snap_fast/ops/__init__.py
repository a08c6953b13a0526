"""Stateless ops with several backends, chosen in one place (:mod:`.backends`).

* :mod:`.swd` — the sliced-Wasserstein distance: naive oracle, layout, autograd entry points, the
  C++/CUDA extension's Python face.
* :mod:`.lora_stats` — statistics of LoRA updates from their factors.
"""
