"""Mining training data: `retriever mine` on Ray Data next to the plain single-process loop a user would write.

Data: a generated BEIR collection (default 300,000 passages of 30-60 Zipf-distributed made-up words, 20,000 training
queries of 4 words taken from their one relevant passage), made once and cached under ``--work``. Teacher: a
randomly initialised BERT cross-encoder built from config (``--teacher-hidden``; its scores carry no knowledge, its
cost is that of a small cross-encoder). Every method mines the same queries: BM25 (k1 0.9, b 0.4, whitespace tokens)
top ``--pool`` candidates, the judged positive removed, and the teacher's score of every (query, positive) and
(query, candidate) pair.

Methods, each in its own process; memory is sampled every 0.5 s over the process and all its descendants
(`TreeMemory`): peak RSS summed over the driver and every Ray worker process, peak RSS summed over all processes
(with Ray's daemons) and peak PSS summed over all processes (RSS counts a shared page once per process that maps it:
libraries such as libtorch and the memory-mapped BM25 index; PSS counts it once in all):

- ``plain``: bm25s index in memory, ``BM25.retrieve(..., n_threads=2)``, then a transformers loop over the pairs in
  batches (2 torch threads), writing one parquet file;
- ``mine-1``: ``retriever mine`` with 1 first-stage actor and 1 teacher actor (2 torch threads);
- ``mine-2``: 2 first-stage actors and 2 teacher actors (1 torch thread each);
- ``mine-1 first stage``: the same job without a teacher, for the first stage's own rate.

The BM25 index ``retriever mine`` memory-maps is built once before the timed runs (its build time is printed);
the plain loop builds its own in memory, inside its timing (its build time is printed apart too).

Run from the repository root:  PYTHONPATH=. python benchmarks/bench_mine.py  (about 15 minutes on 2 cores;
``--passages 30000 --queries 2000`` for a quick look).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------------------
# data


def generate_collection(folder: Path, passages: int, queries: int, seed: int = 0) -> Path:
    """A BEIR folder (corpus.jsonl, queries.jsonl, qrels/train.tsv); reused when it exists with the same sizes."""
    stamp = folder / "sizes.json"
    sizes = {"passages": passages, "queries": queries, "seed": seed}
    if stamp.is_file() and json.loads(stamp.read_text()) == sizes:
        return folder
    rng = np.random.default_rng(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    vocab_size = 50_000
    words = []
    seen: set[str] = set()
    while len(words) < vocab_size:
        word = "".join(rng.choice(syllables, size=int(rng.integers(2, 5))))
        if word not in seen:
            seen.add(word)
            words.append(word)
    weights = 1.0 / np.arange(1, vocab_size + 1) ** 1.05
    weights /= weights.sum()
    lengths = rng.integers(30, 61, size=passages)
    tokens = rng.choice(vocab_size, size=int(lengths.sum()), p=weights)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    with (folder / "corpus.jsonl").open("w") as corpus:
        for i in range(passages):
            text = " ".join(words[t] for t in tokens[starts[i] : starts[i + 1]])
            corpus.write(json.dumps({"_id": f"p{i}", "title": "", "text": text}) + "\n")
    sources = rng.choice(passages, size=queries, replace=False)
    with (folder / "queries.jsonl").open("w") as qf, (folder / "qrels" / "train.tsv").open("w") as qrels:
        qrels.write("query-id\tcorpus-id\tscore\n")
        for i, source in enumerate(sources):
            passage = tokens[starts[source] : starts[source + 1]]
            rare = np.unique(passage)[-8:]  # the passage's rarest words (highest ids are least frequent)
            picked = rng.choice(rare, size=min(4, len(rare)), replace=False)
            qf.write(json.dumps({"_id": f"q{i}", "text": " ".join(words[t] for t in picked)}) + "\n")
            qrels.write(f"q{i}\tp{source}\t1\n")
    stamp.write_text(json.dumps(sizes))
    return folder


# --------------------------------------------------------------------------------------------------------------
# the plain loop (what a user writes without this project)


def plain_loop(collection: Path, teacher: Path, pool: int, batch_size: int, max_length: int, out: Path) -> dict:
    import bm25s
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(2)
    started = time.perf_counter()
    ids, texts = [], []
    with (collection / "corpus.jsonl").open() as f:
        for line in f:
            row = json.loads(line)
            ids.append(row["_id"])
            texts.append(f"{row['title']} {row['text']}".strip())
    retriever = bm25s.BM25(k1=0.9, b=0.4, method="lucene", backend="numba")  # its fastest retrieval
    retriever.index([t.split() for t in texts], show_progress=False)
    built = time.perf_counter()
    queries = {}
    with (collection / "queries.jsonl").open() as f:
        for line in f:
            row = json.loads(line)
            queries[row["_id"]] = row["text"]
    positives: dict[str, list[str]] = {}
    with (collection / "qrels" / "train.tsv").open() as f:
        next(f)
        for line in f:
            qid, docid, _ = line.rstrip("\n").split("\t")
            positives.setdefault(qid, []).append(docid)
    qids = [q for q in queries if q in positives]
    results, _ = retriever.retrieve([queries[q].split() for q in qids], k=pool, n_threads=2, show_progress=False)
    candidates = {q: [ids[i] for i in row if ids[i] not in positives[q]] for q, row in zip(qids, results)}
    retrieved = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(teacher))
    model = AutoModelForSequenceClassification.from_pretrained(str(teacher)).eval()
    text_of = dict(zip(ids, texts))
    pairs = [(q, d) for q in qids for d in (*positives[q], *candidates[q])]
    scores = np.empty(len(pairs), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            batch = tokenizer(
                [queries[q] for q, _ in chunk],
                [text_of[d] for _, d in chunk],
                truncation=True,
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            )
            scores[start : start + len(chunk)] = model(**batch).logits[:, 0].numpy()
    scored = time.perf_counter()
    table = pa.table({"qid": [q for q, _ in pairs], "docid": [d for _, d in pairs], "score": scores})
    pq.write_table(table, out)
    return {
        "seconds": time.perf_counter() - started,
        "index_seconds": built - started,
        "first_stage_seconds": retrieved - built,
        "teacher_seconds": scored - retrieved,
        "queries": len(qids),
        "pairs": len(pairs),
    }


# --------------------------------------------------------------------------------------------------------------
# measuring a method in its own process


class TreeMemory:
    """Peaks, sampled in a thread, of the memory of a process and all its descendants: RSS summed over the driver
    and Ray's worker processes (``ray::...``: actors, tasks, Ray Data's own actors), RSS summed over every process
    (also Ray's daemons: GCS, raylet, agents, dashboard) and PSS summed over every process (shared pages split
    between the processes that map them, so libraries and the memory-mapped index count once)."""

    def __init__(self, pid: int, every_s: float = 0.5) -> None:
        self.root = psutil.Process(pid)
        self.peaks = {"workers_rss": 0, "all_rss": 0, "all_pss": 0}
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            sums = dict.fromkeys(self.peaks, 0)
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for process in processes:
                try:
                    memory = process.memory_full_info()
                    name = process.name()
                except psutil.Error:
                    continue
                sums["all_rss"] += memory.rss
                sums["all_pss"] += memory.pss
                if process.pid == self.root.pid or name.startswith("ray::"):
                    sums["workers_rss"] += memory.rss
            for key, value in sums.items():
                self.peaks[key] = max(self.peaks[key], value)
            self._stop.wait(self.every_s)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peaks


def measure(command: list[str], env: dict[str, str], timeout_s: float) -> tuple[dict, dict[str, int], float]:
    """(the JSON the command prints last, peak memory in bytes (`TreeMemory`), wall seconds)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    sampler = TreeMemory(process.pid)
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    finally:
        peak = sampler.stop()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{stderr[-3000:]}")
    start = 0 if stdout.startswith("{") else stdout.rindex("\n{") + 1  # the report is printed last
    return json.loads(stdout[start:]), peak, time.perf_counter() - started


