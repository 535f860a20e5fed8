"""Checkpoint evaluation: eval.top_k sets the search depth (default: the protocol's), and a depth below the
protocol's deepest metric cutoff fails before anything is encoded."""

from __future__ import annotations

import json

import pytest
from conftest import make_config

from retriever.config import BackboneConfig, EncoderConfig
from retriever.evaluation import get_protocol
from retriever.models.encoders import build_encoder
from retriever.pipeline import METRICS_FILE, evaluate_encoder, metric_depth, search_depth
from retriever.trec import read_run


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


def test_n_datasets_load_and_hash_the_encoder_once(encoder_and_config, tmp_path, monkeypatch):
    """Two datasets (two corpora and two query sets: four encoding runs) load the weights once and hash the
    encoder's files once."""
    import retriever.encoding.encoder as encoder_module

    calls = {"load": 0, "hash": 0}
    load, fingerprint = encoder_module.load_encoder, encoder_module.encoder_fingerprint

    def counted_load(*args, **kwargs):
        calls["load"] += 1
        return load(*args, **kwargs)

    def counted_fingerprint(*args, **kwargs):
        calls["hash"] += 1
        return fingerprint(*args, **kwargs)

    monkeypatch.setattr(encoder_module, "load_encoder", counted_load)
    monkeypatch.setattr(encoder_module, "encoder_fingerprint", counted_fingerprint)
    encoder, cfg = encoder_and_config
    results = evaluate_encoder(encoder, ["synthetic/test", "synthetic/train"], cfg, tmp_path / "out")
    assert sorted(results) == ["synthetic/test", "synthetic/train"]
    assert len(list((tmp_path / "out" / "corpus").glob("*/encodings/encoding.json"))) == 2
    assert calls == {"load": 1, "hash": 1}


def test_an_interrupted_index_build_is_rebuilt(encoder_and_config, tmp_path, monkeypatch):
    """A build that died after its first shard leaves no index in place; the next evaluation builds it and gives
    the metrics of an uninterrupted run."""
    import retriever.index.shards as shards_module

    encoder, cfg = encoder_and_config
    two_shards = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"num_shards": 2})})
    clean = evaluate_encoder(encoder, ["synthetic/test"], two_shards, tmp_path / "clean")
    build_shard = shards_module.build_shard

    def dies_on_the_second_shard(batch, folder, *args, **kwargs):
        if folder.name != "shard-00000":
            raise KeyboardInterrupt("killed while building the index")
        return build_shard(batch, folder, *args, **kwargs)

    monkeypatch.setattr(shards_module, "build_shard", dies_on_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        evaluate_encoder(encoder, ["synthetic/test"], two_shards, tmp_path / "out")
    (corpus,) = (tmp_path / "out" / "corpus").iterdir()
    assert sorted(p.name for p in corpus.iterdir()) == ["encodings"]  # no index, no half-built one beside it
    monkeypatch.setattr(shards_module, "build_shard", build_shard)
    assert evaluate_encoder(encoder, ["synthetic/test"], two_shards, tmp_path / "out") == clean
    assert sorted(p.name for p in (corpus / "index").iterdir()) == ["shard-00000", "shard-00001", "shards.json"]
