"""`mine`: queries → first-stage candidates → pool minus positives → teacher scores → training-example shards.

The output folder holds ``part-NNNNN.parquet`` shards (the training-examples schema of `retriever.data.examples`,
``queries_per_shard`` queries each, in query order) and ``manifest.json``: the settings, the inputs (files with
their sha256, dataset ids, the BM25 index, encoder or teacher), and per finished shard its row count, the sha256
of its query plan and of its file. Shards are written whole (temporary file, then rename) and recorded in the
manifest after; ``complete`` turns true when every planned shard is there. A job started again skips the shards
whose file and plan match the manifest and redoes any other (a corrupt, partial or stray file), so the result has
the rows of an uninterrupted run. Settings that change the output must match the manifest's: mining into a
folder made with other settings is refused (``overwrite`` starts over).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from retriever.checksums import sha256_file
from retriever.config import ConfigError, MineConfig, RankRange, flatten
from retriever.data.examples import (
    MINED_MANIFEST,
    MINED_MANIFEST_KIND,
    TeacherScores,
    example_columns,
    examples_table,
    read_qrels,
    read_queries,
    read_teacher_scores,
)
from retriever.errors import DataFormatError, IntegrityError, SettingError
from retriever.mining.first_stage import RunCandidates, candidate_pool
from retriever.outputs import atomic_directory, atomic_file, output_lock, remove_partials, write_text_atomic

logger = logging.getLogger(__name__)

MANIFEST = MINED_MANIFEST
MANIFEST_KIND = MINED_MANIFEST_KIND
FORMAT = 1
PLAN = "_plan.parquet"
BM25_DIR = "_bm25"
# Settings that decide how fast a job runs, not what it writes: they may change between a stop and a restart.
EXECUTION_KEYS = (
    "out",
    "workers",
    "cpus_per_worker",
    "queries_per_batch",
    "max_queries",
    "teacher.batch_size",
    "teacher.actors",
    "teacher.cpus_per_actor",
    "teacher.gpus_per_actor",
    "teacher.torch_threads",
)
PLAN_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.int32()),
        pa.field("position", pa.int64()),
        pa.field("query_id", pa.string()),
        pa.field("query", pa.string()),
        pa.field("positive_ids", pa.list_(pa.string())),
        pa.field("candidate_ids", pa.list_(pa.string())),
    ]
)


@dataclass
class MiningReport:
    """What a `mine` call did."""

    out: Path
    shards: int = 0
    shards_reused: int = 0
    shards_written: int = 0
    shards_redone: int = 0  # files found corrupt, partial or not matching the plan
    queries: int = 0
    rows: int = 0
    rows_without_negatives: int = 0  # (query, positive) pairs left out: no negative after filtering
    negatives: int = 0
    false_negatives_dropped: int = 0
    pairs_scored: int = 0  # (query, passage) pairs the cross-encoder scored
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "out": str(self.out)}


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def output_settings(cfg: MineConfig) -> dict[str, Any]:
    """The settings that decide the output (compared on a restart)."""
    flat = flatten(cfg)
    return {key: value for key, value in flat.items() if key not in EXECUTION_KEYS}


# --------------------------------------------------------------------------------------------------------------
# the job


def mine(cfg: MineConfig, *, overwrite: bool = False, base: Path | None = None) -> MiningReport:
    """Mine training examples into ``cfg.out`` (see the module docstring); relative paths are read from ``base``
    (default: the working directory)."""
    started = time.perf_counter()
    cfg = _absolute(cfg, base or Path.cwd())
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        report = MiningReport(out=out)
        inputs = _Inputs(cfg)  # every input checked before anything of the folder changes
        if overwrite:
            _clear(out)
        remove_partials(out / MANIFEST)  # a manifest update cut short by a stopped job
        manifest = _open_manifest(out, cfg, inputs.record)
        plan = _write_plan(cfg, inputs, manifest, report)
        if plan.pending:
            writer = _ShardWriter(out, cfg, manifest, plan, inputs.teacher_scores, report)
            for batch in _execute(cfg, inputs, out / PLAN):
                writer.add(batch)
            writer.finish()
        (out / PLAN).unlink(missing_ok=True)
        _finish_manifest(out, manifest, plan, report)
    report.seconds = time.perf_counter() - started
    return report


def _absolute(cfg: MineConfig, base: Path) -> MineConfig:
    data = cfg.model_dump()

    def resolve(value: str | None) -> str | None:
        return str((base / value).resolve()) if value else value

    data["out"] = resolve(cfg.out)
    for key in ("queries", "qrels"):
        data[key] = resolve(data[key])
    for key in ("index", "encoder", "run"):
        data["first_stage"][key] = resolve(data["first_stage"][key])
    data["teacher"]["file"] = resolve(data["teacher"]["file"])
    if (base / cfg.teacher.model).exists():  # else a Hugging Face hub id
        data["teacher"]["model"] = resolve(cfg.teacher.model)
    return MineConfig.model_validate(data)


def _clear(out: Path) -> None:
    for path in out.iterdir():
        if path.name.startswith("part-") or path.name in (MANIFEST, PLAN):
            path.unlink()


# --------------------------------------------------------------------------------------------------------------
# inputs


class _Inputs:
    """The job's inputs, checked and fingerprinted before anything is written."""

    def __init__(self, cfg: MineConfig) -> None:
        from retriever.data.catalog import resolve_dataset
        from retriever.data.sources import load_source

        self.cfg = cfg
        self.record: dict[str, Any] = {}
        self.dataset = resolve_dataset(cfg.dataset, _synthetic_settings())
        self.corpus = resolve_dataset(cfg.corpus, _synthetic_settings()) if cfg.corpus else self.dataset
        source = load_source(self.dataset)
        self.record["dataset"] = cfg.dataset
        self.record["corpus"] = cfg.corpus or cfg.dataset
        if cfg.queries is not None:
            self.queries: Mapping[str, str] = read_queries(_existing(cfg.queries, "queries"))
            self.record["queries"] = _file_record(cfg.queries)
        else:
            self.queries = dict(source.queries())
        if cfg.qrels is not None:
            judged = read_qrels(_existing(cfg.qrels, "qrels"))
            self.positives = {qid: [d for d, grade, _ in rows if grade > 0] for qid, rows in judged.items()}
            self.where = {qid: rows[0][2] for qid, rows in judged.items()}
            self.record["qrels"] = _file_record(cfg.qrels)
        else:
            self.positives = {qid: [d for d, g in docs.items() if g > 0] for qid, docs in source.qrels().items()}
            self.where = {qid: f"qrels of {cfg.dataset}" for qid in self.positives}
        self.positives = {qid: docs for qid, docs in self.positives.items() if docs}
        if not self.positives:
            raise DataFormatError(f"{cfg.qrels or cfg.dataset}: no query has a positive judgment; nothing to mine")
        self.run: RunCandidates | None = None
        self.first_stage_options: dict[str, Any] = {}
        first = cfg.first_stage
        if first.kind == "run":
            self.run = RunCandidates(_existing(first.run, "first_stage.run"))
            self.record["first_stage"] = {"kind": "run", "run": _file_record(first.run)}
        elif first.kind == "bm25":
            index = Path(first.index) if first.index else Path(cfg.out) / BM25_DIR
            self.record["first_stage"] = {"kind": "bm25", **_bm25_index(index, self.corpus)}
            self.first_stage_options = {"index": str(index)}
        else:
            from retriever.encoding.encoder import EncoderInfo
            from retriever.index.shards import SHARDS_FILE

            info = EncoderInfo.read(first.encoder)
            shards_file = Path(first.index) / SHARDS_FILE
            self.record["first_stage"] = {
                "kind": "encoder",
                "encoder": str(first.encoder),
                "encoder_sha256": info.fingerprint,
                "index": _file_record(str(shards_file)) if shards_file.is_file() else str(first.index),
            }
            self.first_stage_options = {
                "encoder": str(first.encoder),
                "index": str(first.index),
                "query_max_length": first.query_max_length,
            }
        teacher = cfg.teacher
        self.teacher_scores: TeacherScores | None = None
        self.teacher_file: Path | None = None
        if teacher.kind == "file":
            self.teacher_file = _existing(teacher.file, "teacher.file")
            self.teacher_scores = read_teacher_scores(self.teacher_file)
            self.record["teacher"] = {"kind": "file", "file": _file_record(teacher.file)}
        elif teacher.kind == "cross_encoder":
            self.record["teacher"] = {"kind": "cross_encoder", **_model_record(teacher.model)}
        else:
            self.record["teacher"] = {"kind": "none"}

    @property
    def teacher_options(self) -> dict[str, Any] | None:
        t = self.cfg.teacher
        if t.kind != "cross_encoder":
            return None
        return {
            "model": t.model,
            "max_length": t.max_length,
            "batch_size": t.batch_size,
            "torch_threads": t.torch_threads,
        }


