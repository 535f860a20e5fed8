"""Training examples: one parquet row per (query, positive) pair with its hard-negative pool and teacher scores.

Schema (``read_training_examples`` checks it):

=============  =================  ==========================================================================
column         type               content
=============  =================  ==========================================================================
query_id       string
query          string             query text
positive_id    string             a judged-relevant document (qrels grade > 0)
positive       string             its text (only with ``inline_text``)
negative_ids   list<string>       the query's run candidates that are not judged relevant, in run rank order
negatives      list<string>       their texts, aligned with negative_ids (only with ``inline_text``)
teacher_pos    float32 (null)     teacher score of (query, positive); null without a teacher file
teacher_negs   list<float32>      teacher scores aligned 1:1 with negative_ids; null without a teacher file
=============  =================  ==========================================================================

The whole pool is kept (up to ``max_candidates``); the trainer draws ``num_negatives`` of them per epoch with
``sample_negatives`` and indexes ``negative_ids``/``negatives``/``teacher_negs`` with the same indices, which keeps the
teacher scores aligned with the sampled negatives.

Input files (errors name ``file:line`` and what was expected):

* qrels: BEIR ``query-id<TAB>corpus-id<TAB>score`` (header optional) or TREC ``qid iter docid grade``;
* candidates: a TREC run ``qid Q0 docid rank score tag``;
* queries: BEIR ``queries.jsonl`` (``{"_id", "text"}``) or a ``qid<TAB>text`` TSV (MS MARCO);
* teacher: ``qid<TAB>docid<TAB>score`` (header ``qid docid score`` optional; a pair given twice is an error), or
  the MarginMSE triples of MS MARCO distillation (Hofstätter et al., e.g.
  ``bert_cat_ensemble_msmarcopassage_train_scores_ids.tsv``):
  ``pos_score<TAB>neg_score<TAB>qid<TAB>pid_pos<TAB>pid_neg``, one line per triple, giving (qid, pid_pos) →
  pos_score and (qid, pid_neg) → neg_score; a pair repeated on several lines must have the same score (within 1e-6,
  relative or absolute). The first data line's column count (3 or 5) picks the format. Scores must be finite.
  Python pickles (pickle header, or a ``.pkl``/``.pickle`` name) are refused unread, since loading one can run
  arbitrary code; the error gives a one-line conversion to the 3-column format.

Every input file must be UTF-8 text: gzip-compressed, pickled or binary (NUL bytes) files are refused by their first
bytes.

Training examples may be one parquet file or a folder of parquet shards (``training_example_files``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shlex
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from retriever.data.sources import DocTexts
from retriever.errors import DataFormatError, SettingError
from retriever.outputs import atomic_file

if TYPE_CHECKING:
    from retriever.data.synthetic import SyntheticBenchmark

logger = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
MINED_MANIFEST = "manifest.json"  # written by `retriever mine` next to its shards
MINED_MANIFEST_KIND = "retriever.mined-examples"
_QRELS_HEADERS = {"query-id", "query_id", "qid"}


@dataclass(frozen=True)
class ExamplesReport:
    """What ``build_training_examples`` wrote."""

    path: Path
    rows: int
    queries: int
    num_negatives: int
    min_negatives: int
    mean_negatives: float
    max_negatives: int
    rows_below_num_negatives: int  # rows whose pool is smaller than num_negatives
    rows_without_negatives: int  # (query, positive) pairs left out: no candidate besides the positives
    with_teacher: bool
    inline_text: bool

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


# --------------------------------------------------------------------------------------------------------------
# public API


def build_training_examples(
    qrels: Path | Mapping[str, Mapping[str, int]],
    candidates: Path,
    queries: Path | Mapping[str, str],
    docs: Any,
    out: Path,
    *,
    teacher: Path | None = None,
    num_negatives: int = 16,
    max_candidates: int | None = None,
    inline_text: bool = True,
    overwrite: bool = False,
) -> ExamplesReport:
    """Write the training-examples parquet ``out`` and report its pool sizes (``out`` is written whole, and an
    existing file is replaced only with ``overwrite``).

    ``docs`` maps document id → text: a ``Mapping`` or any object with ``.get(id)`` (an ir_datasets docs store
    works; documents are turned into text by `retriever.data.sources.doc_text`). Every document id in the qrels, the
    run and the teacher file must be known to it. One row per (query, positive) in qrels order; queries without a
    positive judgment are skipped. ``max_candidates`` caps the negatives kept per row (after removing positives).
    """
    if num_negatives < 1:
        raise SettingError(f"num_negatives must be ≥ 1, got {num_negatives}")
    if max_candidates is not None and max_candidates < 1:
        raise SettingError(f"max_candidates must be ≥ 1 or None, got {max_candidates}")
    with atomic_file(out, overwrite=overwrite, what="the training-examples file") as partial:
        lookup = _DocLookup(docs)
        judgments = read_qrels(qrels)
        query_text = read_queries(queries)
        run = read_run(Path(candidates))
        scores = read_teacher_scores(Path(teacher)) if teacher is not None else None
        _require_known_docs(lookup, judgments, run, scores)
        rows = _ExampleRows(lookup, query_text, _describe(queries), inline_text, scores, teacher)
        for qid, judged in judgments.items():
            rows.add_query(qid, judged, run.get(qid, []), max_candidates)
        if not rows.pool_sizes:
            raise DataFormatError(
                f"{out}: no training examples: no query of the qrels has a positive judgment (relevance > 0); "
                "check the qrels file"
            )
        rows.write(partial)
    return rows.report(Path(out), num_negatives)


Judgments = dict[str, list[tuple[str, int, str]]]  # qid → [(docid, grade, where)]
Ranked = dict[str, list[tuple[str, str]]]  # qid → [(docid, where)] by rank
TeacherScores = dict[tuple[str, str], tuple[float, str]]  # (qid, docid) → (score, where)


def _require_known_docs(lookup: _DocLookup, judgments: Judgments, run: Ranked, scores: TeacherScores | None) -> None:
    """Every document id of the qrels, the run and the teacher file must be in the docs (the error names where)."""
    for judged in judgments.values():
        for docid, _, where in judged:
            lookup.require(docid, where)
    for ranked in run.values():
        for docid, where in ranked:
            lookup.require(docid, where)
    if scores is not None:
        for (_, docid), (_, where) in scores.items():
            lookup.require(docid, where)


class _ExampleRows:
    """The examples table, built one query at a time: one row per (query, positive) with the query's pool of
    candidate negatives (positives removed) and, with a teacher, the scores of the positive and of every negative."""

    def __init__(
        self,
        lookup: _DocLookup,
        query_text: Mapping[str, str],
        queries_name: str,
        inline_text: bool,
        scores: TeacherScores | None,
        teacher: Path | None,
    ) -> None:
        self.lookup, self.query_text, self.queries_name = lookup, query_text, queries_name
        self.inline_text, self.scores, self.teacher = inline_text, scores, teacher
        self.columns: dict[str, list[Any]] = {name: [] for name in example_columns(inline_text)}
        self.pool_sizes: list[int] = []
        self.queries_used = 0
        self.skipped = 0

    def teacher_score(self, qid: str, docid: str, needed_by: str) -> float:
        assert self.scores is not None
        try:
            return self.scores[(qid, docid)][0]
        except KeyError:
            raise DataFormatError(
                f"{self.teacher}: no teacher score for query {qid!r} and document {docid!r} (needed by "
                f"{needed_by}); score every (query, positive) and (query, candidate) pair, or build without a "
                "teacher file"
            ) from None

    def add_query(
        self, qid: str, judged: list[tuple[str, int, str]], ranked: list[tuple[str, str]], max_candidates: int | None
    ) -> None:
        positives = [(docid, where) for docid, grade, where in judged if grade > 0]
        if not positives:
            return
        if qid not in self.query_text:
            raise DataFormatError(
                f"{positives[0][1]}: query id {qid!r} has no text in {self.queries_name}; "
                "add the query or remove its judgments"
            )
        positive_ids = {docid for docid, _ in positives}
        pool = [(docid, where) for docid, where in ranked if docid not in positive_ids][:max_candidates]
        if not pool:
            # Batches have a fixed number of passages per query: a pair without any negative cannot fill one.
            self.skipped += len(positives)
            return
        self.queries_used += 1
        negative_ids = [docid for docid, _ in pool]
        negative_texts = [self.lookup.text(docid) for docid in negative_ids] if self.inline_text else []
        with_teacher = self.scores is not None
        teacher_negs = [self.teacher_score(qid, d, where) for d, where in pool] if with_teacher else None
        columns = self.columns
        for docid, where in positives:
            columns["query_id"].append(qid)
            columns["query"].append(self.query_text[qid])
            columns["positive_id"].append(docid)
            columns["negative_ids"].append(negative_ids)
            if self.inline_text:
                columns["positive"].append(self.lookup.text(docid))
                columns["negatives"].append(negative_texts)
            columns["teacher_pos"].append(self.teacher_score(qid, docid, where) if with_teacher else None)
            columns["teacher_negs"].append(teacher_negs)
            self.pool_sizes.append(len(negative_ids))

    def write(self, out: Path) -> None:
        pq.write_table(examples_table(self.columns, self.inline_text, self.scores is not None), out)

    def report(self, out: Path, num_negatives: int) -> ExamplesReport:
        """Pool sizes of the written rows; rows short of ``num_negatives`` negatives and left-out pairs are logged."""
        sizes = self.pool_sizes
        below = sum(n < num_negatives for n in sizes)
        report = ExamplesReport(
            path=out,
            rows=len(sizes),
            queries=self.queries_used,
            num_negatives=num_negatives,
            min_negatives=min(sizes, default=0),
            mean_negatives=float(np.mean(sizes)) if sizes else 0.0,
            max_negatives=max(sizes, default=0),
            rows_below_num_negatives=below,
            rows_without_negatives=self.skipped,
            with_teacher=self.scores is not None,
            inline_text=self.inline_text,
        )
        if self.skipped:
            logger.warning("%d (query, positive) pairs have no candidate negatives and were left out", self.skipped)
        if below:
            logger.warning(
                "%d of %d rows have fewer than %d hard negatives (smallest pool: %d); the trainer samples %d per "
                "epoch where the pool allows and repeats negatives otherwise",
                below,
                report.rows,
                num_negatives,
                report.min_negatives,
                num_negatives,
            )
        return report


def build_synthetic_examples(bench: SyntheticBenchmark, out: Path, num_negatives: int = 16) -> ExamplesReport:
    """The synthetic benchmark's training parquet (train qrels, BM25 candidates, teacher scores); passages are
    stored as ids and read from the benchmark's corpus while training."""
    return build_training_examples(
        bench.qrels_train,
        bench.candidates_train,
        bench.queries,
        bench.docs(),
        out,
        teacher=bench.teacher_train,
        num_negatives=num_negatives,
        inline_text=False,
        overwrite=True,
    )


