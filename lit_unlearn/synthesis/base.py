"""The synthesizer contract: validate, gather cross-tensor statistics, combine (compiled or chunked).

A synthesizer turns the forget gradient ``g_f`` and the retain gradient ``g_r`` (one tensor per
trainable parameter) into the update ``u`` handed to the optimizer (docs/method.md). A new rule
writes one method, plain tensor arithmetic::

    class Halfway(Synthesizer):
        granularity = "element"
        def combine(self, forget, retain, stats=None):
            return 0.5 * (self.forget_weight * forget + self.retain_weight * retain)

and the base class does the rest: checks the inputs, runs :meth:`Synthesizer.combine` on flat
chunks of each tensor (bounded extra memory, any mix of storage dtypes) and writes the result
into the caller's storage (``out=``, which may alias an input: the engine writes into ``.grad``).
Rules that need sums across coordinates implement :meth:`Synthesizer.terms` (a tensor's float32
partial sums: per-tensor dot products for PCGrad) and :meth:`Synthesizer.summarize` (from the
totals to the coefficients); the base class stacks the terms of every tensor and sends them
through the injected ``reducer`` in one call, so a sharded strategy can all-reduce them.
:meth:`Synthesizer.tensor_statistics` hands each tensor its share, which ``combine`` receives as
``stats``.

Two execution paths compute the same update. By default the rule's own ``terms`` and ``combine``
are compiled with ``torch.compile`` over the whole list of tensors, once per process: one fused
kernel per tensor and pass, about one memory pass for an element-wise rule and two for a
projection (:mod:`lit_unlearn.synthesis.compiled`). With ``LIT_UNLEARN_COMPILE=0``, where
compilation fails, and while diagnostics observe the update, the eager path runs ``combine`` on
flat chunks that stay in cache, or the allocation-free :meth:`Synthesizer.fused_kernel` the
shipped rules provide (a new rule does not need one).

Each rule declares what it guarantees (:attr:`Synthesizer.retain_guarantee`); the property suite
checks exactly what each rule declares.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from lit_unlearn.synthesis.compiled import CompiledPasses, compile_requested

Granularity = Literal["element", "tensor", "global"]
RetainGuarantee = Literal["element", "tensor", "global"]
"""Where a rule promises ``⟨u, g_r⟩ ≥ 0``: every coordinate, every tensor, or the whole vector."""
Reducer = Callable[[Tensor], Tensor]
"""Sums a float32 tensor of partial sums across shards or ranks and returns the total."""

# Per-chunk kernel: (forget, retain, out, scratch_a, scratch_b) on equal-length flat views that
# share one compute dtype.
ChunkKernel = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], None]
Observer = Callable[[int, Tensor, Tensor, Tensor], None]

CPU_CHUNK = 1 << 18  # 1 MiB of fp32 per scratch buffer: stays in L2/L3 on CPU
ACCELERATOR_CHUNK = 1 << 24  # large enough that kernel launches are negligible on GPU


def local_sum(partial: Tensor) -> Tensor:
    """The default reducer: the partial sums already are the totals (unsharded tensors)."""
    return partial


class AllReduceSum:
    """Reducer for sharded parameters: all-reduces partial sums over a process group.

    Args:
        group: the ``torch.distributed`` process group; ``None`` means the default group.
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group

    def __call__(self, partial: Tensor) -> Tensor:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            partial = partial.clone()
            dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=self.group)
        return partial

    def __repr__(self) -> str:
        return f"{type(self).__name__}(group={self.group!r})"


def dot32(a: Tensor, b: Tensor) -> Tensor:
    """Dot product of two same-shaped tensors, accumulated in float32 (0-dim, no host sync)."""
    if a.dtype != torch.float32:
        a = a.float()
    if b.dtype != torch.float32:
        b = b.float()
    return torch.dot(a.reshape(-1), b.reshape(-1))


def chunk_size_for(device: torch.device) -> int:
    """Chunk length for element-wise passes on ``device``."""
    return CPU_CHUNK if device.type == "cpu" else ACCELERATOR_CHUNK


