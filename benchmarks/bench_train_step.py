"""One training step: this project's step vs sentence-transformers (dense) and a naive PyTorch loop (sparse).

Every method trains the same tiny random Llama (one of the tiny presets, same seeded weights, same word-level
tokenizer of the synthetic corpus) on the same synthetic training examples, with the settings of
configs/quickstart.yaml for that backbone's CL cell (its `sweep.overrides` applied): InfoNCE over in-batch and hard
negatives, that cell's batch of queries x (1 positive + its hard negatives) per step and its query and passage
lengths, full fine-tuning, AdamW at the config's `train.lr` and schedule (the learning rate does not change the
cost of a step), fp32 on the CPU with the same torch thread count:

- ours: the project's training task (`TASKS.get("retrieval")(cfg, planned).build()`, `.collate`, `.step_cost`,
  `.loss`, backward, `torch.optim.AdamW` step), batches from `LocalContext.batches` as `run_loop` draws them; and,
  for reference, the same with `train.pad_to_max_length=false` (each batch padded to its longest text);
- dense baseline: `SentenceTransformerTrainer` with `MultipleNegativesRankingLoss` over (query, positive, negative)
  columns on `SentenceTransformer([Transformer(model dir), Pooling(dim, "mean")])`, the same weights and tokenizer,
  the same per-task max lengths (query, document); it runs the decoder causally (its default for Llama; ours is
  bidirectional), pads each column to its longest text (ours pads to the max length: fixed shapes), and uses the
  trainer's default AdamW implementation (fused);
- sparse baseline (sentence-transformers' sparse trainer needs a masked-LM model, which Llama is not): a plain
  PyTorch loop over the same bidirectional backbone and the same batches that materialises the LM-head logits
  [batch, length, vocabulary] and pools them as the paper's code and Tevatron do,
  max over positions of log(1 + relu(logits)) x mask, then InfoNCE + the FLOPS regularizer as ours.

Steps of the methods of a row run interleaved (baseline step, our step, ...), so that load from other processes
affects all alike; the first `--warmup` steps are excluded and the median step time is reported. A step is
everything from drawing the batch to the end of the optimizer step (tokenization included; for the trainer, the
interval between two `on_step_end` callbacks). FLOPs/step is the project's analytic counter
(`retriever.flops.StepCostModel.step_flops`, as `RetrievalTask.step_cost` computes it) at each method's padded
shapes: the model's useful matmul FLOPs, not what a method executes (the naive head's backward runs two more
[tokens x hidden] x [hidden x vocabulary] products that ours avoids, and the counter does not credit them). Achieved
FLOP/s is shown as a fraction of this machine's fp32 matmul peak (best of several 2048x2048 `torch.mm` with the
same thread count).

Run from the repository root:  PYTHONPATH=. python benchmarks/bench_train_step.py [--backbones tiny-l] [--threads 1]
(needs ``pip install 'sentence-transformers[train]==6.2.0'``: the trainer needs `datasets`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from retriever.config import ExperimentConfig, cell_settings, load_config
from retriever.data.catalog import resolve_references
from retriever.data.collate import TrainingBatch
from retriever.data.examples import read_training_examples, sample_negatives
from retriever.flops import StepCostModel
from retriever.models.backbone import load_configured_backbone
from retriever.models.bidirectional import decoder_states, set_bidirectional
from retriever.train.context import LocalContext
from retriever.train.loop import lr_factor
from retriever.train.retrieval import RetrievalTask
from retriever.train.trainer import TASKS, planned_steps_for, prepare_training_data, run_dir_for

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "quickstart.yaml"


@dataclass
class Row:
    backbone: str
    paradigm: str
    method: str
    threads: int
    times: list[float]  # seconds of every timed step
    flops: float  # counted FLOPs per step (mean over the timed steps' batches)
    tokens: float  # padded tokens per step (mean)
    queries: int
    texts: int
    baseline: bool = False

    @property
    def seconds(self) -> float:
        return statistics.median(self.times)


def matmul_peak(threads: int, size: int = 2048, repeats: int = 10) -> float:
    """fp32 FLOP/s of the best of `repeats` [size x size] x [size x size] products on `threads` threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def experiment_config(args: argparse.Namespace, backbone: str, paradigm: str, scratch: Path) -> ExperimentConfig:
    """The quickstart cell (backbone, paradigm, cl) trained in this process, writing under `scratch`."""
    overrides = [f"train.output_dir={scratch}", "tracking.enabled=false", "train.num_workers=0"]
    cfg = load_config(args.config, overrides)
    return resolve_references(cell_settings(cfg, backbone, paradigm, "cl"))