def training_example_files(path: Path) -> list[Path]:
    """The parquet files of a training-examples path: the file itself, or a folder's ``*.parquet`` shards sorted by
    name (not recursive; hidden files, ``_``-prefixed ones and other files such as a manifest are skipped)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path}: no such training-examples file or folder; build it with build_training_examples()"
        )
    shards = sorted(
        (p for p in path.iterdir() if p.suffix == ".parquet" and not p.name.startswith((".", "_")) and p.is_file()),
        key=lambda p: p.name,
    )
    _require_finished_mining(path)
    if not shards:
        raise DataFormatError(
            f"{path}: a folder without training-example shards (no *.parquet file directly in it); put the shards "
            "there or give one parquet file"
        )
    return shards


def _require_finished_mining(folder: Path) -> None:
    """A folder `retriever mine` has not finished holds only some of its shards: training on it would silently use
    part of the data."""
    try:
        manifest = json.loads((folder / MINED_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(manifest, dict) and manifest.get("kind") == MINED_MANIFEST_KIND and not manifest.get("complete"):
        done = len(manifest.get("shards", {}))
        raise DataFormatError(
            f"{folder}: mining has not finished ({done} shards written; {folder / MINED_MANIFEST} is not complete); "
            "run the same `retriever mine` again to finish it"
        )


def read_training_examples(path: Path) -> pa.Table:
    """Read a training-examples parquet, or a folder of parquet shards (``training_example_files``, concatenated in
    name order), checking each file's schema (the error names the file and every missing or mistyped column), that
    the shards share one schema, and that the per-negative lists line up."""
    files = training_example_files(path)
    tables = [_read_parquet(file) for file in files]
    for file, table in zip(files, tables):
        _check_schema(file, table.schema)
        _check_list_lengths(file, table)
    _check_same_schema(files, [table.schema for table in tables])
    if len(tables) == 1:
        return tables[0]
    names = tables[0].column_names  # every shard has these columns, maybe in another order
    return pa.concat_tables([t.select(names) for t in tables], promote_options="default")


def training_examples_schema(path: Path) -> pa.Schema:
    """The schema of a training-examples file or folder of shards, from the parquet footers only (no rows read):
    each file checked as ``read_training_examples`` does, and the shards checked to share one schema."""
    files = training_example_files(path)
    schemas = []
    for file in files:
        try:
            schema = pq.read_schema(file)
        except (pa.ArrowException, OSError) as exc:
            raise DataFormatError(f"{file}: not a readable parquet file ({_reason(exc)}); build it again") from None
        _check_schema(file, schema)
        schemas.append(schema)
    _check_same_schema(files, schemas)
    return schemas[0]


def _read_parquet(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataFormatError(f"{path}: not a readable parquet file ({_reason(exc)}); build it again") from None


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:160]


def _check_schema(path: Path, schema: pa.Schema) -> None:
    """Every required column present with its type; inline texts come as a pair."""
    fields = {f.name: f.type for f in schema}
    checks: dict[str, tuple[Callable[[pa.DataType], bool], str]] = {
        "query_id": (_is_string, "string"),
        "query": (_is_string, "string"),
        "positive_id": (_is_string, "string"),
        "negative_ids": (_is_list_of(_is_string), "list<string>"),
        "teacher_pos": (pa.types.is_floating, "float"),
        "teacher_negs": (_is_list_of(pa.types.is_floating), "list<float>"),
        "positive": (_is_string, "string"),
        "negatives": (_is_list_of(_is_string), "list<string>"),
    }
    required = list(checks)[:6]
    inline = [name for name in ("positive", "negatives") if name in fields]
    problems = [f"missing column {name!r}" for name in required if name not in fields]
    if len(inline) == 1:
        other = "negatives" if inline[0] == "positive" else "positive"
        problems.append(f"missing column {other!r} (inline texts need both 'positive' and 'negatives')")
    for name, (ok, expected) in checks.items():
        if name in fields and not ok(fields[name]):
            problems.append(f"column {name!r} is {fields[name]}, expected {expected}")
    if problems:
        raise DataFormatError(f"{path}: not a training-examples parquet: {'; '.join(problems)}")


def _check_list_lengths(path: Path, table: pa.Table) -> None:
    """``teacher_negs`` and ``negatives`` (where present) align 1:1 with ``negative_ids``."""
    n_neg = pc.list_value_length(table["negative_ids"])
    for name in ("teacher_negs", *(["negatives"] if "negatives" in table.column_names else [])):
        lengths = pc.list_value_length(table[name])
        bad = pc.and_(pc.is_valid(lengths), pc.not_equal(lengths, n_neg))
        if pc.any(bad).as_py():
            row = int(np.flatnonzero(bad.to_numpy(zero_copy_only=False))[0])
            raise DataFormatError(
                f"{path}: row {row}: column {name!r} has a different length than 'negative_ids'; "
                "the file is corrupt, rebuild it"
            )


def _check_same_schema(files: list[Path], schemas: list[pa.Schema]) -> None:
    """The shards of a folder have the same columns and types (in any order; metadata and column nullability aside)."""
    first = {field.name: field.type for field in schemas[0]}
    for file, schema in zip(files[1:], schemas[1:]):
        types = {field.name: field.type for field in schema}
        if types != first:
            diff = sorted(
                f"{name!r} is {types.get(name, 'missing')} there, {first.get(name, 'missing')} in the first"
                for name in first.keys() | types.keys()
                if types.get(name) != first.get(name)
            )
            raise DataFormatError(
                f"{file}: its columns differ from those of {files[0]} ({'; '.join(diff)}); the shards of one folder "
                "must share one schema, rebuild them the same way"
            )


def sample_negatives(negative_ids: list[Any], k: int, epoch: int, seed: int, key: str) -> list[int]:
    """Indices of ``k`` negatives drawn from ``negative_ids`` for one epoch.

    Without replacement when the pool holds at least ``k`` items. When it is smaller, every item is used once
    (in a random order) and the remaining ``k - len(pool)`` slots are drawn with replacement, so batches keep a fixed
    shape. Deterministic in (``seed``, ``epoch``, ``key``) — ``key`` is the row's identity, e.g. query and positive
    id — and different across epochs. Index ``negative_ids``, ``negatives`` and ``teacher_negs`` with the result.
    """
    n = len(negative_ids)
    if k < 0:
        raise ValueError(f"k must be ≥ 0, got {k}")
    if k == 0:
        return []
    if n == 0:
        raise DataFormatError(
            f"row {key!r} has no negatives to sample from; rebuild the examples with a candidate run"
        )
    digest = hashlib.sha256(f"{seed}\x1f{epoch}\x1f{key}".encode()).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))
    if n >= k:
        return [int(i) for i in rng.choice(n, size=k, replace=False)]
    return [int(i) for i in rng.permutation(n)] + [int(i) for i in rng.integers(0, n, size=k - n)]


# --------------------------------------------------------------------------------------------------------------
# input readers


class _DocLookup:
    """Document id → text over a mapping or any ``.get`` store, caching what it has resolved."""

    def __init__(self, docs: Any) -> None:
        self._docs = DocTexts(docs)
        self._texts: dict[str, str] = {}

    def require(self, docid: str, where: str) -> None:
        if docid in self._texts:
            return
        try:
            self._texts[docid] = self._docs[docid]
        except KeyError:
            raise DataFormatError(
                f"{where}: unknown document id {docid!r} (not in the docs store); fix the id or the docs"
            ) from None

    def text(self, docid: str) -> str:
        return self._texts[docid]


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Non-blank lines with their 1-based numbers."""
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open("rb") as f:
        _refuse_binary(path, f.read(8192))
        f.seek(0)
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                raise DataFormatError(f"{path}:{number}: not valid UTF-8 ({exc.reason}); re-encode the file") from None
            if line.strip():
                yield number, line


