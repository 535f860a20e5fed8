"""`retriever eval-checkpoint` end to end on the real DL19 passage pool with an encoder trained by `retriever
train` (stories260K imported from llama2.c, a few dense CL steps)."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import shared_path

from retriever.cli import main

pytestmark = [pytest.mark.real, pytest.mark.timeout(900)]


def test_eval_checkpoint_on_the_dl19_pool(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("IR_DATASETS_HOME", str(tmp_path / "ir_datasets"))
    model = shared_path("models", "stories260K")
    trecdl = shared_path("msmarco_trecdl")
    hf = tmp_path / "stories260K-hf"
    assert main(["convert", "llama2c", str(model / "stories260K.bin"), str(model / "tok512.bin"), str(hf)]) == 0
    capsys.readouterr()

    config = tmp_path / "train.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "dl19-encoder",
                "backbone": {"name": str(hf)},
                "encoder": {"paradigm": "dense", "query_max_length": 16, "passage_max_length": 32},
                "loss": {"name": "cl", "num_negatives": 1},
                "budget": {"max_steps": 10},
                "train": {"batch_size": 4, "output_dir": str(tmp_path / "runs"), "checkpoint_every": 100},
                "data": {"synthetic_docs": 300, "synthetic_train_queries": 100, "synthetic_test_queries": 20},
                "tracking": {"enabled": False},
            }
        )
    )
    assert main(["train", str(config)]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["steps"] == 10

    register = ["data", "register-pool", "dl19-pool", str(trecdl / "rank_llm_retrieve_results")]
    qrels = trecdl / "qrels.dl19-passage.txt"
    register += ["--topics", str(trecdl / "topics.dl19-passage.txt"), "--qrels", str(qrels)]
    assert main(register) == 0
    assert capsys.readouterr().out.strip() == "local/dl19-pool"

    out = tmp_path / "eval"
    command = ["eval-checkpoint", trained["export_dir"], "--dataset", "local/dl19-pool", "--protocol", "trec-dl"]
    assert (
        main([*command, "--out", str(out), "--set", "eval.passage_max_length=64", "--set", "eval.batch_size=128"]) == 0
    )
    printed = capsys.readouterr().out
    assert "ndcg@10" in printed and "mrr@10-l2" in printed and "recall@1000-l2" in printed
    summary = json.loads((out / "metrics.json").read_text())
    metrics = summary["datasets"]["local/dl19-pool"]["metrics"]
    assert set(metrics) == {"ndcg@10", "mrr@10-l2", "recall@1000-l2"}
    assert summary["datasets"]["local/dl19-pool"]["queries_evaluated"] == 43
    # Every judged query retrieves from the 14,581-passage pool; recall is measured against all judged passages.
    run_lines = (out / "local_dl19-pool" / "run.trec").read_text().splitlines()
    assert len(run_lines) == 43 * 1000
    assert 0.0 < metrics["ndcg@10"] < 1.0
