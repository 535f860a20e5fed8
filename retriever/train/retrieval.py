"""Retrieval fine-tuning as a training task: encoder + collator + loss, one step = queries and their passages."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from retriever.config import ExperimentConfig
from retriever.data.collate import TrainingBatch, TrainingCollator
from retriever.distributed import gather_batch
from retriever.flops import passages_per_query
from retriever.losses import LossOutput, RetrievalBatch, build_loss
from retriever.models.backbone import is_random_preset
from retriever.models.encoders import RetrievalEncoder, build_encoder

if TYPE_CHECKING:
    from retriever.data.sources import DocTexts


class PairModule(nn.Module):
    """One forward for a step's queries and passages (DDP needs a single forward per backward; FSDP2's root)."""

    def __init__(self, encoder: RetrievalEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(
        self, queries: Mapping[str, torch.Tensor], passages: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(**queries), self.encoder(**passages)


def gathered_state_dict(module: nn.Module, full: bool) -> dict[str, torch.Tensor]:
    """The (trainable, or all when `full`) weights of `module`, unsharded, on CPU (a collective when sharded)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    partitioned = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if partitioned:  # DeepSpeed ZeRO-3: gather the partitions on every rank while copying
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
            return {
                name: param.detach().cpu().clone()
                for name, param in module.state_dict(keep_vars=True).items()
                if full or param.requires_grad
            }
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=not full)
    return get_model_state_dict(module, options=options)


def save_backbone(model: nn.Module, tokenizer: Any, out_dir: Path, rank: int) -> None:
    """A pre-training stage's product (collective under sharding; rank 0 writes): the LoRA adapter, or with full
    fine-tuning the whole model in transformers format plus its tokenizer."""
    from peft import PeftModel

    state = gathered_state_dict(model, full=not isinstance(model, PeftModel))
    if rank == 0:
        model.save_pretrained(out_dir, state_dict=state)
        tokenizer.save_pretrained(out_dir)


class RetrievalTask:
    name = "retrieval"
    product = "encoder"

    def __init__(self, cfg: ExperimentConfig, *, planned_steps: int, docs: DocTexts | None = None) -> None:
        self.cfg = cfg
        self.planned_steps = planned_steps
        self.docs = docs
        self.group_size = passages_per_query(cfg.loss.name, cfg.loss.kd, cfg.loss.num_negatives)
        self.encoder: RetrievalEncoder | None = None
        self.collator: TrainingCollator | None = None
        self.cost_model: Any = None

    def build(self) -> nn.Module:
        from retriever.flops import StepCostModel

        cfg = self.cfg
        self.encoder = build_encoder(cfg.backbone, cfg.encoder)
        self.collator = TrainingCollator(
            self.encoder.tokenizer,
            num_negatives=self.group_size - 1,
            query_max_length=cfg.encoder.query_max_length,
            passage_max_length=cfg.encoder.passage_max_length,
            add_bos=cfg.encoder.add_bos,
            pad_to_max_length=cfg.train.pad_to_max_length,
            need_teacher=cfg.loss.name in ("kd", "cl+kd"),
            seed=cfg.train.seed,
            docs=self.docs,
        )
        self.loss_fn = build_loss(
            cfg.loss.name,
            cfg.encoder.paradigm,
            kd=cfg.loss.kd,
            cl_weight=cfg.loss.cl_weight,
            kd_weight=cfg.loss.kd_weight,
            flops_query=cfg.loss.flops_query,
            flops_passage=cfg.loss.flops_passage,
            ramp_steps=max(1, int(self.planned_steps * cfg.loss.flops_ramp_fraction)),
        )
        self.cost_model = StepCostModel.for_experiment(cfg, self.encoder.lm.config)
        return PairModule(self.encoder)

    def collate(self, rows: Mapping[str, Any], epoch: int) -> TrainingBatch:
        self.collator.set_epoch(epoch)
        return self.collator(rows)

    def to_device(self, batch: TrainingBatch, device: torch.device) -> TrainingBatch:
        return batch.to(device)

    def step_cost(self, batch: TrainingBatch) -> tuple[float, int]:
        q_shape = tuple(batch.queries["input_ids"].shape)
        p_shape = tuple(batch.passages["input_ids"].shape)
        flops = self.cost_model.step_flops(
            queries=q_shape[0], query_length=q_shape[1], passages_per_query=batch.group_size, passage_length=p_shape[1]
        )
        return flops, q_shape[0] * q_shape[1] + p_shape[0] * p_shape[1]

    def loss(self, module: nn.Module, batch: TrainingBatch, step: int) -> LossOutput:
        queries, passages = module(batch.queries, batch.passages)
        reps = RetrievalBatch(
            queries=queries,
            passages=passages.view(batch.num_queries, batch.group_size, -1),
            teacher=batch.teacher,
            score_scale=self.encoder.score_scale,
        )
        return self.loss_fn(gather_batch(reps), step)

    @torch.no_grad()
    def probe(self, module: nn.Module, texts: list[str], device: torch.device) -> list[list[float]]:
        """Passage representations from the trained module itself (every rank runs the sharded forward)."""
        module.eval()
        tokens = {k: v.to(device) for k, v in self.encoder.tokenize(texts, "passage").items()}
        _, passages = module(tokens, tokens)
        module.train()
        return passages.float().cpu().tolist()

    def export(self, module: nn.Module, out_dir: Path, rank: int) -> None:
        """The encoder directory (adapter + config + tokenizer [+ base weights for random backbones])."""
        full = is_random_preset(self.cfg.backbone.name) or not self.cfg.backbone.lora.enabled
        # DDP and DeepSpeed wrap the module; FSDP2 shards it in place.
        inner = module if isinstance(module, PairModule) else module.module
        state = gathered_state_dict(inner.encoder.model, full=full)
        if rank == 0:
            self.encoder.save(out_dir, state_dict=state)
