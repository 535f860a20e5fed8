"""Data-parallel strategies for the training module: none (one process), FSDP2, DDP, DeepSpeed ZeRO.

Every loss in this project is computed over the global (all-gathered) batch, so each rank's local gradients are
its share of the global gradient and must be SUMMED across ranks: FSDP2, DDP and DeepSpeed all average, so the
loss is multiplied by the world size before backward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from retriever.errors import SettingError
from retriever.registry import Registry


@dataclass
class Wrapped:
    module: nn.Module  # what the loop calls
    loss_scale: float  # multiply the loss by this before backward
    engine: Any = None  # DeepSpeed engine (owns backward/step) or None


def decoder_layers(module: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the units FSDP shards and gathers one at a time."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in module.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(f"no decoder layers found in {type(module).__name__}; cannot shard it per layer")
    return layers


def _single(module: nn.Module, *, device: torch.device, world_size: int, **_: Any) -> Wrapped:
    return Wrapped(module.to(device), 1.0)


def _fsdp(module: nn.Module, *, device: torch.device, world_size: int, mixed_precision: str, **_: Any) -> Wrapped:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    module.to(device)
    mesh = init_device_mesh(device.type, (world_size,))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision == "bf16"
        else MixedPrecisionPolicy()
    )
    for layer in decoder_layers(module):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)
    # FSDP averages gradients over ranks; scaling the loss turns that into the sum (a divide factor of 1 would
    # need PREMUL_SUM, which gloo lacks).
    return Wrapped(module, float(world_size))


def _ddp(module: nn.Module, *, device: torch.device, world_size: int, **_: Any) -> Wrapped:
    from torch.nn.parallel import DistributedDataParallel

    module.to(device)
    ids = [device.index] if device.type == "cuda" else None
    return Wrapped(DistributedDataParallel(module, device_ids=ids), float(world_size))


def _deepspeed(
    module: nn.Module,
    *,
    device: torch.device,
    world_size: int,
    mixed_precision: str,
    zero_stage: int,
    lr: float,
    weight_decay: float,
    micro_batch: int,
    max_grad_norm: float | None,
    **_: Any,
) -> Wrapped:
    try:
        import deepspeed
    except ImportError as exc:
        raise SettingError(
            "train.strategy=deepspeed needs the `deepspeed` extra: pip install 'retriever[deepspeed]'"
        ) from exc
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": mixed_precision == "bf16"},
        "gradient_clipping": max_grad_norm or 0.0,
        # Gradients are summed, not averaged: the loss is already global (see module docstring).
        "prescale_gradients": False,
    }
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
    return Wrapped(engine, float(world_size), engine)


STRATEGIES: Registry[Callable[..., Wrapped]] = Registry("training strategy")
STRATEGIES.add("single", _single)
STRATEGIES.add("fsdp", _fsdp)
STRATEGIES.add("ddp", _ddp)
STRATEGIES.add("deepspeed", _deepspeed)


def wrap(strategy: str, module: nn.Module, **kwargs: Any) -> Wrapped:
    """Apply a strategy; without a process group (in-process runs) training is plain single-process."""
    import torch.distributed as dist

    if not dist.is_initialized() and strategy != "deepspeed":
        strategy = "single"
    return STRATEGIES.get(strategy)(module, **kwargs)
