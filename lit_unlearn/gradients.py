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

Synchronisation. Backward passes run with DDP's gradient all-reduce blocked; at the accumulation
boundary each task's flat buffer is all-reduced once (one bucketed collective per task, launched
together) and divided by the world size, so every rank synthesizes the identical update from the
effective-batch gradients (SPEC.md section 1).
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

log = logging.getLogger(__name__)

Task = Literal["forget", "retain"]


def _views(flat: Tensor, params: list[nn.Parameter]) -> list[Tensor]:
    out, offset = [], 0
    for p in params:
        n = p.numel()
        out.append(flat[offset : offset + n].view_as(p))
        offset += n
    return out


class TwoTaskGradients:
    """Separate forget/retain gradient accumulation for a list of trainable parameters.

    Args:
        params: the trainable parameters (all on one device, one dtype).
        buffer_dtype: dtype of the forget buffer; ``None`` means the parameters' dtype.
        accumulate: micro-batches per optimizer step.
    """

    def __init__(self, params: list[nn.Parameter], buffer_dtype: torch.dtype | None, accumulate: int) -> None:
        if not params:
            raise ValueError("no trainable parameters: check --model.trainable_parameters")
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(f"trainable parameters must share one dtype and device, got {dtypes} on {devices}")
        self.params = params
        grad_dtype, device = params[0].dtype, params[0].device
        self.buffer_dtype = buffer_dtype or grad_dtype
        self.mode = "swap" if self.buffer_dtype == grad_dtype else "copy"
        numel = sum(p.numel() for p in params)
        self.grad_flat = torch.zeros(numel, dtype=grad_dtype, device=device)
        self.forget_flat = torch.zeros(numel, dtype=self.buffer_dtype, device=device)
        self.retain_flat: Tensor | None = None
        if self.mode == "copy" and accumulate > 1:
            log.warning(
                "forget buffer dtype %s differs from the %s gradients and accumulate_grad_batches=%d: "
                "a second %s buffer accumulates the retain gradient (2 extra parameter-sized buffers)",
                self.buffer_dtype, grad_dtype, accumulate, self.buffer_dtype,
            )
            self.retain_flat = torch.zeros(numel, dtype=self.buffer_dtype, device=device)
        self.grad_views = _views(self.grad_flat, params)
        self.forget_views = _views(self.forget_flat, params)
        self.retain_views = _views(self.retain_flat, params) if self.retain_flat is not None else self.grad_views
        self._point_grads(self.grad_views)

    def _point_grads(self, views: list[Tensor]) -> None:
        for p, v in zip(self.params, views):
            p.grad = v

    def begin(self, task: Task) -> None:
        """Make ``.grad`` accumulate ``task``'s gradient during the next backward."""
        if self.mode == "swap":
            self._point_grads(self.forget_views if task == "forget" else self.grad_views)

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

    @property
    def retain_source(self) -> Tensor:
        """Flat storage of the accumulated retain gradient."""
        return self.retain_flat if self.retain_flat is not None else self.grad_flat

    def all_reduce(self, world_size: int) -> None:
        """Average both task buffers across ranks: one collective per task, issued together."""
        if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return
        handles = [dist.all_reduce(buf, async_op=True) for buf in (self.forget_flat, self.retain_source)]
        for handle in handles:
            handle.wait()
        self.forget_flat.div_(world_size)
        self.retain_source.div_(world_size)

    def finite(self) -> Tensor:
        """0-dim bool tensor: both accumulated gradients are free of NaN/inf (one reduction each)."""
        return torch.isfinite(self.forget_flat.sum(dtype=torch.float32) + self.retain_source.sum(dtype=torch.float32))

    def zero(self) -> None:
        """Reset both tasks after an optimizer step (or a skipped step); ``.grad`` keeps pointing at views."""
        self.forget_flat.zero_()
        self.grad_flat.zero_()
        if self.retain_flat is not None:
            self.retain_flat.zero_()
        self._point_grads(self.grad_views)

    def extra_bytes(self) -> int:
        """Bytes held beyond one gradient per parameter."""
        extra = self.forget_flat.numel() * self.forget_flat.element_size()
        if self.retain_flat is not None:
            extra += self.retain_flat.numel() * self.retain_flat.element_size()
        return extra