def run_chunked(forget: Tensor, retain: Tensor, out: Tensor, kernel: ChunkKernel) -> None:
    """Apply an element-wise ``kernel`` to flat chunks of ``forget``/``retain`` into ``out``.

    The kernel sees chunks in one compute dtype (the promotion of the two input dtypes) and two
    scratch buffers of the chunk length. Inputs of another dtype are cast chunk by chunk, so
    mixed storage (an fp32 forget buffer next to bf16 ``.grad``) costs no parameter-sized copy.
    ``out`` may alias ``forget`` or ``retain``: kernels read a chunk fully before writing it.
    """
    cdtype = torch.promote_types(forget.dtype, retain.dtype)
    if not out.is_contiguous():
        tmp = torch.empty(out.shape, dtype=out.dtype, device=out.device)
        run_chunked(forget, retain, tmp, kernel)
        out.copy_(tmp)
        return
    f_flat, r_flat, o_flat = forget.reshape(-1), retain.reshape(-1), out.view(-1)
    n = o_flat.numel()
    chunk = min(n, chunk_size_for(out.device))
    if chunk == 0:
        return
    scratch_a = torch.empty(chunk, dtype=cdtype, device=out.device)
    scratch_b = torch.empty(chunk, dtype=cdtype, device=out.device)
    cast_f = forget.dtype != cdtype
    cast_r = retain.dtype != cdtype
    cast_o = out.dtype != cdtype
    extra = torch.empty(chunk * (cast_f + cast_r + cast_o), dtype=cdtype, device=out.device)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        k = stop - start
        slot = 0
        f, r, o = f_flat[start:stop], r_flat[start:stop], o_flat[start:stop]
        if cast_f:
            f = extra[slot * chunk : slot * chunk + k].copy_(f)
            slot += 1
        if cast_r:
            r = extra[slot * chunk : slot * chunk + k].copy_(r)
            slot += 1
        o_compute = extra[slot * chunk : slot * chunk + k] if cast_o else o
        kernel(f, r, o_compute, scratch_a[:k], scratch_b[:k])
        if cast_o:
            o.copy_(o_compute)


