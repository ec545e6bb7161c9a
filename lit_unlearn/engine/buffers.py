"""Two-task gradient bookkeeping: the only place that decides buffers, dtype and sync policy.

Memory. Plain training holds one gradient per parameter (``.grad``). We add exactly **one**
parameter-sized buffer. Both live in flat, contiguous storage and every ``.grad`` is a view:

- *swap* mode (buffer dtype == gradient dtype, the usual fp32-parameter case): the two flat
  buffers take turns being ``.grad`` — forget backward accumulates into one, retain backward into
  the other — so k micro-batches accumulate each task separately with no copy at all.
- *copy* mode (an fp32 forget buffer next to bf16 gradients under ``bf16-true``): ``.grad`` is
  scratch; after the forget backward it is added into the fp32 buffer and zeroed. With gradient
  accumulation the retain task then needs its own fp32 accumulator too (a second buffer; a
  warning says so).

Normalisation. An objective's loss is a mean over units (label tokens, or sequences for NPO and
SimNPO). Averaging per-micro-batch means is wrong when micro-batches hold different numbers of
units (variable-length answers): the effective batch's mean weighs every unit equally. So each
backward pass uses the micro-batch's *summed* loss divided by a constant ``c`` (the number of
sequences of the effective batch: per-device batch × micro-batches × ranks, the same on every
rank and micro-batch), the units are counted alongside, and at the boundary the summed buffers
are multiplied by ``c / units of the effective batch``. The result is exactly the gradient of the
effective batch's mean loss, for any mix of lengths, micro-batches and ranks (the same idea as
``num_items_in_batch`` in recent transformers, without prefetching the window).

Synchronisation. Backward passes run with DDP's gradient all-reduce blocked; at the accumulation
boundary each task's flat buffer is summed across ranks once (one bucketed collective per task)
together with the loss sums and unit counts (one small collective), so every rank synthesizes
the identical update from the effective-batch gradients.

Sharded parameters (FSDP2, ``fully_shard``: every parameter a dim-0 sharded ``DTensor``). Each
rank holds only its shard of both task buffers (1/N of the parameters each). The ``.grad`` of a
parameter is a ``DTensor`` whose local tensor is a view of the task's flat shard buffer, so FSDP's
reduce-scatter after each task's backward accumulates the rank-averaged shard straight into it (no
copy). At the boundary only the loss statistics and a non-finite flag are all-reduced; the buffers
are scaled by the world size (FSDP averages where the normalisation above needs sums). Synthesis
then runs on the local shards; rules that need dot products or norms send their partial sums
through :attr:`reducer`, an all-reduce, so PCGrad and the diagnostics see whole-tensor values.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lit_unlearn.synthesis.base import AllReduceSum, Reducer, local_sum

log = logging.getLogger(__name__)


Task = Literal["forget", "retain"]
TASKS: tuple[Task, Task] = ("forget", "retain")
TASK_INDEX = {"forget": 0, "retain": 1}


@contextlib.contextmanager
def no_backward_sync(strategy: Any) -> Iterator[None]:
    """Block the strategy's gradient all-reduce during backward (both task buffers are reduced
    once at the accumulation boundary instead)."""
    block = getattr(strategy, "block_backward_sync", None)
    with block() if block is not None else contextlib.nullcontext():
        yield


def _local(p: Tensor) -> Tensor:
    """A parameter's local tensor (its shard for a ``DTensor``, itself otherwise)."""
    return p.to_local() if isinstance(p, DTensor) else p


def _views(flat: Tensor, params: list[nn.Parameter]) -> list[Tensor]:
    out, offset = [], 0
    for p in params:
        local = _local(p)
        n = local.numel()
        out.append(flat[offset : offset + n].view_as(local))
        offset += n
    return out


