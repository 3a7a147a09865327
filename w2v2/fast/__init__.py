"""The fast path: faster forwards for the parts of ``w2v2/modules.py``, computing the same functions.

:func:`install` (which :func:`w2v2.build_model`, and so every loader, calls) swaps each part's
class for its fast subclass in :mod:`w2v2.fast.layers`, the way ``torch.ao.quantization`` swaps
modules, but keeping every parameter: names, shapes, dtypes and state dicts are unchanged. Each
fast forward decides per call whether it applies (:func:`~w2v2.fast.state.compute_dtype`) and
otherwise runs the plain forward.

What it does, by precision and platform:

* everywhere: the restructured feature encoder, fused projections, attention by the faster kernel
  for the CPU, and in bfloat16 weights cast once and cached (:func:`clear_cache` frees them);
* on x86 CPUs: oneDNN products and convolutions (:mod:`w2v2.fast.onednn`), with training kernels
  for their backward passes (:mod:`w2v2.fast.training`); each private operator is probed once and
  replaced by its public counterpart when missing or changed;
* never under ``torch.compile`` (its compiler fuses the plain ops itself) or fp16 autocast.

The switch: ``W2V2_FAST=0`` in the environment, or :func:`set_enabled` / :func:`disabled` at run
time, and every model runs the plain forwards. tests/test_fast_paths.py checks both paths agree,
outputs and gradients, within the rounding error of the compute precision.
"""

from .layers import install
from .state import clear_cache, compute_dtype, disabled, enabled, set_enabled

__all__ = ["clear_cache", "compute_dtype", "disabled", "enabled", "install", "set_enabled"]
