"""Real `retriever` processes writing one output: a second writer is refused by name, a writer killed with SIGKILL
leaves the previous output byte-identical (and nothing half-written in its place), and the next run succeeds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO_ROOT, TINY_CORPUS, mine_settings, mining_world, write_encodings

from retriever.cli import main
from retriever.config import BackboneConfig, EncoderConfig
from retriever.data.examples import read_training_examples, training_example_files
from retriever.encoding import DenseBatch, docs_to_parquet, read_encodings
from retriever.errors import DataFormatError
from retriever.index import open_shards
from retriever.mining.run import mine
from retriever.models.encoders import build_encoder
from retriever.outputs import PARTIAL, lock_path

pytestmark = pytest.mark.timeout(300)


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _partials(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(PARTIAL))


class _Writer:
    """`python -m retriever ARGS` in a child process (its output kept in files for the failure message)."""

    def __init__(self, args: list[str], logs: Path) -> None:
        self.log = logs
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "retriever", *args],
            cwd=REPO_ROOT,
            env=env,
            stdout=open(logs, "w"),  # noqa: SIM115 - closed with the process
            stderr=subprocess.STDOUT,
        )

    def wait_until(self, condition: Callable[[], bool], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                pytest.fail(f"the writer exited ({self.process.returncode}) early:\n{self.log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for the writer:\n{self.log.read_text()}")
            time.sleep(0.02)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=60)

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=60)


def _writing(out: Path) -> Callable[[], bool]:
    """True once a writer holds `out`'s lock and has its temporary folder."""
    return lambda: lock_path(out).exists() and bool(_partials(out))


@pytest.fixture(scope="module")
def encoder(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    backbone = BackboneConfig(name="tiny-s", tokenizer=str(tiny_tokenizer_dir), seed=3, lora={"enabled": False})
    directory = tmp_path_factory.mktemp("encoder")
    build_encoder(backbone, EncoderConfig(paradigm="dense", passage_max_length=32)).save(directory)
    return directory


def test_a_second_encode_is_refused_and_a_killed_one_costs_nothing(encoder, tmp_path, capsys):
    small = [(f"d{i}", text) for i, text in enumerate(TINY_CORPUS)]
    big = [(f"b{i}", f"{text} number {i}") for i, text in enumerate(TINY_CORPUS * 400)]  # 12,000 texts
    docs_to_parquet(small, tmp_path / "small.parquet")
    docs_to_parquet(big, tmp_path / "big.parquet")
    out = tmp_path / "encodings"
    encode = ["encode", str(encoder), "--out", str(out), "--batch-size", "8"]
    assert main([*encode, "--input", str(tmp_path / "small.parquet")]) == 0
    before = _tree(out)

    with _Writer([*encode, "--input", str(tmp_path / "big.parquet"), "--overwrite"], tmp_path / "a.log") as first:
        first.wait_until(_writing(out))
        capsys.readouterr()
        assert main([*encode, "--input", str(tmp_path / "small.parquet"), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert f"another process is writing it (pid {first.process.pid} on " in err and "encode" in err
        first.kill()
    assert _tree(out) == before  # --overwrite replaces only a complete output
    assert _partials(out)  # what the killed writer left lies beside the output, not in it

    assert main([*encode, "--input", str(tmp_path / "big.parquet"), "--overwrite"]) == 0
    info, batch = read_encodings(out)
    assert info.count == len(big) and batch.ids == [doc_id for doc_id, _ in big]
    assert _partials(out) == [] and not lock_path(out).exists()


def test_a_killed_index_build_leaves_the_previous_index(tmp_path, capsys):
    rng = np.random.default_rng(0)
    ids = [f"d{i:06d}" for i in range(300_000)]
    vectors = rng.standard_normal((len(ids), 32)).astype(np.float32)
    encoder = {"encoder_path": "m", "encoder_sha256": "0" * 64}
    write_encodings(tmp_path / "big", DenseBatch(ids, vectors), **encoder)
    write_encodings(tmp_path / "small", DenseBatch(ids[:50], vectors[:50]), **encoder)
    out = tmp_path / "index"
    assert main(["index", str(tmp_path / "small"), "--out", str(out)]) == 0
    before = _tree(out)

    with _Writer(["index", str(tmp_path / "big"), "--out", str(out), "--overwrite"], tmp_path / "a.log") as first:
        first.wait_until(_writing(out))
        capsys.readouterr()
        assert main(["index", str(tmp_path / "small"), "--out", str(out), "--overwrite"]) == 2
        assert f"another process is writing it (pid {first.process.pid} on " in capsys.readouterr().err
        first.kill()
    assert _tree(out) == before
    assert sum(shard.doc_count for shard in open_shards(out)) == 50

    assert main(["index", str(tmp_path / "big"), "--out", str(out), "--overwrite"]) == 0
    assert sum(shard.doc_count for shard in open_shards(out)) == len(ids)
    assert _partials(out) == [] and not lock_path(out).exists()


def test_a_killed_mining_job_resumes_to_the_rows_of_an_uninterrupted_one(tmp_path, capsys):
    world = mining_world(tmp_path)
    # every query with a positive, small shards, one pair per teacher call: a job long enough to stop midway
    values = {"max_queries": None, "pool_size": 20, "queries_per_shard": 5, "teacher": {"batch_size": 1}}
    reference = mine(mine_settings(world, tmp_path / "reference", **values))
    out = tmp_path / "mined"
    config = tmp_path / "mine.yaml"
    config.write_text(yaml.safe_dump(mine_settings(world, out, **values).model_dump(mode="json")))
    manifest = out / "manifest.json"

    def shards_recorded() -> int:
        try:
            return len(json.loads(manifest.read_text())["shards"])
        except (OSError, ValueError, KeyError):
            return 0

    with _Writer(["mine", str(config)], tmp_path / "mine.log") as job:
        job.wait_until(lambda: shards_recorded() >= 3)
        job.kill()
    done = shards_recorded()
    assert 3 <= done < reference.shards, "the job finished before it was stopped; give it more work"
    assert not json.loads(manifest.read_text())["complete"]
    with pytest.raises(DataFormatError, match="mining has not finished"):
        training_example_files(out)  # the trainer refuses half a data set

    assert main(["mine", str(config)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shards_reused"] >= done and report["shards_reused"] + report["shards_written"] == reference.shards
    resumed = read_training_examples(out).to_pylist()
    uninterrupted = read_training_examples(tmp_path / "reference").to_pylist()
    assert [(r["query_id"], r["positive_id"], r["negative_ids"]) for r in resumed] == [
        (r["query_id"], r["positive_id"], r["negative_ids"]) for r in uninterrupted
    ]
    scores = [s for r in resumed for s in (r["teacher_pos"], *r["teacher_negs"])]
    expected = [s for r in uninterrupted for s in (r["teacher_pos"], *r["teacher_negs"])]
    assert np.abs(np.array(scores) - np.array(expected)).max() <= 1e-5
    assert _partials(out / "part-00000.parquet") == [] and not lock_path(out).exists()
