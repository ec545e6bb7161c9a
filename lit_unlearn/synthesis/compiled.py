"""Compiled synthesis: one fused kernel per pass over a rule's whole list of tensors.

An element-wise rule is one pass over memory (read ``g_f`` and ``g_r``, write ``u``); a rule with
statistics is two (read both gradients for the partial sums, then the combination). In eager
PyTorch every arithmetic operation of :meth:`Synthesizer.combine` is its own pass, so SAGO costs
about twice the one-pass floor. Here ``torch.compile`` traces the rule's own ``terms`` and
``combine`` over the list of tensors once per process and inductor fuses each pass into one
kernel per tensor (C++ with OpenMP on CPU, Triton on GPU: the same code is the GPU kernel).

The reducer (an all-reduce under FSDP) stays outside the compiled code, between the two passes.
Set ``LIT_UNLEARN_COMPILE=0`` to run eagerly; if compilation fails (no C++ compiler, an operation
inductor cannot lower), the rule warns once and runs eagerly for the rest of the process. Results
equal the eager path up to float rounding (the sums are accumulated in another order, and an
``a·x + b·y`` may become one fused multiply-add).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

ENV = "LIT_UNLEARN_COMPILE"
RECOMPILE_LIMIT = 64
"""Compiled variants kept per traced function: one per (rule, tensor shapes, aliasing) seen in a
process. Dynamo's default (8) is shared by every rule instance, which a process comparing rules
(a benchmark, a test session) would exhaust."""


def compile_requested() -> bool:
    """Whether ``LIT_UNLEARN_COMPILE`` allows compiled synthesis (default: yes)."""
    return os.environ.get(ENV, "1").strip().lower() not in {"0", "false", "no", "off"}


def _raise_recompile_limit() -> None:
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name) and getattr(dynamo_config, name) < RECOMPILE_LIMIT:
            setattr(dynamo_config, name, RECOMPILE_LIMIT)


def _partial_sums(rule: Any, forget: list[Tensor], retain: list[Tensor]) -> Tensor:
    return rule.partial_sums(forget, retain)


def _combine_all(
    rule: Any, forget: list[Tensor], retain: list[Tensor], out: list[Tensor], state: Any
) -> None:
    for j, (f, r, o) in enumerate(zip(forget, retain, out)):
        stats = rule.tensor_statistics(state, j)
        o.copy_(rule.combine(f, r) if stats is None else rule.combine(f, r, stats))


class CompiledPasses:
    """The compiled passes of one rule instance.

    Args:
        rule: the :class:`~lit_unlearn.synthesis.Synthesizer` whose ``terms`` and ``combine`` are
            compiled.
    """

    def __init__(self, rule: Any) -> None:
        _raise_recompile_limit()
        self.rule = rule
        self.compile_seconds = 0.0
        """Wall time of each pass's first call in this process (compilation plus one run)."""
        self.error: str | None = None
        self._seen: set[str] = set()
        self._sums = torch.compile(_partial_sums, dynamic=False, fullgraph=True)
        self._combine = torch.compile(_combine_all, dynamic=False, fullgraph=True)

    def _timed(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        if name in self._seen:
            return fn(self.rule, *args)
        start = time.perf_counter()
        result = fn(self.rule, *args)
        self._seen.add(name)
        self.compile_seconds += time.perf_counter() - start
        return result

    def partial_sums(self, forget: list[Tensor], retain: list[Tensor]) -> Tensor:
        """The rule's per-tensor (or global) float32 partial sums, before the reducer."""
        return self._timed("sums", self._sums, forget, retain)

    def combine(self, forget: list[Tensor], retain: list[Tensor], out: list[Tensor], state: Any) -> None:
        """Write every tensor's update into ``out`` (which may alias ``forget`` or ``retain``)."""
        self._timed("combine", self._combine, forget, retain, out, state)

    def disable(self, error: BaseException) -> None:
        """Record why compilation failed and warn once; the rule runs eagerly from now on."""
        self.error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        warnings.warn(
            f"{type(self.rule).__name__}: compiled synthesis is unavailable ({self.error}); running the "
            f"eager kernels (set {ENV}=0 to skip the attempt)",
            RuntimeWarning,
            stacklevel=3,
        )