# --------------------------------------------------------------------------------------------------------- ours


class Ours:
    """The project's training step: what `retriever.train.loop.run_loop` does per step (no checkpoint, no report)."""

    def __init__(self, cfg: ExperimentConfig, table: Any) -> None:
        self.cfg = cfg
        self.planned = planned_steps_for(cfg)
        self.task: RetrievalTask = TASKS.get("retrieval")(cfg, self.planned)
        torch.manual_seed(cfg.train.seed)
        self.module = self.task.build()
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.context = LocalContext(table, run_dir_for(cfg))
        self.rows = self.batches()
        self.step_index = 0
        self.times: list[float] = []
        self.flops: list[float] = []
        self.tokens: list[int] = []

    def batches(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(epoch, rows) of every step, epoch after epoch, as the loop draws them."""
        epoch = 0
        while True:
            for rows in self.context.batches(epoch, self.cfg.train.batch_size, self.cfg.train.seed):
                yield epoch, rows
            epoch += 1

    def next_batch(self) -> TrainingBatch:
        epoch, rows = next(self.rows)
        return self.task.collate(rows, epoch)

    def step(self) -> None:
        start = time.perf_counter()
        epoch, rows = next(self.rows)
        batch = self.task.collate(rows, epoch)
        flops, tokens = self.task.step_cost(batch)
        fraction = min(1.0, self.step_index / self.planned)
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.train.lr * lr_factor(fraction, self.cfg.train.warmup_ratio)
        out = self.task.loss(self.module, batch, self.step_index)
        out.total.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        out.floats()  # the loop's one sync per step, for its metrics
        self.step_index += 1
        self.times.append(time.perf_counter() - start)
        self.flops.append(flops)
        self.tokens.append(tokens)


# ---------------------------------------------------------------------------------------------- sparse baseline


class NaiveSparse:
    """A plain PyTorch SPLADE-style step over the same bidirectional backbone, with the full-logits head."""

    def __init__(self, cfg: ExperimentConfig, ours: Ours) -> None:
        self.cfg = cfg
        self.ours = ours  # for its batches (same collator, same tokens) and its FLOP counter
        tokenizer = ours.task.encoder.tokenizer
        self.lm = load_configured_backbone(cfg.backbone, len(tokenizer))  # the same seeded weights as ours
        set_bidirectional(self.lm, True)
        self.lm.train()
        self.optimizer = torch.optim.AdamW(self.lm.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.scale = self.lm.config.hidden_size**-0.25
        self.ramp = max(1, int(ours.planned * cfg.loss.flops_ramp_fraction))
        self.rows = ours.batches()
        self.step_index = 0
        self.times: list[float] = []

    def encode(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = tokens["attention_mask"]
        hidden = decoder_states(self.lm, tokens["input_ids"], mask, True)
        logits = self.lm.lm_head(hidden) * self.scale  # [batch, length, vocabulary]
        return torch.max(torch.log1p(torch.relu(logits)) * mask.unsqueeze(-1), dim=1).values

    @staticmethod
    def flops_reg(reps: torch.Tensor) -> torch.Tensor:
        return (reps.abs().mean(dim=0) ** 2).sum()

    def loss(self, batch: TrainingBatch, step: int) -> torch.Tensor:
        queries, passages = self.encode(batch.queries), self.encode(batch.passages)
        scores = queries @ passages.T
        target = torch.arange(scores.shape[0]) * batch.group_size
        ramp = min(1.0, (step / self.ramp) ** 2)
        loss = self.cfg.loss
        return (
            F.cross_entropy(scores, target)
            + loss.flops_query * ramp * self.flops_reg(queries)
            + loss.flops_passage * ramp * self.flops_reg(passages)
        )

    def step(self) -> None:
        start = time.perf_counter()
        epoch, rows = next(self.rows)
        batch = self.ours.task.collate(rows, epoch)
        fraction = min(1.0, self.step_index / self.ours.planned)
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.train.lr * lr_factor(fraction, self.cfg.train.warmup_ratio)
        loss = self.loss(batch, self.step_index)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss.item()
        self.step_index += 1
        self.times.append(time.perf_counter() - start)


def check_same_loss(ours: Ours, naive: NaiveSparse, step: int = 100) -> float:
    """Both sparse methods give the same loss on the same batch before training (a step past the ramp)."""
    batch = ours.next_batch()
    with torch.no_grad():
        mine = float(ours.task.loss(ours.module, batch, step).total)
        theirs = float(naive.loss(batch, step))
    error = abs(mine - theirs) / max(1e-12, abs(theirs))
    assert error < 1e-4, f"ours {mine} vs naive {theirs}"
    return error


def run_sparse(cfg: ExperimentConfig, ours: list[Ours], args: argparse.Namespace) -> tuple[list[float], float]:
    """Naive and our steps interleaved; (naive step times, counted FLOPs per naive step)."""
    naive = NaiveSparse(cfg, ours[0])
    error = check_same_loss(ours[0], naive)
    print(f"    same weights; loss of ours vs naive on one batch differs by {error:.1e} (relative)", file=sys.stderr)
    for method in ours:
        method.rows = method.batches()  # every method starts at the first batch
    naive.rows = ours[0].batches()
    for _ in range(args.warmup + args.steps):
        naive.step()
        for method in ours:
            method.step()
    return naive.times, statistics.fmean(ours[0].flops[args.warmup :])  # the same batches as ours[0]


# ----------------------------------------------------------------------------------------------- dense baseline


def st_dataset(cfg: ExperimentConfig, table: Any, docs: Any):
    """(query, positive, negative_1..n) texts: the negatives our collator draws in epoch 0."""
    import datasets

    negatives = cfg.loss.num_negatives
    columns: dict[str, list[str]] = {"query": [], "positive": []}
    columns.update({f"negative_{i + 1}": [] for i in range(negatives)})
    for row in table.to_pylist():
        key = f"{row['query_id']}\x1f{row['positive_id']}"
        picks = sample_negatives(list(row["negative_ids"]), negatives, 0, cfg.train.seed, key)
        columns["query"].append(str(row["query"]))
        columns["positive"].append(docs[row["positive_id"]])
        for i, pick in enumerate(picks):
            columns[f"negative_{i + 1}"].append(docs[row["negative_ids"][pick]])
    return datasets.Dataset.from_dict(columns)


class ShapeRecorder:
    """Wraps the trainer's data collator to record every batch's padded column shapes."""

    def __init__(self, collator: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
        self.collator = collator
        self.shapes: list[dict[str, tuple[int, int]]] = []

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(features)
        ids = {k.removesuffix("_input_ids"): tuple(v.shape) for k, v in batch.items() if k.endswith("_input_ids")}
        self.shapes.append(ids)
        return batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self.collator, name)


def counted_flops(cost: StepCostModel, columns: dict[str, tuple[int, int]]) -> int:
    """The counter's FLOPs of a step whose columns are padded separately: the encoding of each column (half of a
    step of two such columns without its scoring) plus the InfoNCE scoring of the whole batch."""

    def encoding(texts: int, length: int) -> int:
        step = cost.step_breakdown(queries=texts, query_length=length, passages_per_query=1, passage_length=length)
        return (step.total - step.component("scoring")) // 2

    queries = columns["query"][0]
    per_query = len(columns) - 1
    scoring = cost.step_breakdown(
        queries=queries, query_length=1, passages_per_query=per_query, passage_length=1
    ).component("scoring")
    return sum(encoding(*shape) for shape in columns.values()) + scoring


def run_dense(
    cfg: ExperimentConfig, table: Any, ours: list[Ours], args: argparse.Namespace, scratch: Path
) -> tuple[list[float], float, float]:
    """The trainer's steps with ours interleaved; (its step times, counted FLOPs and padded tokens per step)."""
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import PrinterCallback, TrainerCallback

    encoder = ours[0].task.encoder  # not trained yet
    model_dir = scratch / f"hf-{cfg.backbone.name}"
    encoder.lm.save_pretrained(model_dir)
    encoder.tokenizer.save_pretrained(model_dir)
    transformer = Transformer(
        str(model_dir), query_length=cfg.encoder.query_max_length, document_length=cfg.encoder.passage_max_length
    )
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    model = SentenceTransformer(modules=[transformer, pooling], device="cpu")
    mine = dict(encoder.lm.get_decoder().named_parameters())
    theirs = dict(transformer.model.named_parameters())
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), "weights differ"

    negatives = [f"negative_{i + 1}" for i in range(cfg.loss.num_negatives)]
    timer = _StepTimer(TrainerCallback, lambda: [method.step() for method in ours])
    training = SentenceTransformerTrainingArguments(
        output_dir=str(scratch / f"st-{cfg.backbone.name}"),
        per_device_train_batch_size=cfg.train.batch_size,
        max_steps=args.warmup + args.steps,
        learning_rate=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        warmup_steps=cfg.train.warmup_ratio,  # a float below 1 is a ratio of max_steps (transformers 5)
        lr_scheduler_type="linear",
        router_mapping={"query": "query", "positive": "document", **dict.fromkeys(negatives, "document")},
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_drop_last=True,
        seed=cfg.train.seed,
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=training,
        train_dataset=st_dataset(cfg, table, ours[0].task.docs),
        loss=MultipleNegativesRankingLoss(model),
        callbacks=[timer.callback],
    )
    trainer.remove_callback(PrinterCallback)  # it prints the final train metrics to stdout
    recorder = ShapeRecorder(trainer.data_collator)
    trainer.data_collator = recorder
    trainer.train()
    assert len(timer.times) == args.warmup + args.steps == len(ours[0].times), (len(timer.times), len(ours[0].times))
    theirs_flops = statistics.fmean(counted_flops(ours[0].task.cost_model, s) for s in recorder.shapes)
    theirs_tokens = statistics.fmean(sum(a * b for a, b in s.values()) for s in recorder.shapes)
    return timer.times, theirs_flops, theirs_tokens


