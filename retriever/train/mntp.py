"""MNTP: masked next-token prediction, the optional bidirectional adaptation before retrieval fine-tuning.

Texts are tokenized, concatenated and cut into blocks of `mntp.max_length`; 20% of the tokens are selected, of
which 80% become the mask token ("_"), 10% a random token and 10% stay; with bidirectional attention the selected
token at position i is predicted from the state at position i-1 (the causal LM's shifted head), as in LLM2Vec.
Only the selected positions go through the LM head. The product is a LoRA adapter that fine-tuning continues
(`backbone.init_adapter`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from retriever.config import BudgetConfig, ExperimentConfig
from retriever.data.catalog import corpus_texts
from retriever.errors import SettingError
from retriever.losses import LossOutput
from retriever.models.backbone import load_configured_backbone, tokenizer_reference
from retriever.models.bidirectional import check_supported, decoder_states, set_bidirectional
from retriever.models.lora import apply_lora, base_model, load_adapter
from retriever.models.tokenizers import load_tokenizer
from retriever.train.pretraining import PretrainingTask

MASK_TOKEN = "_"
IGNORE = -100


def mntp_stage_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The training settings of the MNTP stage: `mntp.steps`, `mntp.batch_size` and `mntp.lr` replace the
    retrieval budget, batch and learning rate (the loop reads only `budget` and `train`)."""
    stage = cfg.model_copy(deep=True)
    stage.budget = BudgetConfig(max_steps=cfg.mntp.steps)
    stage.train.batch_size = cfg.mntp.batch_size
    stage.train.lr = cfg.mntp.lr
    return stage


def pack_blocks(texts: Iterator[str], tokenizer: Any, block: int, add_bos: bool) -> list[list[int]]:
    """Concatenate the token ids of all texts (each ended by EOS) and cut them into full blocks."""
    stream: list[int] = []
    blocks: list[list[int]] = []
    body = block - int(add_bos)
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
        while len(stream) >= body:
            head = [tokenizer.bos_token_id] if add_bos else []
            blocks.append(head + stream[:body])
            stream = stream[body:]
    if not blocks:
        raise SettingError(
            f"the MNTP corpus yields fewer than {block} tokens; use more text or a smaller mntp.max_length"
        )
    return blocks


def mntp_table(cfg: ExperimentConfig) -> pa.Table:
    tokenizer = load_tokenizer(tokenizer_reference(cfg.backbone.name, cfg.backbone.tokenizer))
    blocks = pack_blocks(corpus_texts(cfg.mntp.corpus, cfg), tokenizer, cfg.mntp.max_length, cfg.encoder.add_bos)
    return pa.table({"input_ids": pa.array(blocks, type=pa.list_(pa.int32()))})


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    probability: float,
    mask_id: int,
    vocab_size: int,
    generator: torch.Generator,
    protected: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style corruption: returns (corrupted ids, labels with IGNORE where nothing is predicted)."""
    selectable = torch.ones_like(input_ids, dtype=torch.bool)
    selectable[:, 0] = False  # position 0 has no previous state to predict it from
    if protected is not None:
        selectable &= ~protected
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & selectable
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    roll = torch.rand(input_ids.shape, generator=generator)
    corrupted = input_ids.clone()
    corrupted[chosen & (roll < 0.8)] = mask_id
    random_slots = chosen & (roll >= 0.8) & (roll < 0.9)
    corrupted[random_slots] = torch.randint(vocab_size, input_ids.shape, generator=generator)[random_slots]
    return corrupted, labels


class MntpModule(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.lm = base_model(model)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        attention = torch.ones_like(input_ids)
        hidden = decoder_states(self.lm, input_ids, attention, bidirectional=True)
        # Token i is predicted from the state at i-1.
        targets = labels[:, 1:]
        picked = hidden[:, :-1][targets != IGNORE]
        logits = self.lm.get_output_embeddings()(picked)
        return F.cross_entropy(logits.float(), targets[targets != IGNORE])


class MntpTask(PretrainingTask):
    name = "mntp"
    product = "mntp"

    def build(self) -> nn.Module:
        from retriever.flops import StepCostModel

        cfg = self.cfg
        self.tokenizer = load_tokenizer(tokenizer_reference(cfg.backbone.name, cfg.backbone.tokenizer))
        model = load_configured_backbone(cfg.backbone, len(self.tokenizer))
        check_supported(model.config)
        set_bidirectional(model, True)
        if cfg.backbone.init_adapter:
            model = load_adapter(model, cfg.backbone.init_adapter, trainable=True)
        elif cfg.backbone.lora.enabled:
            model = apply_lora(model, cfg.backbone.lora)
        if cfg.backbone.gradient_checkpointing:
            base_model(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        mask_id = self.tokenizer.convert_tokens_to_ids(MASK_TOKEN)
        self.mask_id = (
            mask_id
            if isinstance(mask_id, int) and mask_id != self.tokenizer.unk_token_id
            else (self.tokenizer.eos_token_id)
        )
        self.vocab_size = int(base_model(model).config.vocab_size)
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        self.module = MntpModule(model)
        self.cost_model = StepCostModel.for_mntp(cfg, base_model(model).config)
        return self.module

    def collate(self, rows: Mapping[str, Any], epoch: int) -> dict[str, torch.Tensor]:
        ids = torch.tensor(np.stack([np.asarray(r, dtype=np.int64) for r in rows["input_ids"]]))
        protected = ids == self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else None
        corrupted, labels = mask_tokens(
            ids,
            probability=self.cfg.mntp.mask_probability,
            mask_id=self.mask_id,
            vocab_size=self.vocab_size,
            generator=self.generator,
            protected=protected,
        )
        return {"input_ids": corrupted, "labels": labels}

    def step_cost(self, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        rows, length = batch["input_ids"].shape
        predicted = int((batch["labels"][:, 1:] != IGNORE).sum())
        return self.cost_model.mntp_step_flops(rows=rows, length=length, predicted=predicted), rows * length

    def loss(self, module: nn.Module, batch: dict[str, torch.Tensor], step: int) -> LossOutput:
        return self.named_loss(module(batch["input_ids"], batch["labels"]))

    def export(self, module: nn.Module, out_dir: Path, rank: int) -> None:
        """The LoRA adapter (continue with `backbone.init_adapter: OUT`); with full fine-tuning, the whole model in
        transformers format plus its tokenizer (continue with `backbone.name: OUT`)."""
        from retriever.train.retrieval import save_backbone

        inner = module if isinstance(module, MntpModule) else module.module
        save_backbone(inner.model, self.tokenizer, out_dir, rank)
