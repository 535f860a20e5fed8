"""In-process corpus encoding: parquet output equals the encoder's own outputs, pruning, bucketing, metadata."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY_CORPUS, save_encoder

from retriever.encoding import (
    ENCODING_FILE,
    EmptyInputError,
    docs_to_parquet,
    encode_corpus,
    encode_texts,
    encoder_fingerprint,
    length_batches,
    load_inference_encoder,
    read_encoding_info,
    read_encodings,
    sparse_terms,
)
from retriever.models.encoders import SparseEncoder, load_encoder

# Texts of very different token lengths (1 to ~60 words), so that length sorting really reorders them.
TEXTS = [
    " ".join((TINY_CORPUS[i % 10] + " " + TINY_CORPUS[(i + 3) % 10]).split()[: 1 + (i * 7) % 19]) for i in range(37)
]
TEXTS[5] = " ".join(TINY_CORPUS[:6])
DOCS = [(f"doc-{i:03d}", text) for i, text in enumerate(TEXTS)]


@pytest.fixture(scope="module")
def dense_dir(tiny_tokenizer_dir, tmp_path_factory):
    return save_encoder(tiny_tokenizer_dir, tmp_path_factory.mktemp("dense"), "dense", passage_max_length=48)


@pytest.fixture(scope="module")
def sparse_dir(tiny_tokenizer_dir, tmp_path_factory):
    return save_encoder(tiny_tokenizer_dir, tmp_path_factory.mktemp("sparse"), "sparse", sparse_chunk_tokens=64)


def read_rows(files) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in files])


def test_dense_corpus_equals_encode_passages_row_for_row(dense_dir, tmp_path):
    result = encode_corpus(dense_dir, DOCS, tmp_path / "out", batch_size=4, window=12, shard_rows=10, progress=False)
    # 37 rows in shards of 10, written in input order.
    assert [f.name for f in result.files] == [f"part-0000{i}.parquet" for i in range(4)]
    assert [pq.ParquetFile(f).metadata.num_rows for f in result.files] == [10, 10, 10, 7]
    table = read_rows(result.files)
    assert table.schema.field("doc_id").type == pa.string()
    assert table.schema.field("vector").type.value_type == pa.float32()
    assert table.column("doc_id").to_pylist() == [doc_id for doc_id, _ in DOCS]
    vectors = np.array(table.column("vector").to_pylist(), dtype=np.float32)
    expected = load_encoder(dense_dir).encode_passages(TEXTS, batch_size=8).numpy()
    assert vectors.shape == (37, 32)
    np.testing.assert_allclose(vectors, expected, atol=1e-5, rtol=0)

    meta = json.loads((tmp_path / "out" / ENCODING_FILE).read_text())
    assert meta == result.info.to_json() == read_encoding_info(tmp_path / "out").to_json()
    assert meta["paradigm"] == "dense" and meta["dimension"] == 32 and "vocab_size" not in meta
    assert meta["count"] == result.count == 37
    assert meta["prune_top_k"] is None and meta["kind"] == "passage"
    assert meta["max_length"] == 48  # the encoder's passage_max_length
    assert meta["encoder"]["sha256"] == encoder_fingerprint(dense_dir)
    assert meta["files"] == [f.name for f in result.files]


def test_sparse_corpus_equals_to_terms(sparse_dir, tmp_path):
    result = encode_corpus(sparse_dir, DOCS, tmp_path / "out", batch_size=5, max_length=40, progress=False)
    table = read_rows(result.files)
    assert table.schema.field("term_ids").type.value_type == pa.int32()
    assert table.schema.field("weights").type.value_type == pa.float32()
    assert table.column("doc_id").to_pylist() == [doc_id for doc_id, _ in DOCS]
    expected = SparseEncoder.to_terms(load_encoder(sparse_dir).encode_passages(TEXTS, max_length=40))
    for ids, weights, (want_ids, want_weights) in zip(
        table.column("term_ids").to_pylist(), table.column("weights").to_pylist(), expected
    ):
        assert ids == want_ids.tolist()
        np.testing.assert_allclose(weights, want_weights, atol=1e-5, rtol=0)
    meta = result.info.to_json()
    assert meta["paradigm"] == "sparse" and meta["vocab_size"] == 400 and "dimension" not in meta
    assert meta["max_length"] == 40


def top_k_reference(ids: np.ndarray, weights: np.ndarray, k: int) -> tuple[list[int], list[float]]:
    """The k largest weights (ties: smaller term id), returned in ascending term order."""
    chosen = np.lexsort((ids, -weights))[:k]
    keep = np.sort(chosen)
    return ids[keep].tolist(), weights[keep].tolist()


def test_pruning_keeps_the_top_k_weights(sparse_dir, tmp_path):
    full = encode_corpus(sparse_dir, DOCS, tmp_path / "full", batch_size=8, progress=False)
    pruned = encode_corpus(sparse_dir, DOCS, tmp_path / "pruned", batch_size=8, prune_top_k=7, progress=False)
    assert pruned.info.to_json()["prune_top_k"] == 7
    full_rows, pruned_rows = read_rows(full.files), read_rows(pruned.files)
    for ids, weights, got_ids, got_weights in zip(
        full_rows.column("term_ids").to_pylist(),
        full_rows.column("weights").to_pylist(),
        pruned_rows.column("term_ids").to_pylist(),
        pruned_rows.column("weights").to_pylist(),
    ):
        assert len(ids) > 7  # an untrained sparse encoder is nearly dense
        want_ids, want_weights = top_k_reference(np.array(ids), np.array(weights, dtype=np.float32), 7)
        assert got_ids == want_ids
        assert got_weights == want_weights
        assert min(got_weights) >= max(w for i, w in zip(ids, weights) if i not in set(got_ids))


def test_sparse_terms_by_hand():
    reps = torch.tensor(
        [
            [0.0, 3.0, 1.0, 3.0, 0.0, 2.0],
            [1.0, 1.0, 1.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [0.0, 0.5, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    as_lists = [(ids.tolist(), weights.tolist()) for ids, weights in sparse_terms(reps)]
    assert as_lists == [([1, 2, 3, 5], [3.0, 1.0, 3.0, 2.0]), ([0, 1, 2], [1.0, 1.0, 1.0]), ([], []), ([1], [0.5])]
    top2 = [(ids.tolist(), weights.tolist()) for ids, weights in sparse_terms(reps, 2)]
    # row 1: three tied weights, the two smallest term ids win; zeros are never kept.
    assert top2 == [([1, 3], [3.0, 3.0]), ([0, 1], [1.0, 1.0]), ([], []), ([1], [0.5])]
    top3 = [ids.tolist() for ids, _ in sparse_terms(reps, 3)]
    assert top3 == [[1, 3, 5], [0, 1, 2], [], [1]]
    ids, weights = sparse_terms(reps)[0]
    assert ids.dtype == np.int32 and weights.dtype == np.float32
    with pytest.raises(ValueError, match="positive"):
        sparse_terms(reps, 0)


def test_length_batches_by_hand():
    lengths = np.array([3, 10, 5, 10, 1])
    assert [b.tolist() for b in length_batches(lengths, 2)] == [[1, 3], [2, 0], [4]]
    # A 12-token budget holds one 10-token row, or two rows of <= 6 tokens; batch_size still caps rows.
    assert [b.tolist() for b in length_batches(lengths, 2, max_batch_tokens=12)] == [[1], [3], [2, 0], [4]]
    assert [b.tolist() for b in length_batches(lengths, 9, max_batch_tokens=12)] == [[1], [3], [2, 0], [4]]
    assert [b.tolist() for b in length_batches(lengths, 9, max_batch_tokens=4)] == [[1], [3], [2], [0], [4]]
    with pytest.raises(ValueError, match="batch_size"):
        length_batches(lengths, 0)


@pytest.mark.parametrize("paradigm", ["dense", "sparse"])
def test_bucketing_batching_and_streams_do_not_change_results(dense_dir, sparse_dir, paradigm):
    directory = dense_dir if paradigm == "dense" else sparse_dir
    encoder = load_encoder(directory)
    reference = encoder.encode_passages(TEXTS, batch_size=len(TEXTS))  # one padded batch, input order
    threads = torch.get_num_threads()
    for texts, options in (
        (TEXTS[:16], {"batch_size": 1, "num_streams": 1}),  # no padding at all
        (TEXTS, {"batch_size": 6, "num_streams": 2}),
        (TEXTS, {"batch_size": 64, "max_batch_tokens": 40, "num_streams": 3}),
        (TEXTS, {"batch_size": 4, "window": 10, "num_streams": 2}),  # 4 windows, tokenized ahead
    ):
        got = encode_texts(encoder, texts, "passage", **options)
        want = reference[: len(texts)]
        assert torch.get_num_threads() == threads
        if paradigm == "dense":
            np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=0)
        else:
            dense = np.zeros(tuple(want.shape), dtype=np.float32)
            for row, (ids, weights) in enumerate(got):
                dense[row, ids] = weights
            np.testing.assert_allclose(dense, want.numpy(), atol=1e-5, rtol=0)


def test_encode_texts_leaves_the_encoder_as_it_was(dense_dir):
    encoder = load_encoder(dense_dir)
    encoder.train()
    queries = ["low rank adapters", "what is a sparse retriever"]
    got = encode_texts(encoder, queries, "query")
    assert encoder.training and encoder.lm.config.use_cache is True
    assert got.dtype == np.float32 and got.shape == (2, 32)
    np.testing.assert_allclose(got, load_encoder(dense_dir).encode_queries(queries).numpy(), atol=1e-5, rtol=0)
    assert encode_texts(encoder, [], "query").shape == (0, 32)
    with pytest.raises(TypeError, match="not one string"):
        encode_texts(encoder, "one query", "query")
    with pytest.raises(ValueError, match="prune_top_k applies to sparse"):
        encode_texts(encoder, queries, "query", prune_top_k=3)


def test_merged_adapters_match_the_peft_encoder(sparse_dir):
    merged = load_inference_encoder(sparse_dir, device="cpu")
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    peft = load_encoder(sparse_dir)
    torch.testing.assert_close(merged.encode_passages(TEXTS[:9]), peft.encode_passages(TEXTS[:9]), atol=1e-5, rtol=0)


def test_parquet_input_equals_iterable_input(dense_dir, tmp_path):
    staged = tmp_path / "corpus.parquet"
    assert docs_to_parquet(iter(DOCS), staged, rows_per_group=8) == 37
    table = pq.read_table(staged)
    assert table.schema == pa.schema([("doc_id", pa.string()), ("text", pa.string())])
    assert pq.ParquetFile(staged).metadata.num_row_groups == 5
    from_parquet = encode_corpus(dense_dir, staged, tmp_path / "a", batch_size=4, window=16, progress=False)
    from_docs = encode_corpus(dense_dir, DOCS, tmp_path / "b", batch_size=4, progress=False)
    a, b = read_rows(from_parquet.files), read_rows(from_docs.files)
    assert a.column("doc_id").to_pylist() == b.column("doc_id").to_pylist()
    np.testing.assert_allclose(
        np.array(a.column("vector").to_pylist()), np.array(b.column("vector").to_pylist()), atol=1e-5, rtol=0
    )


def test_fingerprint_follows_the_files_that_decide_outputs(tiny_tokenizer_dir, dense_dir, tmp_path):
    digest = encoder_fingerprint(dense_dir)
    assert len(digest) == 64 and digest == encoder_fingerprint(dense_dir)
    copy = tmp_path / "copy"
    shutil.copytree(dense_dir, copy)
    assert encoder_fingerprint(copy) == digest  # content, not location
    (copy / "notes.txt").write_text("not part of the encoder")
    assert encoder_fingerprint(copy) == digest
    # A different adapter (same backbone, same settings) is a different encoder.
    other = save_encoder(tiny_tokenizer_dir, tmp_path / "other", "dense", lora_seed=2, passage_max_length=48)
    assert (other / "backbone" / "model.safetensors").read_bytes() == (
        dense_dir / "backbone" / "model.safetensors"
    ).read_bytes()
    assert encoder_fingerprint(other) != digest
    # Settings in encoder.json count too.
    meta = json.loads((copy / "encoder.json").read_text())
    meta["encoder"]["add_bos"] = not meta["encoder"]["add_bos"]
    (copy / "encoder.json").write_text(json.dumps(meta))
    assert encoder_fingerprint(copy) != digest
    with pytest.raises(FileNotFoundError, match="encoder.json missing"):
        encoder_fingerprint(tmp_path)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_existing_output_needs_overwrite_and_bad_input_never_costs_it(dense_dir, tmp_path):
    out = tmp_path / "out"
    encode_corpus(dense_dir, DOCS[:5], out, progress=False)
    before = _files(out)
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        encode_corpus(dense_dir, DOCS[:3], out, progress=False)
    # Input errors found before (a known-empty corpus) or while encoding (a generator that turns out empty, a
    # duplicate id) leave the finished encoding as it was.
    with pytest.raises(EmptyInputError, match="the corpus to encode is empty"):
        encode_corpus(dense_dir, [], out, progress=False, overwrite=True)
    with pytest.raises(EmptyInputError, match="the query set to encode is empty"):
        encode_corpus(dense_dir, iter([]), out, kind="query", progress=False, overwrite=True)
    with pytest.raises(ValueError, match="duplicate doc_id 'doc-000'"):
        encode_corpus(dense_dir, DOCS[:3] + DOCS[:1], out, progress=False, overwrite=True)
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no lock or temporary folder left
    result = encode_corpus(dense_dir, DOCS[:3], out, progress=False, overwrite=True)
    assert result.count == 3 and read_encodings(out)[1].ids == [d for d, _ in DOCS[:3]]
    (out / "notes.txt").write_text("mine")  # a folder holding the user's other files is never replaced
    with pytest.raises(FileExistsError, match="holds files that are not an encodings folder"):
        encode_corpus(dense_dir, DOCS[:3], out, progress=False, overwrite=True)


def test_bad_settings_leave_an_existing_output_untouched(dense_dir, tmp_path):
    out = tmp_path / "out"
    first = encode_corpus(dense_dir, DOCS[:5], out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match="prune_top_k applies to sparse"):
        encode_corpus(dense_dir, DOCS[:3], out, prune_top_k=5, progress=False, overwrite=True)
    with pytest.raises(ValueError, match="kind must be 'query' or 'passage'"):
        encode_corpus(dense_dir, DOCS[:3], out, kind="document", progress=False, overwrite=True)  # type: ignore[arg-type]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert read_encoding_info(out).to_json()["count"] == first.count == 5


def test_bad_input_is_a_clear_error(dense_dir, tmp_path):
    with pytest.raises(ValueError, match="duplicate doc_id 'doc-000'"):
        encode_corpus(dense_dir, DOCS[:3] + DOCS[:1], tmp_path / "a", progress=False)
    with pytest.raises(TypeError, match=r"document 1 \(id 'x'\): text is NoneType"):
        encode_corpus(dense_dir, [("a", "text"), ("x", None)], tmp_path / "b", progress=False)
    with pytest.raises(TypeError, match="expected a \\(doc_id, text\\) pair"):
        encode_corpus(dense_dir, ["just a text"], tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="prune_top_k applies to sparse"):
        encode_corpus(dense_dir, DOCS, tmp_path / "d", prune_top_k=5, progress=False)
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": ["a"], "text": ["b"]}), bad)
    with pytest.raises(ValueError, match=r"bad.parquet: missing column\(s\) \['doc_id'\]"):
        encode_corpus(dense_dir, bad, tmp_path / "e", progress=False)
    with pytest.raises(ValueError, match="duplicate doc_id 'doc-001'"):
        docs_to_parquet(DOCS[:2] + DOCS[1:2], tmp_path / "dup.parquet")
    assert not (tmp_path / "dup.parquet").exists()
