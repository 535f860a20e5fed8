"""Checkpoint evaluation: eval.top_k sets the search depth (default: the protocol's), and a depth below the
protocol's deepest metric cutoff fails before anything is encoded."""

from __future__ import annotations

import json

import pytest
from test_train_loop import make_config

from retriever.config import BackboneConfig, EncoderConfig
from retriever.evaluation import get_protocol, read_run
from retriever.models.encoders import build_encoder
from retriever.pipeline import METRICS_FILE, evaluate_encoder, metric_depth, search_depth


@pytest.fixture(scope="module")
def encoder_and_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    cfg = make_config(
        root, "eval", data={"synthetic_docs": 200, "synthetic_train_queries": 20, "synthetic_test_queries": 12}
    )
    backbone = BackboneConfig(name="tiny-s", tokenizer=cfg.backbone.tokenizer, seed=3, lora={"enabled": False})
    encoder = build_encoder(backbone, EncoderConfig(paradigm="dense", passage_max_length=32))
    encoder.save(root / "encoder")
    return root / "encoder", cfg


def test_protocol_depths_and_cutoffs():
    assert metric_depth(get_protocol("msmarco-dev")) == 1000  # recall@1000
    assert metric_depth(get_protocol("trec-dl")) == 1000  # recall@1000-l2
    assert metric_depth(get_protocol("beir")) == 100
    beir = get_protocol("beir")
    assert search_depth(beir, None, "beir/scifact/test") == 100
    assert search_depth(beir, 1000, "beir/scifact/test") == 1000
    with pytest.raises(ValueError, match=r"eval.top_k=50 is too shallow for beir/scifact/test: .*need the top 100"):
        search_depth(beir, 50, "beir/scifact/test")


def test_top_k_drives_the_search_depth(encoder_and_config, tmp_path):
    encoder, cfg = encoder_and_config
    default = evaluate_encoder(encoder, ["synthetic/test"], cfg, tmp_path / "default")
    deeper_cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"top_k": 150})})
    deeper = evaluate_encoder(encoder, ["synthetic/test"], deeper_cfg, tmp_path / "deeper")
    short = read_run(tmp_path / "default" / "synthetic_test" / "run.trec")
    long = read_run(tmp_path / "deeper" / "synthetic_test" / "run.trec")
    assert max(len(docs) for docs in short.values()) == 100  # the synthetic protocol's depth
    assert max(len(docs) for docs in long.values()) == 150
    assert deeper == default  # the protocol fixes what is evaluated: metrics at its depth
    summary = json.loads((tmp_path / "deeper" / METRICS_FILE).read_text())
    assert summary["datasets"]["synthetic/test"]["depth"] == 150


def test_top_k_below_the_metric_cutoff_fails_before_encoding(encoder_and_config, tmp_path):
    encoder, cfg = encoder_and_config
    shallow = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"top_k": 10})})
    with pytest.raises(ValueError, match=r"eval.top_k=10 is too shallow for synthetic/test: .*recall@100.*top 100"):
        evaluate_encoder(encoder, ["synthetic/test"], shallow, tmp_path / "out")
    assert not (tmp_path / "out").exists()