class _StepTimer:
    """Times the trainer's steps (between consecutive `on_step_end`) and runs `between` after each of them."""

    def __init__(self, base: type, between: Callable[[], None]) -> None:
        self.times: list[float] = []
        self.mark: float | None = None
        timer = self

        class Callback(base):
            def on_step_begin(self, args, state, control, **kwargs):
                if timer.mark is None:
                    timer.mark = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.times.append(time.perf_counter() - timer.mark)
                between()
                timer.mark = time.perf_counter()

        self.callback = Callback()


# -------------------------------------------------------------------------------------------------------- main


OURS = "**ours: RetrievalTask step**"
OURS_DYNAMIC = "ours, `train.pad_to_max_length=false`"


def bench(backbone: str, paradigm: str, threads: int, args: argparse.Namespace, scratch: Path) -> list[Row]:
    torch.set_num_threads(threads)
    cfg = experiment_config(args, backbone, paradigm, scratch)
    table = read_training_examples(prepare_training_data(cfg))
    # Ours as the quickstart trains (fixed shapes), then, for reference, padded to each batch's longest text.
    ours = [Ours(cfg, table)]
    if args.dynamic:
        dynamic = cfg.model_copy(update={"train": cfg.train.model_copy(update={"pad_to_max_length": False})})
        ours.append(Ours(dynamic, table))
    queries = cfg.train.batch_size
    texts = queries * (2 + cfg.loss.num_negatives)  # the queries and their 1 + n passages
    skip = args.warmup
    if paradigm == "sparse":
        base_times, base_flops = run_sparse(cfg, ours, args)
        base_tokens = statistics.fmean(ours[0].tokens[skip:])
        base_name = "naive PyTorch loop, [B, L, V] logits"
    else:
        with contextlib.redirect_stdout(sys.stderr):  # the trainer's (and DeepSpeed's import) messages
            base_times, base_flops, base_tokens = run_dense(cfg, table, ours, args, scratch)
        base_name = "sentence-transformers Trainer + MNRL"
    rows = [
        Row(backbone, paradigm, base_name, threads, base_times[skip:], base_flops, base_tokens, queries, texts, True)
    ]
    for name, method in zip((OURS, OURS_DYNAMIC), ours):
        flops, tokens = statistics.fmean(method.flops[skip:]), statistics.fmean(method.tokens[skip:])
        rows.append(Row(backbone, paradigm, name, threads, method.times[skip:], flops, tokens, queries, texts))
    line = ", ".join(f"{row.method.strip('*')} {1e3 * row.seconds:.0f}" for row in rows)
    print(f"    ms/step: {line} (load average {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
    if args.profile:
        profile_step(ours[0])
    return rows


def profile_step(ours: Ours, top: int = 12) -> None:
    """Where one of our steps spends its time: the operators with the most self CPU time."""
    from torch.profiler import profile

    with profile() as prof:
        ours.step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"    profile of one step of ours ({total / 1e3:.0f} ms of operators):", file=sys.stderr)
    for event in events[:top]:
        share = 100 * event.self_cpu_time_total / total
        print(f"      {event.key[:60]:60s} {event.self_cpu_time_total / 1e3:8.1f} ms {share:5.1f} %", file=sys.stderr)