def _as_grads(views: list[Tensor], params: list[nn.Parameter]) -> list[Tensor]:
    """What ``.grad`` is set to: the views themselves, or ``DTensor`` s wrapping them for sharded
    parameters (FSDP then accumulates into the view in place)."""
    return [
        DTensor.from_local(v, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
        if isinstance(p, DTensor)
        else v
        for v, p in zip(views, params)
    ]


class TwoTaskGradients:
    """Separate forget/retain gradient accumulation for a list of trainable parameters.

    Args:
        params: the trainable parameters (all on one device, one dtype).
        buffer_dtype: dtype of the forget buffer; ``None`` means the parameters' dtype.
        accumulate: micro-batches per optimizer step.
        world_size: data-parallel processes.
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        buffer_dtype: torch.dtype | None,
        accumulate: int,
        world_size: int = 1,
    ) -> None:
        if not params:
            raise ValueError("no trainable parameters: check --model.network.trainable_parameters")
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(
                f"trainable parameters must share one dtype and device, got {dtypes} on {devices}"
            )
        self.params = params
        self.accumulate, self.world_size = accumulate, world_size
        self.sharded = any(isinstance(p, DTensor) for p in params)
        # Sums across tensors (dot products, norms) of sharded buffers need every rank's part.
        self.reducer: Reducer = AllReduceSum() if self.sharded else local_sum
        grad_dtype, device = params[0].dtype, _local(params[0]).device
        self.buffer_dtype = buffer_dtype or grad_dtype
        self.mode = "swap" if self.buffer_dtype == grad_dtype else "copy"
        numel = sum(_local(p).numel() for p in params)
        self.grad_flat = torch.zeros(numel, dtype=grad_dtype, device=device)
        self.forget_flat = torch.zeros(numel, dtype=self.buffer_dtype, device=device)
        self.retain_flat: Tensor | None = None
        if self.mode == "copy" and accumulate > 1:
            log.warning(
                "forget buffer dtype %s differs from the %s gradients and accumulate_grad_batches=%d: "
                "a second %s buffer accumulates the retain gradient (2 extra parameter-sized buffers)",
                self.buffer_dtype,
                grad_dtype,
                accumulate,
                self.buffer_dtype,
            )
            self.retain_flat = torch.zeros(numel, dtype=self.buffer_dtype, device=device)
        self.grad_views = _views(self.grad_flat, params)
        self.forget_views = _views(self.forget_flat, params)
        self.retain_views = (
            _views(self.retain_flat, params) if self.retain_flat is not None else self.grad_views
        )
        self._grad_targets = _as_grads(self.grad_views, params)
        self._forget_targets = _as_grads(self.forget_views, params)
        self._point_grads(self._grad_targets)
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        # [forget loss sum, retain loss sum, forget units, retain units, stop requests]: one
        # collective at the boundary; float64 so unit counts stay exact.
        self.stats = torch.zeros(5, dtype=torch.float64, device=device)
        self.last_counts = torch.ones(2, dtype=torch.float64, device=device)
        self._scale: dict[str, int] = {}
        self._metric_sums: dict[str, Any] = {}
        self.pending = 0  # micro-batches accumulated since the last boundary

    def _point_grads(self, targets: list[Tensor]) -> None:
        for p, g in zip(self.params, targets):
            p.grad = g

    def begin(self, task: Task) -> None:
        """Make ``.grad`` accumulate ``task``'s gradient during the next backward.

        ``.grad`` is re-pointed every time, in both modes: code outside the engine may replace it
        (restoring a checkpoint did, between ``on_fit_start`` and the first step, and the first
        resumed step of a copy-mode run then used a stray, unnormalised gradient)."""
        forget = self.mode == "swap" and task == "forget"
        self._point_grads(self._forget_targets if forget else self._grad_targets)

    def end(self, task: Task) -> None:
        """After ``task``'s backward: move the gradient into its accumulator (copy mode only)."""
        if self.mode == "swap":
            return
        if task == "forget":
            self.forget_flat.add_(self.grad_flat)
            self.grad_flat.zero_()
        elif self.retain_flat is not None:
            self.retain_flat.add_(self.grad_flat)
            self.grad_flat.zero_()

    def backward_scale(self, task: Task, batch_size: int) -> int:
        """The constant ``c`` a micro-batch's summed loss is divided by before backward.

        It is fixed per task for the whole window (the effective batch's number of sequences), so
        the sum of the scaled gradients is exactly ``Σ ∇(summed loss) / c`` on every rank.
        """
        scale = self.accumulate * self.world_size * batch_size
        first = self._scale.setdefault(task, scale)
        if first != scale:
            raise ValueError(
                f"{task} micro-batches of one optimizer step differ in size ({first // (self.accumulate * self.world_size)} "
                f"vs {batch_size} sequences): exact normalisation needs equal per-device batches"
            )
        return scale

    def record(
        self, task: Task, total: Tensor, count: Tensor, metrics: dict[str, Tensor] | None = None
    ) -> None:
        """Add a micro-batch's summed loss, unit count and the objective's own summed metrics
        (``<task>_<name>``; device tensors, no host sync)."""
        i = TASK_INDEX[task]
        self.stats[i] += total.detach().to(torch.float64)
        self.stats[2 + i] += count.detach().to(torch.float64)
        for name, value in (metrics or {}).items():
            key = f"{task}_{name}"
            self._metric_sums[key] = self._metric_sums.get(key, 0.0) + value.detach().double()

    def take_metric_sums(self) -> dict[str, Tensor]:
        """The objective metrics summed since the last call (this rank's micro-batches), then reset."""
        sums, self._metric_sums = self._metric_sums, {}
        return sums

    def micro_batch_done(self) -> None:
        """Both tasks of one micro-batch are in the buffers."""
        self.pending += 1

    def reduce(self, stop_requested: bool = False) -> tuple[Tensor, Tensor]:
        """At the boundary: sum buffers and statistics over ranks, normalise each task's buffer to
        the gradient of the effective batch's mean loss, and return ``(mean losses (2,), stop)``
        where ``stop`` is the number of ranks that asked to stop (all device tensors)."""
        stats = torch.cat([self.stats, self.stats.new_zeros(1)])
        stats[4] = float(stop_requested)
        if self.sharded:  # a NaN in one rank's shard must stop every rank
            stats[5] = (~self._local_finite()).to(stats.dtype)
        distributed = self.world_size > 1 and dist.is_available() and dist.is_initialized()
        if distributed:
            # Sharded buffers are already reduced (scattered) by FSDP; whole ones are summed here.
            buffers = () if self.sharded else (self.forget_flat, self.retain_source)
            handles = [dist.all_reduce(buf, async_op=True) for buf in (*buffers, stats)]
            for handle in handles:
                handle.wait()
        self._nonfinite = stats[5] > 0
        counts = stats[2:4].clamp_min(1)
        self.last_counts = counts  # units of the effective batch per task (for objective metrics)
        ranks = self.world_size if self.sharded and distributed else 1  # FSDP averaged over ranks
        for i, buf in enumerate((self.forget_flat, self.retain_source)):
            scale = self._scale.get(("forget", "retain")[i])
            if scale is not None:
                # 0-dim float64 factor: no promotion of the buffer, exact in float64
                buf.mul_(scale * ranks / counts[i])
        return (stats[:2] / counts).float(), stats[4]

    @property
    def retain_source(self) -> Tensor:
        """Flat storage of the accumulated retain gradient."""
        return self.retain_flat if self.retain_flat is not None else self.grad_flat

    def _local_finite(self) -> Tensor:
        return torch.isfinite(
            self.forget_flat.sum(dtype=torch.float32) + self.retain_source.sum(dtype=torch.float32)
        )

    def finite(self) -> Tensor:
        """0-dim bool tensor: both accumulated gradients are free of NaN/inf (one reduction each;
        for sharded buffers, agreed across ranks in :meth:`reduce`)."""
        return ~self._nonfinite if self.sharded else self._local_finite()

    def clip_(self, max_norm: float) -> Tensor:
        """Scale the synthesized update (``.grad``) to global L2 norm at most ``max_norm``, as
        ``torch.nn.utils.clip_grad_norm_`` does, with the norm summed over shards; returns the
        norm before clipping (device tensor, no host sync)."""
        wide = torch.promote_types(self.grad_flat.dtype, torch.float32)
        norm = self.reducer(torch.linalg.vector_norm(self.grad_flat, dtype=wide).square()).sqrt()
        self.grad_flat.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0).to(self.grad_flat.dtype))
        return norm

    def zero(self) -> None:
        """Reset both tasks after an optimizer step (or a skipped step); ``.grad`` keeps pointing at views."""
        self.forget_flat.zero_()
        self.grad_flat.zero_()
        if self.retain_flat is not None:
            self.retain_flat.zero_()
        self._point_grads(self._grad_targets)
        self.stats.zero_()
        self._scale.clear()
        self.pending = 0

    def extra_bytes(self) -> int:
        """Bytes held beyond one gradient per parameter."""
        extra = self.forget_flat.numel() * self.forget_flat.element_size()
        if self.retain_flat is not None:
            extra += self.retain_flat.numel() * self.retain_flat.element_size()
        return extra