def _refuse_binary(path: Path, head: bytes) -> None:
    """Refuse a compressed or binary file by its first bytes (line by line it would fail as bad UTF-8 or bad
    columns, which does not say what the file is)."""
    if head.startswith(b"\x1f\x8b"):
        raise DataFormatError(
            f"{path}: gzip-compressed, expected a text file; decompress it first (gunzip -k {shlex.quote(str(path))})"
        )
    if _is_pickle(head):
        raise DataFormatError(
            f"{path}: a Python pickle, expected a text file; pickles are not read because loading one runs "
            "arbitrary code, write the data as text"
        )
    nul = head.find(b"\x00")
    if nul >= 0:
        raise DataFormatError(
            f"{path}: binary data (a NUL byte at offset {nul}), expected UTF-8 text; give the text file (a UTF-16 "
            "text file must be re-encoded as UTF-8)"
        )


def read_qrels(qrels: Path | Mapping[str, Mapping[str, int]]) -> dict[str, list[tuple[str, int, str]]]:
    """qid → [(docid, grade, where)] in file order."""
    out: dict[str, list[tuple[str, int, str]]] = {}
    if isinstance(qrels, Mapping):
        for qid, judged in qrels.items():
            out[str(qid)] = [(str(d), int(g), f"qrels[{qid!r}][{d!r}]") for d, g in judged.items()]
        return out
    path = Path(qrels)
    width: int | None = None
    seen: dict[tuple[str, str], int] = {}
    for number, line in _lines(path):
        cols = line.split()
        where = f"{path}:{number}"
        if width is None and cols[0] in _QRELS_HEADERS:
            continue
        if width is None:
            width = len(cols)
            if width not in (3, 4):
                raise DataFormatError(
                    f"{where}: expected 3 columns (query-id corpus-id score) or 4 (qid iter docid grade), "
                    f"got {len(cols)}"
                )
        if len(cols) != width:
            raise DataFormatError(f"{where}: expected {width} columns like the first line, got {len(cols)}")
        qid, docid, grade = (cols[0], cols[1], cols[2]) if width == 3 else (cols[0], cols[2], cols[3])
        value = _parse_int(grade, where, "relevance grade")
        if (qid, docid) in seen:
            raise DataFormatError(
                f"{where}: duplicate judgment of {docid!r} for query {qid!r} (first at line {seen[qid, docid]})"
            )
        seen[(qid, docid)] = number
        out.setdefault(qid, []).append((docid, value, where))
    return out


