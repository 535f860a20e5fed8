"""Bag-of-words pre-training: a text's representation learns to predict the text's own terms.

The stage runs once per backbone x paradigm before the grid (`bow.enabled`, `retriever.sweep.pretrain`) on a corpus of
passages, with the paradigm's own representation:

- sparse: each term's activation (the representation before log1p) is pushed up for the text's terms and to zero
  for every other term (balanced: mean softplus(-z) over the text's terms + mean softplus(z) - ln 2 over the
  rest). A random-init LM head activates most of the vocabulary at every position; after this stage a text's
  vector holds its own terms, so fine-tuning starts from lexical matching.
- dense: the pooled vector, through the (tied) LM head and divided by `bow.temperature`, predicts the text's terms
  with a softmax cross-entropy averaged over its distinct terms ("Drop your decoder", Ma et al., SIGIR 2024).

The product is what fine-tuning continues, as MNTP's: the whole model (`backbone.init_weights`) or the LoRA adapter
(`backbone.init_adapter`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from retriever.config import BudgetConfig, ExperimentConfig
from retriever.data.catalog import corpus_texts
from retriever.errors import SettingError
from retriever.losses import LossOutput
from retriever.models.encoders import RetrievalEncoder, SparseEncoder, build_encoder
from retriever.registry import Registry
from retriever.train.pretraining import PretrainingTask

LN2 = math.log(2.0)

# paradigm -> loss(encoder, hidden states, attention mask, term targets [texts, vocab] in {0, 1})
BOW_OBJECTIVES: Registry[Callable[..., torch.Tensor]] = Registry("bag-of-words objective")


@BOW_OBJECTIVES.register("sparse")
def sparse_bow_loss(
    encoder: RetrievalEncoder, hidden: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor, temperature: float
) -> torch.Tensor:
    if not isinstance(encoder, SparseEncoder):
        raise TypeError(f"the sparse bag-of-words objective needs a sparse encoder, got {type(encoder).__name__}")
    activation = encoder.term_activations(hidden, mask).float()
    present = targets.sum(dim=1).clamp(min=1.0)
    absent = (targets.shape[1] - targets.sum(dim=1)).clamp(min=1.0)
    own = (F.softplus(-activation) * targets).sum(dim=1) / present
    other = ((F.softplus(activation) - LN2) * (1 - targets)).sum(dim=1) / absent  # 0 where the activation is 0
    return (own + other).mean()


@BOW_OBJECTIVES.register("dense")
def dense_bow_loss(
    encoder: RetrievalEncoder, hidden: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor, temperature: float
) -> torch.Tensor:
    pooled = encoder.represent(hidden, mask)
    logits = encoder.lm.get_output_embeddings()(pooled).float() / temperature
    log_probs = F.log_softmax(logits, dim=-1)
    return (-(log_probs * targets).sum(dim=1) / targets.sum(dim=1).clamp(min=1.0)).mean()


def term_targets(input_ids: torch.Tensor, mask: torch.Tensor, vocab_size: int, special: list[int]) -> torch.Tensor:
    """[texts, vocab] with 1 for every term a text contains (special tokens and padding excluded)."""
    targets = torch.zeros(input_ids.shape[0], vocab_size)
    targets.scatter_(1, input_ids, mask.to(targets.dtype))
    if special:
        targets[:, special] = 0.0
    return targets


class BowModule(nn.Module):
    def __init__(self, encoder: RetrievalEncoder, temperature: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.temperature = temperature
        self.objective = BOW_OBJECTIVES.get(encoder.paradigm)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder.hidden_states(input_ids, attention_mask)
        return self.objective(self.encoder, hidden, attention_mask, targets, self.temperature)


def bow_stage_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """`bow.steps`, `bow.batch_size` and `bow.lr` replace the retrieval budget, batch and learning rate."""
    stage = cfg.model_copy(deep=True)
    stage.budget = BudgetConfig(max_steps=cfg.bow.steps)
    stage.train.batch_size = cfg.bow.batch_size
    stage.train.lr = cfg.bow.lr
    return stage


def bow_table(cfg: ExperimentConfig) -> pa.Table:
    texts = list(corpus_texts(cfg.bow.corpus, cfg))
    if len(texts) < cfg.bow.batch_size:
        raise SettingError(
            f"bow.corpus={cfg.bow.corpus!r} has {len(texts)} texts, fewer than bow.batch_size={cfg.bow.batch_size}; "
            "use a larger corpus or a smaller batch"
        )
    return pa.table({"text": pa.array(texts, type=pa.string())})


class BowTask(PretrainingTask):
    name = "bow"
    product = "bow"

    def build(self) -> nn.Module:
        from retriever.flops import StepCostModel

        self.encoder = build_encoder(self.cfg.backbone, self.cfg.encoder)
        tokenizer = self.encoder.tokenizer
        self.special = sorted(
            {t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None}
        )
        self.vocab_size = int(self.encoder.lm.config.vocab_size)
        self.cost_model = StepCostModel.for_bow(self.cfg, self.encoder.lm.config)
        return BowModule(self.encoder, self.cfg.bow.temperature)

    def collate(self, rows: Mapping[str, Any], epoch: int) -> dict[str, torch.Tensor]:
        batch = self.encoder.tokenize(
            list(rows["text"]), "passage", pad_to_max_length=self.cfg.train.pad_to_max_length
        )
        ids, mask = batch["input_ids"], batch["attention_mask"]
        targets = term_targets(ids, mask, self.vocab_size, self.special)
        return {"input_ids": ids, "attention_mask": mask, "targets": targets}

    def step_cost(self, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        texts, length = batch["input_ids"].shape
        return self.cost_model.bow_step_flops(texts=texts, length=length), texts * length

    def loss(self, module: nn.Module, batch: dict[str, torch.Tensor], step: int) -> LossOutput:
        return self.named_loss(module(**batch))

    def export(self, module: nn.Module, out_dir: Path, rank: int) -> None:
        """The LoRA adapter, or with full fine-tuning the whole model plus its tokenizer (as MNTP's product)."""
        from retriever.models.backbone import tokenizer_reference
        from retriever.models.tokenizers import load_tokenizer
        from retriever.train.retrieval import save_backbone

        inner = module if isinstance(module, BowModule) else module.module
        tokenizer = load_tokenizer(tokenizer_reference(self.cfg.backbone.name, self.cfg.backbone.tokenizer))
        save_backbone(inner.encoder.model, tokenizer, out_dir, rank)