def _synthetic_settings() -> Any:
    """`synthetic/train` and `synthetic/test` name the default synthetic benchmark (the quickstart's)."""
    from retriever.config import ExperimentConfig

    return ExperimentConfig()


def _existing(path: str | None, what: str) -> Path:
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(f"{what}: {path}: no such file")
    return Path(path)


def _file_record(path: str | None) -> dict[str, str]:
    assert path is not None
    return {"path": str(path), "sha256": sha256_file(path)}


def _model_record(model: str) -> dict[str, Any]:
    folder = Path(model)
    if not folder.is_dir():
        return {"model": model}  # a hub id: the cache's revision is what transformers loads
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(folder)}\0{sha256_file(path)}\n".encode())
    return {"model": str(folder), "sha256": digest.hexdigest()}


def _bm25_index(index: Path, corpus: str) -> dict[str, Any]:
    """Build the corpus's BM25 index at ``index`` when it is not there; check it and describe it."""
    from retriever.bm25 import INDEX_FILE, Bm25Index, verify_index
    from retriever.data.sources import load_source

    if not (index / INDEX_FILE).is_file():
        logger.info("building the BM25 index of %s in %s", corpus, index)
        with atomic_directory(index, what="the BM25 index") as tmp:
            Bm25Index(load_source(corpus).docs()).save(tmp)
            meta = json.loads((tmp / INDEX_FILE).read_text(encoding="utf-8"))
            meta["corpus"] = corpus
            (tmp / INDEX_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    meta = verify_index(index)  # every file against its checksum, once, before the actors map them
    if meta.get("corpus", corpus) != corpus:
        raise SettingError(
            f"{index}: a BM25 index of {meta['corpus']!r}, not of the corpus {corpus!r}; point first_stage.index "
            "at another folder"
        )
    return {"index": str(index), "index_sha256": sha256_file(index / INDEX_FILE), "num_docs": meta["num_docs"]}


# --------------------------------------------------------------------------------------------------------------
# manifest and plan


def _open_manifest(out: Path, cfg: MineConfig, inputs: dict[str, Any]) -> dict[str, Any]:
    settings = output_settings(cfg)
    path = out / MANIFEST
    if not path.is_file():
        stray = sorted(p.name for p in out.iterdir() if p.name.startswith("part-"))
        if stray:
            raise SettingError(
                f"{out}: holds {len(stray)} shard files ({stray[0]}…) but no {MANIFEST}; mine into an empty folder "
                "or start over with --overwrite"
            )
        manifest = {
            "kind": MANIFEST_KIND,
            "format": FORMAT,
            "complete": False,
            "settings": settings,
            "inputs": inputs,
            "shards": {},
        }
        write_text_atomic(path, json.dumps(manifest, indent=2) + "\n")
        return manifest
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{path}: unreadable ({exc}); start over with --overwrite") from None
    if manifest.get("kind") != MANIFEST_KIND or manifest.get("format") != FORMAT:
        raise IntegrityError(f"{path}: not a mining manifest of format {FORMAT}; mine into another folder")
    for what, now in (("settings", settings), ("inputs", inputs)):
        before = manifest.get(what, {})
        changed = _differences(before, now)
        if changed:
            raise ConfigError(
                f"{out}: was mined with other {what} ({'; '.join(changed[:5])}); mine into another folder, or start "
                "over with --overwrite"
            )
    return manifest


def _differences(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    a, b = flatten(dict(before)), flatten(dict(now))
    return [
        f"{key}: {a.get(key)!r} then, {b.get(key)!r} now"
        for key in sorted(set(a) | set(b))
        if a.get(key) != b.get(key)
    ]


@dataclass
class _Plan:
    counts: dict[int, int]  # shard → queries
    digests: dict[int, str]  # shard → sha256 of its queries and positives (and a run's candidates)
    pending: set[int]


def _write_plan(cfg: MineConfig, inputs: _Inputs, manifest: dict[str, Any], report: MiningReport) -> _Plan:
    """Assign the queries with a positive to shards, find the shards to (re)do, and write their queries to the plan
    file the executors read (one shard in memory at a time)."""
    out = Path(cfg.out)
    plan = _Plan({}, {}, set())
    recorded = manifest["shards"]
    with pq.ParquetWriter(out / PLAN, PLAN_SCHEMA) as writer:
        rows: list[dict[str, Any]] = []
        digest = hashlib.sha256()

        def close_shard() -> None:
            if not rows:
                return
            shard = rows[0]["shard"]
            plan.counts[shard], plan.digests[shard] = len(rows), digest.hexdigest()
            name = shard_name(shard)
            entry = recorded.get(name)
            if entry is not None and entry.get("plan_sha256") == plan.digests[shard] and _intact(out / name, entry):
                report.shards_reused += 1
            else:
                if entry is not None or (out / name).exists():
                    why = "missing" if not (out / name).exists() else "corrupt, partial or from another plan"
                    logger.warning("%s: %s; mining it again", out / name, why)
                    report.shards_redone += 1
                    recorded.pop(name, None)
                plan.pending.add(shard)
                writer.write_table(pa.Table.from_pylist(rows, schema=PLAN_SCHEMA))

        for position, qid in enumerate(_ordered_queries(inputs)):
            if cfg.max_queries is not None and position >= cfg.max_queries:
                break
            if qid not in inputs.queries:
                raise DataFormatError(
                    f"{inputs.where[qid]}: query id {qid!r} has no text in "
                    f"{cfg.queries or cfg.dataset}; add the query or remove its judgments"
                )
            shard = position // cfg.queries_per_shard
            if rows and rows[0]["shard"] != shard:
                close_shard()
                rows, digest = [], hashlib.sha256()
            positives = inputs.positives[qid]
            candidates = _run_candidates(inputs, qid, positives) if inputs.run is not None else []
            digest.update(json.dumps([qid, inputs.queries[qid], positives, candidates]).encode() + b"\n")
            rows.append(
                {
                    "shard": shard,
                    "position": position,
                    "query_id": qid,
                    "query": inputs.queries[qid],
                    "positive_ids": positives,
                    "candidate_ids": candidates,
                }
            )
        close_shard()
    beyond = sorted({*recorded, *(p.name for p in out.glob("part-*.parquet"))} - set(map(shard_name, plan.counts)))
    if beyond:
        raise SettingError(
            f"{out}: holds shards this job would not write ({', '.join(beyond[:3])}…): it was mined with more "
            "queries (max_queries) than now; raise max_queries again, or start over with --overwrite"
        )
    report.shards = len(plan.counts)
    report.queries = sum(plan.counts.values())
    return plan


def _ordered_queries(inputs: _Inputs) -> Iterator[str]:
    """Query ids with a positive, in the queries' order (then any judged query the queries lack, to be refused)."""
    for qid in inputs.queries:
        if qid in inputs.positives:
            yield qid
    for qid in inputs.positives:
        if qid not in inputs.queries:
            yield qid


def _run_candidates(inputs: _Inputs, qid: str, positives: list[str]) -> list[str]:
    assert inputs.run is not None
    return candidate_pool((docid for docid, _ in inputs.run.ranked(qid)), positives, inputs.cfg.pool_size)


def _index_of(name: str) -> int:
    try:
        return int(name.removeprefix("part-").removesuffix(".parquet"))
    except ValueError:
        return -1


def _intact(path: Path, entry: Mapping[str, Any]) -> bool:
    return path.is_file() and sha256_file(path) == entry.get("sha256")


def _finish_manifest(out: Path, manifest: dict[str, Any], plan: _Plan, report: MiningReport) -> None:
    shards = manifest["shards"]
    manifest["complete"] = all(shard_name(s) in shards for s in plan.counts)
    manifest["totals"] = {
        "shards": len(plan.counts),
        "queries": sum(plan.counts.values()),
        "rows": sum(entry["rows"] for entry in shards.values()),
    }
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    report.rows = manifest["totals"]["rows"]


# --------------------------------------------------------------------------------------------------------------
# execution


def _execute(cfg: MineConfig, inputs: _Inputs, plan_file: Path) -> Iterator[pa.Table]:
    """Processed query rows of the plan, in any order: in this process (``workers: 0``) or on Ray Data."""
    candidate = None if inputs.run is not None else (cfg.first_stage.kind, inputs.first_stage_options)
    score = needs_scoring(cfg)
    if cfg.workers == 0:
        from retriever.mining.steps import CandidateStep, ScoreStep

        steps = []
        if candidate is not None:
            steps.append(CandidateStep(candidate[0], cfg.pool_size, **candidate[1]))
        if score:
            use_gpu = cfg.teacher.gpus_per_actor > 0
            steps.append(
                ScoreStep(inputs.corpus, teacher=inputs.teacher_options, inline_text=cfg.inline_text, use_gpu=use_gpu)
            )
        for batch in pq.ParquetFile(plan_file).iter_batches(batch_size=cfg.queries_per_batch):
            table = pa.Table.from_batches([batch])
            for step in steps:
                table = step(table)
            yield table
        return
    from retriever.mining.ray_data import run_on_ray

    yield from run_on_ray(cfg, plan_file, candidate, inputs.corpus, inputs.teacher_options if score else None, score)


def needs_scoring(cfg: MineConfig) -> bool:
    """Passage texts are fetched for a teacher, for examples with texts, and to check a run's document ids."""
    return cfg.teacher.kind == "cross_encoder" or cfg.inline_text or cfg.first_stage.kind == "run"


class _ShardWriter:
    """Collects processed query rows by shard; a shard whose queries are all in is turned into examples and
    written."""

    def __init__(
        self,
        out: Path,
        cfg: MineConfig,
        manifest: dict[str, Any],
        plan: _Plan,
        teacher_scores: TeacherScores | None,
        report: MiningReport,
    ) -> None:
        self.out, self.cfg, self.manifest, self.plan = out, cfg, manifest, plan
        self.teacher_scores, self.report = teacher_scores, report
        self.buffers: dict[int, list[dict[str, Any]]] = {}

    def add(self, batch: pa.Table) -> None:
        if "candidate_scores" in batch.column_names:
            for column in ("positive_ids", "candidate_ids"):
                self.report.pairs_scored += pc.sum(pc.list_value_length(batch[column])).as_py() or 0
        for row in batch.to_pylist():
            rows = self.buffers.setdefault(row["shard"], [])
            rows.append(row)
            if len(rows) == self.plan.counts[row["shard"]]:
                self._write(row["shard"], self.buffers.pop(row["shard"]))

    def finish(self) -> None:
        if self.buffers:
            missing = {s: self.plan.counts[s] - len(rows) for s, rows in self.buffers.items()}
            raise RuntimeError(f"{self.out}: the pipeline lost queries of shards {missing}; run the job again")

    def _write(self, shard: int, rows: list[dict[str, Any]]) -> None:
        rows.sort(key=lambda row: row["position"])
        examples = shard_examples(rows, self.cfg, self.teacher_scores, self.report)
        name = shard_name(shard)
        with atomic_file(self.out / name, overwrite=True, what="a shard") as tmp:
            pq.write_table(examples, tmp)
        self.manifest["shards"][name] = {
            "queries": len(rows),
            "rows": examples.num_rows,
            "plan_sha256": self.plan.digests[shard],
            "sha256": sha256_file(self.out / name),
        }
        write_text_atomic(self.out / MANIFEST, json.dumps(self.manifest, indent=2) + "\n")
        self.report.shards_written += 1
        logger.info("%s: %d queries, %d examples", name, len(rows), examples.num_rows)


# --------------------------------------------------------------------------------------------------------------
# examples of one shard


def shard_examples(
    rows: list[dict[str, Any]],
    cfg: MineConfig,
    teacher_scores: TeacherScores | None = None,
    report: MiningReport | None = None,
) -> pa.Table:
    """Training examples of processed query rows: one row per (query, positive) with that positive's negatives
    (false negatives dropped, rank ranges sampled); a pair left without negatives is skipped."""
    report = report or MiningReport(out=Path(cfg.out))
    with_teacher = cfg.teacher.kind != "none"
    columns: dict[str, list[Any]] = {name: [] for name in example_columns(cfg.inline_text)}
    for row in rows:
        qid = row["query_id"]
        candidates = row["candidate_ids"]
        positive_scores, candidate_scores = _scores(row, teacher_scores, cfg)
        for j, positive in enumerate(row["positive_ids"]):
            keep = select_negatives(
                qid,
                positive,
                candidate_scores,
                positive_scores[j] if with_teacher else None,
                cfg.false_negative_margin,
                cfg.negatives,
                cfg.seed,
                len(candidates),
            )
            if with_teacher and cfg.false_negative_margin is not None:
                threshold = positive_scores[j] - cfg.false_negative_margin
                report.false_negatives_dropped += sum(s >= threshold for s in candidate_scores)
            if not keep:
                report.rows_without_negatives += 1
                continue
            columns["query_id"].append(qid)
            columns["query"].append(row["query"])
            columns["positive_id"].append(positive)
            columns["negative_ids"].append([candidates[i] for i in keep])
            if cfg.inline_text:
                columns["positive"].append(row["positive_texts"][j])
                columns["negatives"].append([row["candidate_texts"][i] for i in keep])
            columns["teacher_pos"].append(positive_scores[j] if with_teacher else None)
            columns["teacher_negs"].append([candidate_scores[i] for i in keep] if with_teacher else None)
            report.negatives += len(keep)
    return examples_table(columns, cfg.inline_text, with_teacher)


def _scores(
    row: Mapping[str, Any], teacher_scores: TeacherScores | None, cfg: MineConfig
) -> tuple[list[float], list[float]]:
    if cfg.teacher.kind == "cross_encoder":
        return row["positive_scores"], row["candidate_scores"]
    if teacher_scores is None:
        return [], []

    def lookup(docid: str, what: str) -> float:
        try:
            return teacher_scores[(row["query_id"], docid)][0]
        except KeyError:
            raise DataFormatError(
                f"{cfg.teacher.file}: no teacher score for query {row['query_id']!r} and {what} {docid!r}; score "
                "every (query, positive) and (query, candidate) pair, or mine with teacher.kind none"
            ) from None

    return (
        [lookup(d, "positive") for d in row["positive_ids"]],
        [lookup(d, "candidate") for d in row["candidate_ids"]],
    )


def select_negatives(
    query_id: str,
    positive_id: str,
    candidate_scores: list[float],
    positive_score: float | None,
    margin: float | None,
    ranges: list[RankRange] | None,
    seed: int,
    num_candidates: int,
) -> list[int]:
    """Indices (ascending, i.e. in rank order) of the candidates kept as negatives of one (query, positive).

    With a ``margin``, a candidate the teacher scores at or above ``positive_score - margin`` is taken for an
    unjudged positive and dropped. With rank ``ranges`` (1-based ranks in the pool, positives removed), ``count``
    candidates are drawn from each range without replacement (all of it without ``count``); the draw depends only on
    (``seed``, query, positive, range), so it is the same on any number of workers and after a restart."""
    eligible = range(num_candidates)
    if margin is not None:
        if positive_score is None:
            raise SettingError("false-negative filtering needs teacher scores")
        threshold = positive_score - margin
        eligible = [i for i in eligible if candidate_scores[i] < threshold]
    if not ranges:
        return list(eligible)
    chosen: set[int] = set()
    for number, rank_range in enumerate(ranges):
        inside = [i for i in eligible if rank_range.first <= i + 1 <= rank_range.last]
        if rank_range.count is not None and len(inside) > rank_range.count:
            key = f"{seed}\x1f{query_id}\x1f{positive_id}\x1f{number}".encode()
            rng = np.random.Generator(np.random.PCG64(int.from_bytes(hashlib.sha256(key).digest()[:16], "little")))
            inside = [inside[i] for i in rng.choice(len(inside), size=rank_range.count, replace=False)]
        chosen.update(inside)
    return sorted(chosen)


__all__ = ["MiningReport", "mine", "needs_scoring", "output_settings", "select_negatives", "shard_examples"]
