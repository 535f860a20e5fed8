"""Checkpoints you can trust: a checksum manifest written last, verified before loading; a corrupt checkpoint is
skipped for the previous one (and said so), none valid is a clear error, and a killed run leaves only complete
checkpoints and exports in place."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, make_config

from retriever.checksums import sha256_file
from retriever.errors import UserError
from retriever.outputs import PARTIAL
from retriever.train.checkpoint import MANIFEST_FILE, PROGRESS_FILE, Progress, verify_checkpoint
from retriever.train.errors import InvalidCheckpointError, NoValidCheckpointError
from retriever.train.loop import check_finite_files
from retriever.train.trainer import run_dir_for, run_training

PROBES = ["kotibo suka butefi fufa", "guvasar ragarer mile"]


def flip(path: Path, count: int, at: float = 0.5) -> None:
    """Invert `count` bytes of the file from the fraction `at` of its length on."""
    data = bytearray(path.read_bytes())
    start = min(int(len(data) * at), len(data) - count)
    for i in range(start, start + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def checkpoint_dirs(cfg) -> list[Path]:
    return sorted(p for p in (run_dir_for(cfg) / "checkpoints").iterdir() if not p.name.startswith("."))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 6-step run with checkpoints at steps 3 and 6, trained once; tests work on copies of its folder (in the
    same output dir: its synthetic data is built once)."""
    root = tmp_path_factory.mktemp("trusted")
    cfg = make_config(root, "ckpt", encoder={"paradigm": "dense"})
    result = run_training(cfg, probe_texts=PROBES)
    assert [p.name for p in checkpoint_dirs(cfg)] == ["step-00000003", "step-00000006"]
    return cfg, result


def copy_of(trained, name: str, export: bool = False):
    """The trained run's folder as the run `name` (with or without its export)."""
    cfg, _ = trained
    copy = make_config(cfg.train.output_dir, name, encoder={"paradigm": "dense"})
    ignore = None if export else shutil.ignore_patterns("encoder")
    shutil.copytree(run_dir_for(cfg), run_dir_for(copy), ignore=ignore)
    return copy


def test_every_file_is_in_the_manifest_and_it_verifies(trained):
    cfg, _ = trained
    for directory in checkpoint_dirs(cfg):
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
        names = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}
        assert set(manifest["files"]) == names - {MANIFEST_FILE}
        assert {"__0_0.distcp", ".metadata", PROGRESS_FILE, "rng-rank0.pt"} <= set(manifest["files"])
        assert verify_checkpoint(directory) is None


def garble(path: Path) -> None:
    path.write_bytes(b"\xff\xfe{garbled")


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda d: (d / MANIFEST_FILE).unlink(), "no checksums.json (written last"),
        (lambda d: flip(d / MANIFEST_FILE, 8, 0.2), "checksums.json is unreadable"),
        (lambda d: (d / "rng-rank0.pt").unlink(), "rng-rank0.pt missing (listed in checksums.json)"),
        (lambda d: (d / "notes.txt").write_text("x"), "notes.txt not in checksums.json"),
        (lambda d: flip(d / ".metadata", 8), ".metadata does not match its checksum in checksums.json"),
        (lambda d: flip(d / "__0_0.distcp", 24), "__0_0.distcp does not match its checksum in checksums.json"),
        (lambda d: garble(d / PROGRESS_FILE), "progress.json does not match its checksum"),
    ],
    ids=["no-manifest", "bad-manifest", "missing", "extra", "metadata", "shard", "progress"],
)
def test_a_checkpoint_without_its_manifest_or_with_a_missing_extra_or_changed_file_is_invalid(
    trained, tmp_path, change, why
):
    directory = tmp_path / "step"
    shutil.copytree(checkpoint_dirs(trained[0])[0], directory)
    change(directory)
    problem = verify_checkpoint(directory)
    assert problem is not None and problem.startswith(why)


def test_an_unreadable_progress_file_is_reported_with_its_path(trained, tmp_path):
    directory = tmp_path / "step"
    shutil.copytree(checkpoint_dirs(trained[0])[0], directory)
    garble(directory / PROGRESS_FILE)
    with pytest.raises(InvalidCheckpointError, match=f"{directory / PROGRESS_FILE}: unreadable .*utf-8"):
        Progress.read(directory)
    # Rewritten with its manifest (as if both were garbled together), the file itself is what fails.
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    garbled = directory / PROGRESS_FILE
    manifest["files"][PROGRESS_FILE] = {"sha256": sha256_file(garbled), "bytes": garbled.stat().st_size, "rank": 0}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert verify_checkpoint(directory).startswith("progress.json is unreadable ('utf-8' codec can't decode")


