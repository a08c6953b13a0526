"""The sliced-Wasserstein distance of SNAP.md §2, one tensor pair or a flat buffer of segments.

* :mod:`.naive` — the float64-capable oracle (``torch.sort`` with autograd) and direction draws.
* :mod:`.layout` — how many 1-D sorting problems share one flat buffer.
* :mod:`.function` — :func:`sliced_wasserstein` and :func:`swd_from_projections`, with autograd,
  running on the backend :mod:`snap_fast.ops.backends` chooses.
* :mod:`.cpp` — the compiled extension of ``csrc/`` (CPU sorts, CUDA segmented sort).

The Triton kernels are in ``snap_fast.kernels`` (the top-level ``kernels/`` folder). Nothing is
imported here, so the backend registry and these modules import each other's parts without a
cycle; the public names are re-exported by ``snap_fast``.
"""