def _check_weight(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


class Synthesizer(ABC):
    """Base class of every gradient-synthesis rule.

    Subclasses set :attr:`granularity` and :attr:`retain_guarantee` and implement :meth:`combine`
    (and :meth:`statistics` when they need sums across coordinates). Call an instance on two
    sequences of tensors, one per trainable parameter: ``update = rule(forget_grads, retain_grads)``.

    Args:
        forget_weight: gamma in the paper, the weight of the forget branch.
        retain_weight: alpha in the paper, the weight of the retain branch.

    Rules that need dot products or norms (``tensor``/``global`` granularity) send their float32
    partial sums through ``self.reducer`` (default :func:`local_sum`: the tensors are whole). A
    sharded engine installs a cross-rank sum with :meth:`use_reducer`; it is not a configuration
    value.
    """

    granularity: ClassVar[Granularity]
    retain_guarantee: ClassVar[RetainGuarantee | None] = None
    """Where ``⟨u, g_r⟩ ≥ 0`` holds for any inputs and weights ``α, γ ≥ 0`` (``None``: no promise)."""
    state_buffers: ClassVar[int] = 0
    """Parameter-sized buffers the rule keeps across steps (GRU's moving average: 1); the memory
    planner counts them."""
    parameter_state_keys: ClassVar[tuple[str, ...]] = ()
    """The :meth:`state_dict` entries that hold one tensor per trainable tensor (this rank's shard
    under FSDP), also returned by :meth:`parameter_state`."""

    def __init__(
        self,
        forget_weight: float = 1.0,
        retain_weight: float = 1.0,
    ) -> None:
        self.forget_weight = _check_weight("forget_weight", forget_weight)
        self.retain_weight = _check_weight("retain_weight", retain_weight)
        self.reducer: Reducer = local_sum
        self.last_report: dict[str, Tensor] = {}
        self._compiled: CompiledPasses | Literal[False] | None = None  # None: not tried yet; False: eager

    def use_reducer(self, reducer: Reducer | None) -> Synthesizer:
        """Sum partial sums with ``reducer`` (e.g. :class:`AllReduceSum` over sharded tensors;
        ``None`` = :func:`local_sum`); returns the rule."""
        self.reducer = reducer if reducer is not None else local_sum
        return self

    def __call__(
        self,
        forget: Sequence[Tensor],
        retain: Sequence[Tensor],
        out: Sequence[Tensor] | None = None,
        observer: Observer | None = None,
    ) -> list[Tensor]:
        """Synthesize the update.

        Args:
            forget: the forget gradient, one tensor per parameter.
            retain: the retain gradient, same shapes and devices as ``forget``.
            out: optional storage for the result (may be ``retain`` or ``forget`` themselves);
                by default fresh tensors with the retain gradient's dtype.
            observer: optional ``observer(j, g_f^j, g_r^j, u^j)`` called for every tensor while
                all three are alive (used for diagnostics when ``out`` aliases an input; the
                update then goes through one scratch tensor of the largest parameter's size).

        Returns:
            The update, one tensor per parameter (``out`` when given).
        """
        forget, retain = list(forget), list(retain)
        out_list = self.validate(forget, retain, out)
        compiled = self.compiled_passes() if observer is None else None
        state = self._statistics(compiled, forget, retain)
        self.last_report = self.report(state)
        operand = self.combine_operand(forget, retain)
        if compiled is not None and self.compiled:
            try:
                compiled.combine(forget, operand, out_list, state)
                return out_list
            except Exception as error:  # noqa: BLE001  # the statistics stand: finish eagerly
                self._run_eagerly(compiled, error)
        scratch: Tensor | None = None
        if observer is not None:
            biggest = max(range(len(out_list)), key=lambda j: out_list[j].numel(), default=None)
            if biggest is not None:
                ref = out_list[biggest]
                scratch = torch.empty(ref.numel(), dtype=ref.dtype, device=ref.device)
        for j, (f, r, o) in enumerate(zip(forget, retain, out_list)):
            if observer is None or scratch is None:
                self.combine_tensor(state, j, f, operand[j], o)
                continue
            u = scratch[: o.numel()].view(o.shape)
            self.combine_tensor(state, j, f, operand[j], u)
            observer(j, f, r, u)
            o.copy_(u)
        return out_list

    def _statistics(self, compiled: CompiledPasses | None, forget: list[Tensor], retain: list[Tensor]) -> Any:
        if compiled is not None:
            try:
                return self.statistics(forget, retain, sums=compiled.partial_sums)
            except Exception as error:  # noqa: BLE001  # compilation fails before the traced code runs
                self._run_eagerly(compiled, error)
        return self.statistics(forget, retain)

    def _run_eagerly(self, compiled: CompiledPasses, error: BaseException) -> None:
        """A compilation failed (no C++ compiler, an operation inductor cannot lower): warn once
        and run eagerly for the rest of the process."""
        compiled.disable(error)
        self._compiled = False

    def compiled_passes(self) -> CompiledPasses | None:
        """The rule's compiled passes, or ``None`` where it runs eagerly: ``LIT_UNLEARN_COMPILE=0``,
        a rule that overrides :meth:`combine_tensor`, or :meth:`statistics` without
        :meth:`partial_sums` (a data flow of its own), or an earlier compilation failure."""
        if self._compiled is None:
            cls = type(self)
            own_flow = cls.combine_tensor is not Synthesizer.combine_tensor or (
                cls.statistics is not Synthesizer.statistics and cls.partial_sums is Synthesizer.partial_sums
            )
            self._compiled = False if own_flow or not compile_requested() else CompiledPasses(self)
        return self._compiled if isinstance(self._compiled, CompiledPasses) else None

    @property
    def compiled(self) -> bool:
        """Whether the rule runs its compiled kernels (known after its first call)."""
        return isinstance(self._compiled, CompiledPasses)

    @property
    def compile_seconds(self) -> float:
        """Seconds this process spent compiling the rule's kernels (0.0 when eager)."""
        return self._compiled.compile_seconds if isinstance(self._compiled, CompiledPasses) else 0.0

    @staticmethod
    def validate(
        forget: Sequence[Tensor], retain: Sequence[Tensor], out: Sequence[Tensor] | None = None
    ) -> list[Tensor]:
        """Check lengths, shapes, devices and dtypes; return the output storage."""
        if len(forget) != len(retain):
            raise ValueError(
                f"forget and retain gradients must have one tensor per parameter: got {len(forget)} "
                f"forget tensors and {len(retain)} retain tensors"
            )
        for j, (f, r) in enumerate(zip(forget, retain)):
            if not (isinstance(f, Tensor) and isinstance(r, Tensor)):
                raise ValueError(f"gradient {j}: expected tensors, got {type(f).__name__}/{type(r).__name__}")
            if f.shape != r.shape:
                raise ValueError(
                    f"gradient {j}: forget shape {tuple(f.shape)} != retain shape {tuple(r.shape)}"
                )
            if f.device != r.device:
                raise ValueError(f"gradient {j}: forget on {f.device} but retain on {r.device}")
            if not (f.is_floating_point() and r.is_floating_point()):
                raise ValueError(f"gradient {j}: expected floating-point tensors, got {f.dtype}/{r.dtype}")
        if out is None:
            return [torch.empty_like(r) for r in retain]
        out = list(out)
        if len(out) != len(retain):
            raise ValueError(f"out must have {len(retain)} tensors, got {len(out)}")
        for j, (o, r) in enumerate(zip(out, retain)):
            if o.shape != r.shape or o.device != r.device or not o.is_floating_point():
                raise ValueError(
                    f"out {j}: expected a floating tensor of shape {tuple(r.shape)} on {r.device}, "
                    f"got {o.dtype} {tuple(o.shape)} on {o.device}"
                )
        return out

    def terms(self, forget: Tensor, retain: Tensor) -> Sequence[Tensor] | None:
        """The float32 partial sums one tensor contributes to the rule's statistics, as 0-dim
        tensors (e.g. ``(dot32(f, r), dot32(r, r))`` for PCGrad); ``None``: the rule has none."""
        return None

    def summarize(self, totals: Tensor) -> Any:
        """The statistics from the reduced sums of :meth:`terms`: ``[tensors, k]`` for a
        ``tensor`` rule, ``[k]`` (summed over tensors) for a ``global`` one."""
        raise NotImplementedError(f"{type(self).__name__} defines terms() but not summarize()")

    def partial_sums(self, forget: list[Tensor], retain: list[Tensor]) -> Tensor:
        """This shard's :meth:`terms` for every tensor, stacked (``[tensors, k]``) or summed over
        tensors for a ``global`` rule (``[k]``): what goes through the reducer, in one call."""

        def row(f: Tensor, r: Tensor) -> Tensor:
            values = self.terms(f, r)
            if values is None:
                raise NotImplementedError(f"{type(self).__name__} defines no terms()")
            return torch.stack(list(values))

        if forget:
            rows = torch.stack([row(f, r) for f, r in zip(forget, retain)])
        else:  # no tensor on this shard: k columns, no row
            empty = torch.zeros(0, device=retain[0].device if retain else torch.device("cpu"))
            rows = row(empty, empty)[None][:0]
        return rows.sum(0) if self.granularity == "global" else rows

    def statistics(
        self, forget: list[Tensor], retain: list[Tensor], sums: Callable[..., Tensor] | None = None
    ) -> Any:
        """Cross-tensor quantities the rule needs: by default :meth:`summarize` of the reduced
        :meth:`partial_sums` (one ``reducer`` call), ``None`` for a rule without :meth:`terms`.
        ``sums`` computes the partial sums in its place (the compiled :meth:`partial_sums`); a
        rule that overrides this method and :meth:`partial_sums` takes it too."""
        if type(self).terms is Synthesizer.terms:
            return None
        return self.summarize(self.reducer((sums or self.partial_sums)(forget, retain)))

    def combine_operand(self, forget: list[Tensor], retain: list[Tensor]) -> list[Tensor]:
        """What :meth:`combine` receives beside the forget gradient: the retain gradient (GRU: its
        moving average, which :meth:`statistics` has just moved)."""
        return retain

    def report(self, state: Any) -> dict[str, Tensor]:
        """Rule-specific diagnostics from :meth:`statistics` (e.g. PCGrad's projected fraction)."""
        return {}

    def tensor_statistics(self, state: Any, index: int) -> Any:
        """Tensor ``index``'s share of :meth:`statistics` (what :meth:`combine` gets as ``stats``);
        by default all of it."""
        return state

    @abstractmethod
    def combine(self, forget: Tensor, retain: Tensor, stats: Any = None) -> Tensor:
        """The update for matching flat chunks of one tensor's forget and retain gradients, given
        that tensor's ``stats`` (``None`` for rules without statistics). Element-wise given the
        statistics: the base class applies it chunk by chunk."""

    def fused_kernel(self, stats: Any) -> ChunkKernel | None:
        """Optional fast path: an in-place kernel ``(f, r, out, scratch_a, scratch_b)`` equal to
        :meth:`combine` for one tensor's ``stats``; ``None`` = use :meth:`combine`."""
        return None

    def combine_tensor(self, state: Any, index: int, forget: Tensor, retain: Tensor, out: Tensor) -> None:
        """Write the update of tensor ``index`` into ``out`` (which may alias an input)."""
        stats = self.tensor_statistics(state, index)
        kernel = self.fused_kernel(stats)
        if kernel is None:

            def kernel(f: Tensor, r: Tensor, o: Tensor, a: Tensor, b: Tensor) -> None:
                o.copy_(self.combine(f, r) if stats is None else self.combine(f, r, stats))

        run_chunked(forget, retain, out, kernel)

    def state_dict(self) -> dict[str, Any]:
        """State a stateful rule carries across steps (checkpointed); none by default."""
        return {}

    def parameter_state(
        self, shapes: Sequence[torch.Size], dtype: torch.dtype, device: torch.device
    ) -> dict[str, list[Tensor]]:
        """The entries of :attr:`parameter_state_keys`, one tensor per trainable tensor (created
        at their initial value for tensors of ``shapes`` if the rule has not run yet). Under FSDP
        the engine checkpoints these tensors sharded like the parameters, and a restore writes
        into them in place; none by default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def _extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        extra = self._extra_repr()
        return (
            f"{type(self).__name__}(forget_weight={self.forget_weight:g}, "
            f"retain_weight={self.retain_weight:g}{', ' + extra if extra else ''})"
        )
