"""The few collectives the training loop needs besides the strategy's own; plain values in a single process."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

# One gloo side group per default process group: objects travel over gloo also when the job runs NCCL.
_GLOO_GROUPS: dict[int, Any] = {}


def _object_group() -> Any:
    if dist.get_backend() == "gloo":
        return None
    key = id(dist.group.WORLD)
    if key not in _GLOO_GROUPS:
        _GLOO_GROUPS[key] = dist.new_group(backend="gloo")
    return _GLOO_GROUPS[key]


def all_gather_objects(obj: Any, world_size: int) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (collective)."""
    if world_size == 1 or not dist.is_initialized():
        return [obj]
    parts: list[Any] = [None] * world_size
    dist.all_gather_object(parts, obj, group=_object_group())
    return parts


def any_rank(flags: list[bool], world_size: int, device: torch.device) -> list[bool]:
    """For each flag, whether it is set on any rank (collective), so that every rank takes the same branch."""
    if world_size == 1 or not dist.is_initialized():
        return list(flags)
    tensor = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]