def test_a_corrupt_latest_shard_falls_back_to_the_previous_checkpoint(trained, capfd):
    _, first = trained
    cfg = copy_of(trained, "fallback")
    older, latest = checkpoint_dirs(cfg)
    flip(latest / "__0_0.distcp", 24)
    capfd.readouterr()
    result = run_training(cfg, probe_texts=PROBES)
    err = capfd.readouterr().err
    assert f"checkpoint {latest} skipped: __0_0.distcp does not match its checksum" in err
    assert f"resumed from step 3 (checkpoint {older})" in err
    assert result["resumed_from"] == str(older) and result["resumed_from_step"] == 3
    assert len(result["skipped_checkpoints"]) == 1 and result["skipped_checkpoints"][0].startswith(str(latest))
    # Steps 4-6 again from step 3's exact state: the same final step and the same trained encoder, all finite.
    assert result["steps"] == first["steps"] == 6 and result["flops"] == first["flops"]
    check_finite_files(Path(result["export_dir"]))
    assert torch.allclose(torch.tensor(result["probe_encodings"]), torch.tensor(first["probe_encodings"]), atol=1e-5)
    assert all(verify_checkpoint(d) is None for d in checkpoint_dirs(cfg))  # step 6 was written again


@pytest.mark.parametrize(
    "damage",
    [lambda d: flip(d / ".metadata", 8), lambda d: garble(d / PROGRESS_FILE)],
    ids=["metadata", "progress"],
)
def test_no_valid_checkpoint_is_a_clear_error_and_nothing_is_trained_or_exported(trained, request, damage):
    cfg = copy_of(trained, f"invalid-{request.node.callspec.id}")
    for directory in checkpoint_dirs(cfg):
        damage(directory)
    with pytest.raises(NoValidCheckpointError) as raised:
        run_training(cfg)
    message = str(raised.value)
    assert isinstance(raised.value, UserError) and "\n" not in message
    assert all(str(d) in message for d in checkpoint_dirs(cfg))
    assert f"Delete {run_dir_for(cfg) / 'checkpoints'} to train from scratch" in message
    assert not (run_dir_for(cfg) / "encoder").exists()


def test_an_interrupted_export_leaves_the_previous_export_in_place(trained, monkeypatch):
    cfg = copy_of(trained, "reexport", export=True)
    export = run_dir_for(cfg) / "encoder"
    before = {p.relative_to(export): p.read_bytes() for p in export.rglob("*") if p.is_file()}

    def interrupted(directory, shown=None):
        assert any(directory.rglob("*.safetensors"))  # the new export is written, not yet in place
        raise KeyboardInterrupt

    monkeypatch.setattr("retriever.train.loop.check_finite_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg)  # the budget is spent: resume at step 6, export again
    assert {p.relative_to(export): p.read_bytes() for p in export.rglob("*") if p.is_file()} == before
    assert not list(run_dir_for(cfg).glob(f"{PARTIAL}*"))


# A training subprocess that SIGKILLs itself in the middle of its second checkpoint: the shards are written, the
# manifest is not (what `kill -9` from outside does at that moment, without a race on when it lands).
KILLED_RUN = """
import os, signal, sys
from pathlib import Path
from retriever.config import ExperimentConfig
import retriever.train.checkpoint as checkpoint
from retriever.train.trainer import run_training

cfg = ExperimentConfig.model_validate_json(Path(sys.argv[1]).read_text())
real_manifest, writes = checkpoint.write_manifest, []

def manifest_then_die(directory, rank, world_size):
    writes.append(directory)
    if len(writes) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    real_manifest(directory, rank, world_size)

checkpoint.write_manifest = manifest_then_die
run_training(cfg)
"""


def test_kill_9_in_the_middle_leaves_only_complete_checkpoints_and_the_rerun_succeeds(trained):
    root = Path(trained[0].train.output_dir)
    cfg = make_config(root, "killed", budget={"max_steps": 6}, train={"checkpoint_every": 2})
    config = root / "killed.json"
    config.write_text(cfg.model_dump_json())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(config)], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
    run_dir = run_dir_for(cfg)
    assert not (run_dir / "encoder").exists()
    assert [p.name for p in checkpoint_dirs(cfg)] == ["step-00000002"]
    assert verify_checkpoint(run_dir / "checkpoints" / "step-00000002") is None
    assert list((run_dir / "checkpoints").glob(f"{PARTIAL}*-step-00000004"))  # the killed write, out of the way

    result = run_training(cfg)
    assert result["steps"] == 6 and result["resumed_from_step"] == 2
    check_finite_files(Path(result["export_dir"]))
    assert [p.name for p in checkpoint_dirs(cfg)] == ["step-00000004", "step-00000006"]
    assert not list(run_dir.rglob(f"{PARTIAL}*"))  # removed by the next writers