def read_queries(queries: Path | Mapping[str, str]) -> dict[str, str]:
    if isinstance(queries, Mapping):
        return {str(k): str(v) for k, v in queries.items()}
    path = Path(queries)
    out: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, line in _lines(path):
        where = f"{path}:{number}"
        if line.lstrip().startswith("{"):
            try:
                row = json.loads(line)
                qid, text = str(row["_id"]), row["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataFormatError(f'{where}: expected a JSON object with "_id" and "text" ({err})') from None
            if not isinstance(text, str):
                raise DataFormatError(f'{where}: "text" must be a string, got {type(text).__name__}')
        else:
            cols = line.split("\t")
            if len(cols) != 2:
                raise DataFormatError(f"{where}: expected 2 tab-separated columns (qid, text), got {len(cols)}")
            qid, text = cols
        if qid in out:
            raise DataFormatError(
                f"{where}: duplicate query id {qid!r} (first at line {first_line[qid]}); ids must be unique"
            )
        out[qid] = text
        first_line[qid] = number
    return out


def read_run(path: Path) -> dict[str, list[tuple[str, str]]]:
    """qid → [(docid, where)] sorted by rank (file order among equal ranks)."""
    rows: dict[str, list[tuple[int, int, str, str]]] = {}
    seen: dict[tuple[str, str], int] = {}
    for number, line in _lines(path):
        cols = line.split()
        where = f"{path}:{number}"
        if len(cols) != 6:
            raise DataFormatError(
                f"{where}: expected a TREC run line 'qid Q0 docid rank score tag' (6 columns), got {len(cols)}"
            )
        qid, _, docid, rank, score, _ = cols
        rank_value = _parse_int(rank, where, "rank (column 4)")
        _parse_float(score, where, "score (column 5)")
        if (qid, docid) in seen:
            raise DataFormatError(
                f"{where}: document {docid!r} listed twice for query {qid!r} (first at line {seen[qid, docid]})"
            )
        seen[(qid, docid)] = number
        rows.setdefault(qid, []).append((rank_value, number, docid, where))
    return {qid: [(docid, where) for _, _, docid, where in sorted(ranked)] for qid, ranked in rows.items()}


_TEACHER_LAYOUTS = {3: "qid docid score", 5: "MarginMSE: pos_score neg_score qid pid_pos pid_neg"}
# Repeats of a pair in a MarginMSE file are the same teacher score printed again; allow float32-level noise (the
# examples store float32, whose precision is ~1.2e-7 relative) and nothing a real disagreement would produce.
_REPEAT_REL_TOL = 1e-6
_REPEAT_ABS_TOL = 1e-6  # scores near zero, where a relative tolerance is too strict


def read_teacher_scores(path: Path) -> TeacherScores:
    """(qid, docid) → (score, where) from a ``qid docid score`` file or a MarginMSE ``pos_score neg_score qid
    pid_pos pid_neg`` file; the first data line's column count (3 or 5) decides which."""
    _refuse_pickle(path)
    out: TeacherScores = {}
    width: int | None = None
    first = ""
    for number, line in _lines(path):
        cols = line.split("\t") if "\t" in line else line.split()
        where = f"{path}:{number}"
        if width is None:
            if number == 1 and len(cols) == 3 and cols[0] in _QRELS_HEADERS and cols[2] == "score":
                continue
            if len(cols) not in _TEACHER_LAYOUTS:
                raise DataFormatError(
                    f"{where}: expected 3 columns (qid, docid, score) or 5 (MarginMSE: pos_score, neg_score, qid, "
                    f"pid_pos, pid_neg), got {len(cols)}"
                )
            width, first = len(cols), where
        if len(cols) != width:
            raise DataFormatError(
                f"{where}: expected {width} columns ({_TEACHER_LAYOUTS[width]}) like the first line ({first}), "
                f"got {len(cols)}"
            )
        if width == 3:
            qid, docid, score = cols
            value = _teacher_score(score, where, "teacher score (column 3)")
            if (qid, docid) in out:
                raise DataFormatError(
                    f"{where}: duplicate teacher score for ({qid!r}, {docid!r}) (first at {out[qid, docid][1]})"
                )
            out[(qid, docid)] = (value, where)
        else:
            pos_score, neg_score, qid, pos_id, neg_id = cols
            for docid, score, column in ((pos_id, pos_score, 1), (neg_id, neg_score, 2)):
                value = _teacher_score(score, where, f"teacher score (column {column})")
                seen = out.setdefault((qid, docid), (value, where))
                if not math.isclose(seen[0], value, rel_tol=_REPEAT_REL_TOL, abs_tol=_REPEAT_ABS_TOL):
                    raise DataFormatError(
                        f"{where}: teacher score {value!r} for ({qid!r}, {docid!r}) differs from {seen[0]!r} at "
                        f"{seen[1]}; a pair needs one score (repeats must agree within 1e-6), fix the teacher file"
                    )
    return out


def _teacher_score(text: str, where: str, what: str) -> float:
    value = _parse_float(text, where, what)
    if not math.isfinite(value):
        raise DataFormatError(f"{where}: teacher score is {text!r}; scores must be finite numbers")
    return value


def _refuse_pickle(path: Path) -> None:
    """Refuse a pickled teacher file before reading it (unpickling runs code the file chooses), with the one-off
    conversion of the common published layout ``{qid: {docid: score}}`` (sometimes gzipped, ``.pkl.gz``)."""
    if not path.is_file():
        return  # _lines names a missing file
    with path.open("rb") as f:
        head = f.read(2)
    gzipped = head.startswith(b"\x1f\x8b")
    # A .pkl name is refused even when the content looks like text: protocol 0 and 1 pickles are ASCII, and a
    # misnamed text file only needs a rename.
    if _is_pickle(head):
        what, fix = "a Python pickle (it starts with a pickle header)", "Where the file is trusted, convert it"
    elif {s.lower() for s in path.suffixes} & {".pkl", ".pickle"}:
        what = f"the name {path.name!r} marks a{' gzipped' if gzipped else ''} Python pickle"
        fix = "Where the file is trusted, convert it"
        if not gzipped:
            fix = "If it is a text file, rename it; if it is a pickle you trust, convert it"
    else:
        return
    load = "gzip.open(sys.argv[1])" if gzipped else "open(sys.argv[1],'rb')"
    convert = (
        f'python -c "import gzip,pickle,sys; d=pickle.load({load}); '
        "sys.stdout.writelines(f'{q}\\t{p}\\t{s}\\n' for q,r in d.items() for p,s in r.items())\" "
        f"{shlex.quote(str(path))} > teacher.tsv"
    )
    raise DataFormatError(
        f"{path}: {what}; pickles are not read because loading one can run arbitrary code. {fix} once to "
        f"qid<TAB>docid<TAB>score lines, e.g. for a {{qid: {{docid: score}}}} pickle: {convert}"
    )


def _is_pickle(head: bytes) -> bool:
    """Pickle protocols 2-5 start with the PROTO opcode 0x80 and the protocol number."""
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _parse_int(text: str, where: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DataFormatError(f"{where}: expected an integer {what}, got {text!r}") from None


def _parse_float(text: str, where: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise DataFormatError(f"{where}: expected a number as {what}, got {text!r}") from None


def _describe(source: Path | Mapping[str, Any]) -> str:
    return "the queries mapping" if isinstance(source, Mapping) else str(source)


# --------------------------------------------------------------------------------------------------------------
# schema


def examples_table(columns: Mapping[str, list[Any]], inline_text: bool, with_teacher: bool) -> pa.Table:
    """The training-examples table of ``columns`` (the schema's names), with the schema and its metadata."""
    metadata = {
        "retriever.examples.version": SCHEMA_VERSION,
        "inline_text": str(inline_text).lower(),
        "with_teacher": str(with_teacher).lower(),
    }
    return pa.table(dict(columns), schema=_schema(inline_text).with_metadata(metadata))


def example_columns(inline_text: bool) -> list[str]:
    return _schema(inline_text).names


def _schema(inline_text: bool) -> pa.Schema:
    fields = [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("query", pa.string(), nullable=False),
        pa.field("positive_id", pa.string(), nullable=False),
    ]
    if inline_text:
        fields.append(pa.field("positive", pa.string(), nullable=False))
    fields.append(pa.field("negative_ids", pa.list_(pa.string()), nullable=False))
    if inline_text:
        fields.append(pa.field("negatives", pa.list_(pa.string()), nullable=False))
    fields += [pa.field("teacher_pos", pa.float32()), pa.field("teacher_negs", pa.list_(pa.float32()))]
    return pa.schema(fields)


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_list_of(inner: Callable[[pa.DataType], bool]) -> Callable[[pa.DataType], bool]:
    def check(t: pa.DataType) -> bool:
        return (pa.types.is_list(t) or pa.types.is_large_list(t)) and inner(t.value_type)

    return check


__all__ = [
    "ExamplesReport",
    "build_synthetic_examples",
    "build_training_examples",
    "example_columns",
    "examples_table",
    "read_qrels",
    "read_queries",
    "read_run",
    "read_teacher_scores",
    "read_training_examples",
    "sample_negatives",
    "training_example_files",
    "training_examples_schema",
]