def print_table(rows: list[Row], peaks: dict[int, float]) -> None:
    print(
        "\n| backbone | paradigm | method | threads | ms/step | queries/s | texts/s | speed-up vs baseline "
        "| tokens/step | FLOPs/step | GFLOP/s | % of peak |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        base = next(
            r
            for r in rows
            if r.baseline and (r.backbone, r.paradigm, r.threads) == (row.backbone, row.paradigm, row.threads)
        )
        rate = row.flops / row.seconds
        share = 100 * rate / peaks[row.threads]
        print(
            f"| {row.backbone} | {row.paradigm} | {row.method} | {row.threads} | {1e3 * row.seconds:.0f} "
            f"| {row.queries / row.seconds:.1f} | {row.texts / row.seconds:.0f} | {base.seconds / row.seconds:.2f}x "
            f"| {row.tokens:.0f} | {row.flops / 1e9:.1f} G | {rate / 1e9:.1f} | {share:.0f} % |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--backbones", nargs="+", default=["tiny-s", "tiny-m", "tiny-l"])
    parser.add_argument("--paradigms", nargs="+", default=["dense", "sparse"], choices=["dense", "sparse"])
    parser.add_argument("--threads", nargs="+", type=int, default=None, help="torch thread counts (default: 1, all)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument(
        "--no-dynamic", dest="dynamic", action="store_false", help="skip ours with train.pad_to_max_length=false"
    )
    parser.add_argument("--profile", action="store_true", help="print where one step of ours spends its time")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    threads = args.threads or sorted({1, torch.get_num_threads(), cores})
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import sentence_transformers
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    print(
        f"{cores} CPU cores, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"sentence-transformers {sentence_transformers.__version__}; config {args.config.name} "
        f"({args.warmup} warm-up + {args.steps} timed steps per method, median shown); "
        f"load average at start {os.getloadavg()[0]:.2f}"
    )
    rows: list[Row] = []
    peaks: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as tmp:
        scratch = Path(tmp)
        for count in threads:
            peaks[count] = matmul_peak(count)
            print(f"{count} thread(s): fp32 matmul peak {peaks[count] / 1e9:.1f} GFLOP/s", file=sys.stderr)
            for backbone in args.backbones:
                for paradigm in args.paradigms:
                    print(f"  {backbone} {paradigm}, {count} thread(s)", file=sys.stderr, flush=True)
                    rows.extend(bench(backbone, paradigm, count, args, scratch))
            peaks[count] = max(peaks[count], matmul_peak(count))
    print(
        "fp32 matmul peak (2048x2048 torch.mm, best of 10): "
        + ", ".join(f"{peaks[c] / 1e9:.1f} GFLOP/s with {c} thread(s)" for c in threads)
    )
    rows.sort(key=lambda r: (args.backbones.index(r.backbone), args.paradigms.index(r.paradigm), r.threads))
    print_table(rows, peaks)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
