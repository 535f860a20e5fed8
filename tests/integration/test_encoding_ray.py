"""Corpus encoding on Ray Data (2 actors x 0.5 CPU): the same rows as the in-process path."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY_CORPUS

from retriever.config import BackboneConfig, EncoderConfig
from retriever.encoding import docs_to_parquet, encode_corpus, encode_corpus_ray, read_encoding_info
from retriever.models.encoders import build_encoder

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

DOCS = [
    (f"p{i}", " ".join((TINY_CORPUS[i % 10] + " " + TINY_CORPUS[(i + 4) % 10]).split()[: 2 + i % 17]))
    for i in range(60)
]


def saved_encoder(tokenizer_dir, directory, paradigm: str):
    encoder = build_encoder(
        BackboneConfig(name="tiny-s", tokenizer=str(tokenizer_dir), seed=5),
        EncoderConfig(paradigm=paradigm, passage_max_length=32),
    )
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return encoder.save(directory)


def rows_by_id(files) -> dict[str, dict]:
    table = pa.concat_tables([pq.read_table(f) for f in files])
    return {row.pop("doc_id"): row for row in table.to_pylist()}


@pytest.mark.parametrize(("paradigm", "prune"), [("dense", None), ("sparse", 20)])
def test_ray_encoding_equals_the_in_process_path(ray_cluster, tiny_tokenizer_dir, tmp_path, paradigm, prune):
    encoder_dir = saved_encoder(tiny_tokenizer_dir, tmp_path / "encoder", paradigm)
    corpus = tmp_path / "corpus.parquet"
    docs_to_parquet(DOCS, corpus)
    local = encode_corpus(encoder_dir, DOCS, tmp_path / "local", batch_size=8, prune_top_k=prune, progress=False)
    remote = encode_corpus_ray(
        encoder_dir,
        corpus,
        tmp_path / "ray",
        num_actors=2,
        cpus_per_actor=0.5,
        batch_size=8,
        rows_per_call=16,
        num_blocks=4,
        shard_rows=25,
        prune_top_k=prune,
    )
    assert remote.count == local.count == 60
    assert all(pq.ParquetFile(f).metadata.num_rows <= 25 for f in remote.files)
    meta = read_encoding_info(tmp_path / "ray").to_json()
    assert meta == remote.info.to_json()
    local_meta = local.info.to_json()
    per_file = ("files", "sha256")  # Ray Data names and splits its own files
    assert {k: v for k, v in meta.items() if k not in per_file} == {
        k: v for k, v in local_meta.items() if k not in per_file
    }
    assert meta["files"] == sorted(f.name for f in remote.files) == sorted(meta["sha256"])

    schema = pq.read_schema(remote.files[0])
    assert schema.field("doc_id").type == pa.string()
    expected, got = rows_by_id(local.files), rows_by_id(remote.files)
    assert sorted(got) == sorted(expected) == sorted(doc_id for doc_id, _ in DOCS)
    for doc_id, row in expected.items():
        if paradigm == "dense":
            assert schema.field("vector").type == pa.list_(pa.float32())
            np.testing.assert_allclose(got[doc_id]["vector"], row["vector"], atol=1e-5, rtol=0)
        else:
            assert schema.field("term_ids").type == pa.list_(pa.int32())
            assert got[doc_id]["term_ids"] == row["term_ids"] and len(row["term_ids"]) == 20
            np.testing.assert_allclose(got[doc_id]["weights"], row["weights"], atol=1e-5, rtol=0)