def mine_config(path: Path, dataset: str, out: Path, index: Path, teacher: Path | None, args, workers: int) -> Path:
    import yaml

    threads = max(1, 2 // workers)
    data = {
        "dataset": dataset,
        "out": str(out),
        "pool_size": args.pool,
        "queries_per_shard": 5000,
        "queries_per_batch": 256,
        "workers": workers,
        "cpus_per_worker": 0.25,
        "first_stage": {"kind": "bm25", "index": str(index)},
        "teacher": (
            {"kind": "none"}
            if teacher is None
            else {
                "model": str(teacher),
                "max_length": args.max_length,
                "batch_size": args.batch_size,
                "actors": workers,
                "cpus_per_actor": 0.25,
                "torch_threads": threads,
            }
        ),
    }
    path.write_text(yaml.safe_dump(data))
    return path


def gib(value: int) -> str:
    return f"{value / 2**30:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=300_000)
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--pool", type=int, default=20, help="BM25 candidates per query")
    parser.add_argument("--teacher-hidden", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128, help="pairs per teacher forward pass")
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_mine")
    parser.add_argument("--only", nargs="+", default=["plain", "mine-1", "mine-2", "mine-1-first-stage"])
    parser.add_argument("--plain", type=Path, help=argparse.SUPPRESS)  # internal: run the plain loop here
    args = parser.parse_args()
    work = args.work.resolve()
    collection = work / f"collection-{args.passages}-{args.queries}"
    teacher = work / f"teacher-{args.teacher_hidden}"
    if args.plain:
        report = plain_loop(collection, teacher, args.pool, args.batch_size, args.max_length, args.plain)
        print(json.dumps(report))
        return 0

    os.environ.setdefault("IR_DATASETS_HOME", str(work / "ir_datasets"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "1"}
    from retriever.bm25 import Bm25Index
    from retriever.data.local import register_beir_folder
    from retriever.data.sources import load_source
    from retriever.mining.teacher import build_tiny_cross_encoder

    t0 = time.perf_counter()
    generate_collection(collection, args.passages, args.queries)
    dataset = register_beir_folder(collection.name, collection, split="train")
    print(f"collection: {args.passages:,} passages, {args.queries:,} queries ({time.perf_counter() - t0:.0f} s)")
    if not teacher.is_dir():
        texts = (json.loads(line)["text"] for line in (collection / "corpus.jsonl").open())
        build_tiny_cross_encoder(teacher, [t for _, t in zip(range(20_000), texts)], hidden_size=args.teacher_hidden)
    index = work / f"bm25-{collection.name}"
    if not index.is_dir():
        t0 = time.perf_counter()
        Bm25Index(load_source(dataset).docs()).save(index)
        print(f"BM25 index for retriever mine built once: {time.perf_counter() - t0:.0f} s")
    print(
        f"settings: pool {args.pool}, teacher BERT hidden {args.teacher_hidden} x 2 layers, {args.batch_size} pairs "
        f"per batch, max length {args.max_length}; machine: {os.cpu_count()} cores"
    )
    rows = []
    for method in args.only:
        if method == "plain":
            command = [sys.executable, __file__, *sys.argv[1:], "--plain", str(work / "plain.parquet")]
        else:
            workers = 2 if method == "mine-2" else 1
            out = work / f"out-{method}"
            config = mine_config(
                work / f"{method}.yaml", dataset, out, index,
                None if method.endswith("first-stage") else teacher, args, workers,
            )  # fmt: skip
            command = [sys.executable, "-m", "retriever", "mine", str(config), "--overwrite"]
        report, peak, wall = measure(command, env, timeout_s=3600)
        rows.append((method, report, peak, wall))
        print(f"  {method}: {wall:.0f} s, peak RSS of driver + workers {gib(peak['workers_rss'])} GiB", flush=True)

    print()
    print("| method | wall s | queries | pairs | queries/s end to end | first stage queries/s | teacher pairs/s "
          "| peak RSS, driver + Ray workers (GiB) | peak RSS, all processes | peak PSS, all processes |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for method, report, peak, _wall in rows:
        if method == "plain":
            queries, pairs = report["queries"], report["pairs"]
            first = f"{queries / report['first_stage_seconds']:.0f}"
            teach = f"{pairs / report['teacher_seconds']:.0f}"
            seconds = report["seconds"]
        else:
            queries, pairs, seconds = report["queries"], report["pairs_scored"], report["seconds"]
            first = f"{queries / seconds:.0f}" if method.endswith("first-stage") else "(streamed)"
            teach = f"{pairs / seconds:.0f}" if pairs else "–"
        print(
            f"| {method} | {seconds:.1f} | {queries:,} | {pairs:,} | {queries / seconds:.1f} | {first} | {teach} "
            f"| {gib(peak['workers_rss'])} | {gib(peak['all_rss'])} | {gib(peak['all_pss'])} |"
        )
    plain = next((r for r in rows if r[0] == "plain"), None)
    if plain is not None:
        print(
            f"\nplain loop: BM25 index build {plain[1]['index_seconds']:.1f} s (inside its time), first stage "
            f"{plain[1]['first_stage_seconds']:.1f} s, teacher {plain[1]['teacher_seconds']:.1f} s"
        )
        for method, report, _, _ in rows:
            if method.startswith("mine") and report["pairs_scored"]:
                ratio = (report["queries"] / report["seconds"]) / (plain[1]["queries"] / plain[1]["seconds"])
                print(f"{method}: {ratio:.2f}x the plain loop's end-to-end queries/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
