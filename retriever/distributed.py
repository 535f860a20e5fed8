"""All-gather helpers that let every rank compute the retrieval loss over the global batch.

Gradient convention
-------------------
`all_gather_with_grad` returns the concatenation of every rank's tensor in rank order, where the rank's own slice
is its local tensor (so autograd reaches the local representations) and the other slices are detached copies.
Every rank therefore computes the *same* global loss L, and the gradient that flows back to rank r's local tensor
is exactly ∂L/∂(slice r): the corresponding slice of the gradient a single process would get on the concatenated
batch. Parameter gradients are then partial sums, one per rank, of the single-process gradient, so they must be
**summed** across ranks, not averaged. DDP and FSDP average by default; either call
`set_gradient_divide_factor(1.0)` on every module wrapped by FSDP2's `fully_shard`, or multiply the loss by the world
size before `backward()`.

All ranks must call these functions together, with tensors of the same shape (same number of queries and passages
per rank); a mismatch is detected and reported instead of hanging or producing a misaligned batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:
    from retriever.losses import RetrievalBatch

# Shapes are exchanged as a fixed-length int64 vector [ndim, *shape, 0...] so ranks with different ndim still agree
# on the collective's size.
_MAX_DIMS = 8


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """True when a process group is initialized and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _gather_meta(meta: list[int], device: torch.device, group: dist.ProcessGroup | None) -> list[list[int]]:
    """All-gathers a short list of ints (same length on every rank); returns one list per rank."""
    local = torch.tensor(meta, dtype=torch.int64, device=device)
    out = torch.empty(dist.get_world_size(group) * len(meta), dtype=torch.int64, device=device)
    dist.all_gather_into_tensor(out, local, group=group)
    return out.view(-1, len(meta)).tolist()


def _shape_meta(t: Tensor) -> list[int]:
    if t.dim() > _MAX_DIMS:
        raise ValueError(
            f"all_gather_with_grad supports tensors with at most {_MAX_DIMS} dims, got shape {tuple(t.shape)}"
        )
    return [t.dim(), *t.shape] + [0] * (_MAX_DIMS - t.dim())


def _meta_shape(meta: list[int]) -> tuple[int, ...]:
    return tuple(meta[1 : 1 + meta[0]])


def all_gather_with_grad(t: Tensor, *, group: dist.ProcessGroup | None = None, check_shapes: bool = True) -> Tensor:
    """Concatenates `t` from every rank along dim 0 (rank order), keeping autograd through the local slice.

    Identity when torch.distributed is not initialized or the world size is 1. Every rank must pass a tensor of
    the same shape, dtype and device type; with `check_shapes` (default) the shapes are compared first (one small
    extra collective) and a mismatch raises ValueError on every rank. See the module docstring for the gradient
    convention (sum parameter gradients across ranks).
    """
    if t.dim() == 0:
        raise ValueError("all_gather_with_grad needs a tensor with a leading batch dimension, got a 0-dim tensor")
    if not is_distributed(group):
        return t
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if check_shapes:
        shapes = [_meta_shape(m) for m in _gather_meta(_shape_meta(t), t.device, group)]
        if any(s != shapes[0] for s in shapes):
            listing = ", ".join(f"rank {r}: {s}" for r, s in enumerate(shapes))
            raise ValueError(
                f"all_gather_with_grad: tensor shapes differ across ranks ({listing}); every rank must hold the "
                "same number of examples per step (use drop_last / equal per-rank batch sizes)"
            )
    local = t.detach().contiguous()
    out = torch.empty((world * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    dist.all_gather_into_tensor(out, local, group=group)
    if not t.requires_grad:
        return out
    n = t.shape[0]
    # Put the live local tensor back in place of its detached copy so gradients reach this rank's inputs.
    return torch.cat([out[: rank * n], t, out[(rank + 1) * n :]], dim=0)


def gather_batch(batch: RetrievalBatch, *, group: dist.ProcessGroup | None = None) -> RetrievalBatch:
    """The global batch: queries, passages and teacher scores of every rank concatenated in rank order.

    Returns `batch` itself when not distributed. All ranks must agree on the number of queries, candidates per
    query, representation size and on whether teacher scores are present; this is checked in one collective and
    a mismatch raises ValueError on every rank.
    """
    from retriever.losses import RetrievalBatch

    if not is_distributed(group):
        return batch
    q, p = batch.queries, batch.passages
    has_teacher = batch.teacher is not None
    metas = _gather_meta([int(has_teacher), *p.shape], q.device, group)
    if any(m != metas[0] for m in metas):
        listing = ", ".join(
            f"rank {r}: passages {tuple(m[1:])}, teacher {'yes' if m[0] else 'no'}" for r, m in enumerate(metas)
        )
        raise ValueError(
            f"gather_batch: batches differ across ranks ({listing}); every rank needs the same number of queries, "
            "candidates per query and representation size, and teacher scores on all ranks or none"
        )
    teacher = all_gather_with_grad(batch.teacher, group=group, check_shapes=False) if has_teacher else None
    return RetrievalBatch(
        queries=all_gather_with_grad(q, group=group, check_shapes=False),
        passages=all_gather_with_grad(p, group=group, check_shapes=False),
        teacher=teacher,
        score_scale=batch.score_scale,
    )
