"""Bad input to the command line: one table of argv -> exit status and the message on stderr.

Every row runs `retriever.cli.main(argv)` in this process against shared fixtures built once for the module, and
checks that the command printed `error: ...` (no traceback) naming the problem, and that every file under the
fixture folders is byte-identical afterwards (a failed command changes nothing it was given).

A row is one line: (id, argv, exit status, message fragment). Placeholders in argv: `{fx}` the fixture folder
(see `fixtures` for what it holds), `{tmp}` a fresh empty folder for this row's outputs, `{ro}` a folder nothing
can be written to (`chattr +i`; rows using it are skipped where that is unavailable).
"""

# A row of the table is one line, whatever its length.
# ruff: noqa: E501
from __future__ import annotations

import gzip
import hashlib
import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TINY_CORPUS

import retriever.cli as cli
from retriever.errors import UserError

OFFLINE_ID = "msmarco-passage/dev/small"  # needs the MS MARCO collection, never present in the tests' home

# fmt: off
CASES: list[tuple[str, str, int, str]] = [
    # ---------------------------------------------------------------- configs (plan reads one and nothing else)
    ("config-missing", "plan {fx}/configs/absent.yaml", 2, "absent.yaml: config file not found"),
    ("config-is-a-folder", "plan {fx}/configs", 2, "configs: is a folder, not a config file"),
    ("config-empty", "plan {fx}/configs/empty.yaml", 2, "empty.yaml: the config file is empty"),
    ("config-only-comments", "plan {fx}/configs/comments.yaml", 2, "comments.yaml: the config file is empty"),
    ("config-malformed-yaml", "plan {fx}/configs/malformed.yaml", 2, "malformed.yaml:3:1: not valid YAML (while parsing a flow sequence"),
    ("config-not-utf8", "plan {fx}/configs/latin1.yaml", 2, "latin1.yaml: not UTF-8 text"),
    ("config-top-level-list", "plan {fx}/configs/list.yaml", 2, "the top level must be a mapping of sections"),
    ("config-unknown-key", "plan {fx}/configs/unknown-key.yaml", 2, "train.learning_rate: unknown key; allowed keys here: batch_size, lr"),
    ("config-unknown-section", "plan {fx}/configs/unknown-section.yaml", 2, "trainer: unknown key; allowed keys here: name, backbone"),
    ("config-nested-unknown-key", "plan {fx}/configs/nested-unknown.yaml", 2, "backbone.lora.rank: unknown key; allowed keys here: enabled, r,"),
    ("config-value-out-of-range", "plan {fx}/configs/negative-lr.yaml", 2, "train.lr: Input should be greater than 0 (got -0.1)"),
    ("config-wrong-type", "plan {fx}/configs/wrong-type.yaml", 2, "train.batch_size: Input should be a valid integer"),
    ("config-both-budgets", "plan {fx}/configs/both-budgets.yaml", 2, "budget: set exactly one of budget.flops or budget.max_steps"),
    ("config-fixed-cell-override", "plan {fx}/configs/fixed-override.yaml", 2, "override 0 sets 'budget.flops', which no override may set"),
    ("override-without-equals", "plan {fx}/configs/good.yaml train.lr", 2, "override 'train.lr': expected KEY.PATH=VALUE"),
    ("override-empty-key-part", "plan {fx}/configs/good.yaml train..lr=1", 2, "empty part in key path 'train..lr'"),
    ("override-bad-yaml", "plan {fx}/configs/good.yaml train.lr=[1", 2, "override 'train.lr=[1': value is not valid YAML"),
    ("override-unknown-key", "plan {fx}/configs/good.yaml train.no_such_key=1", 2, "train.no_such_key: unknown key"),
    ("override-into-a-value", "plan {fx}/configs/good.yaml train.lr.x=1", 2, "override 'train.lr.x=1': 'lr' is a value, not a section"),
    ("override-bad-literal", "plan {fx}/configs/good.yaml encoder.paradigm=hybrid", 2, "encoder.paradigm: Input should be 'dense' or 'sparse'"),
    ("override-unknown-loss", "plan {fx}/configs/good.yaml sweep.losses=[xyz]", 2, "sweep.losses.0: Input should be 'cl', 'kd' or 'cl+kd'"),
    ("unknown-preset", "plan {fx}/configs/good.yaml sweep.backbones=[tiny-xl]", 2, "unknown backbone 'tiny-xl'; known: llama-3.2-1b, llama-3.2-3b, llama-3-8b, tiny-s, tiny-m, tiny-l"),
    ("unknown-preset-in-train", "train {fx}/configs/good.yaml backbone.name=tiny-xl", 2, "unknown backbone 'tiny-xl'; known:"),
    ("unknown-preset-in-sweep", "sweep {fx}/configs/good.yaml sweep.backbones=[tiny-s,tiny-xl]", 2, "unknown backbone 'tiny-xl'; known:"),
    ("unknown-preset-path", "plan {fx}/configs/good.yaml sweep.backbones=[{fx}/no-model]", 2, "no-model': cannot load its config from this local path (no such folder)"),
    ("budget-too-small", "plan {fx}/configs/good.yaml budget.max_steps=null budget.flops=1", 2, "budget.flops = 1 is too small for cell (tiny-s, sparse, cl)"),
    ("train-config-empty", "train {fx}/configs/empty.yaml", 2, "empty.yaml: the config file is empty"),
    ("sweep-config-is-a-folder", "sweep {fx}/configs", 2, "configs: is a folder, not a config file"),
    ("quickstart-config-missing", "quickstart --config {fx}/configs/absent.yaml", 2, "absent.yaml: config file not found"),
    ("train-on-nonfinite-unknown", "train {fx}/configs/good.yaml train.on_nonfinite=ignore", 2, "train.on_nonfinite: Input should be 'stop' or 'skip'"),
    ("train-unknown-stage", "train {fx}/configs/good.yaml --stage pretrain", 2, "invalid choice: 'pretrain'"),
    # ---------------------------------------------------------------- evaluate: runs, qrels, protocols
    ("evaluate-run-missing", "evaluate --run {fx}/absent.trec --qrels {fx}/qrels.txt --protocol synthetic", 2, "absent.trec: no such file"),
    ("evaluate-run-is-a-folder", "evaluate --run {fx}/bad --qrels {fx}/qrels.txt --protocol synthetic", 2, "bad: is a folder, not a TREC file"),
    ("evaluate-run-columns", "evaluate --run {fx}/bad/run-columns.trec --qrels {fx}/qrels.txt --protocol synthetic", 2, "run-columns.trec:2: expected 6 whitespace-separated fields"),
    ("evaluate-run-score", "evaluate --run {fx}/bad/run-score.trec --qrels {fx}/qrels.txt --protocol synthetic", 2, "run-score.trec:1: score (field 5) must be a number, got 'high'"),
    ("evaluate-run-duplicate", "evaluate --run {fx}/bad/run-duplicate.trec --qrels {fx}/qrels.txt --protocol synthetic", 2, "run-duplicate.trec:2: duplicate document 'd0' for query 'q1' (first at line 1)"),
    ("evaluate-run-not-gzip", "evaluate --run {fx}/bad/run.trec.gz --qrels {fx}/qrels.txt --protocol synthetic", 2, "run.trec.gz: not a gzip file"),
    ("evaluate-run-empty", "evaluate --run {fx}/bad/empty.trec --qrels {fx}/qrels.txt --protocol synthetic", 2, "empty.trec is empty: it has no queries"),
    ("evaluate-run-unjudged", "evaluate --run {fx}/bad/run-unjudged.trec --qrels {fx}/qrels.txt --protocol synthetic", 2, "no query of {fx}/bad/run-unjudged.trec has judgments"),
    ("evaluate-qrels-grade", "evaluate --run {fx}/run.trec --qrels {fx}/bad/qrels-grade.txt --protocol synthetic", 2, "qrels-grade.txt:1: relevance grade (field 4) must be an integer, got 'yes'"),
    ("evaluate-qrels-columns", "evaluate --run {fx}/run.trec --qrels {fx}/bad/qrels-columns.txt --protocol synthetic", 2, "qrels-columns.txt:1: expected 4 whitespace-separated fields"),
    ("evaluate-qrels-empty", "evaluate --run {fx}/run.trec --qrels {fx}/bad/empty.trec --protocol synthetic", 2, "qrels are empty"),
    ("evaluate-qrels-is-a-folder", "evaluate --run {fx}/run.trec --qrels {fx}/bad --protocol synthetic", 2, "bad: is a folder, not a qrels file"),
    ("evaluate-qrels-file-no-protocol", "evaluate --run {fx}/run.trec --qrels {fx}/qrels.txt", 2, "qrels.txt is a qrels file, so the protocol cannot be inferred; pass one of: msmarco-dev"),
    ("evaluate-unknown-protocol", "evaluate --run {fx}/run.trec --qrels {fx}/qrels.txt --protocol trec-covid", 2, "unknown evaluation protocol 'trec-covid'; known: beir, msmarco-dev"),
    ("evaluate-unknown-dataset-id", "evaluate --run {fx}/run.trec --qrels nope/nothing --protocol synthetic", 2, "'nope/nothing' is neither an existing qrels file nor a known dataset id"),
    ("evaluate-dataset-id-typo", "evaluate --run {fx}/run.trec --qrels msmarco-passage/dev/smal", 2, "unknown dataset id 'msmarco-passage/dev/smal' (did you mean 'msmarco-passage/dev/small'?)"),
    ("evaluate-no-default-protocol", "evaluate --run {fx}/run.trec --qrels vaswani", 2, "no default evaluation protocol for dataset 'vaswani'; pass --protocol"),
    ("evaluate-offline-msmarco-dev", "evaluate --run {fx}/run.trec --qrels " + OFFLINE_ID, 2, "msmarco-passage/dev/small: the qrels cannot be read: downloads are disabled (HF_HUB_OFFLINE=1"),
    ("evaluate-offline-trec-dl", "evaluate --run {fx}/run.trec --qrels msmarco-passage/trec-dl-2019/judged", 2, "the qrels cannot be read: downloads are disabled"),
    ("evaluate-offline-beir", "evaluate --run {fx}/run.trec --qrels beir/scifact/test", 2, "beir/scifact/test: the qrels cannot be read: downloads are disabled"),
    ("evaluate-dataset-without-qrels", "evaluate --run {fx}/run.trec --qrels msmarco-passage --protocol msmarco-dev", 2, "msmarco-passage has no qrels (it provides: docs)"),
    # ---------------------------------------------------------------- encode
    ("encode-encoder-missing", "encode {fx}/absent --input {fx}/docs.parquet --out {tmp}/enc", 2, "absent: not an encoder directory (encoder.json missing)"),
    ("encode-encoder-is-a-file", "encode {fx}/docs.parquet --input {fx}/docs.parquet --out {tmp}/enc", 2, "docs.parquet: not an encoder directory"),
    ("encode-encoder-json-corrupt", "encode {fx}/encoders/corrupt-json --input {fx}/docs.parquet --out {tmp}/enc", 2, "corrupt-json/encoder.json:1: not valid JSON"),
    ("encode-encoder-json-version", "encode {fx}/encoders/old-version --input {fx}/docs.parquet --out {tmp}/enc", 2, "old-version/encoder.json: encoder format version 0 is not supported"),
    ("encode-encoder-json-no-paradigm", "encode {fx}/encoders/no-paradigm --input {fx}/docs.parquet --out {tmp}/enc", 2, "no-paradigm/encoder.json: missing 'paradigm'"),
    ("encode-encoder-no-tokenizer", "encode {fx}/encoders/no-tokenizer --input {fx}/docs.parquet --out {tmp}/enc", 2, "no-tokenizer/tokenizer: missing; the encoder directory is incomplete"),
    ("encode-encoder-no-weights", "encode {fx}/encoders/no-backbone --input {fx}/docs.parquet --out {tmp}/enc", 2, "no-backbone/backbone: missing; the encoder directory is incomplete"),
    ("encode-input-missing", "encode {fx}/encoder --input {fx}/absent.parquet --out {tmp}/enc", 2, "absent.parquet: no such parquet file or folder"),
    ("encode-input-not-parquet", "encode {fx}/encoder --input {fx}/bad/not.parquet --out {tmp}/enc", 2, "not.parquet: not a parquet file"),
    ("encode-input-no-text-column", "encode {fx}/encoder --input {fx}/bad/no-text.parquet --out {tmp}/enc", 2, "no-text.parquet: missing column(s) ['text']"),
    ("encode-input-empty-folder", "encode {fx}/encoder --input {fx}/configs/folder.yaml --out {tmp}/enc", 2, "folder.yaml: no *.parquet files"),
    ("encode-unknown-dataset", "encode {fx}/encoder --dataset nope/nothing --out {tmp}/enc", 2, "unknown dataset id 'nope/nothing'"),
    ("encode-offline-dataset", "encode {fx}/encoder --dataset " + OFFLINE_ID + " --kind query --out {tmp}/enc", 2, "msmarco-passage/dev/small: the queries cannot be read: downloads are disabled"),
    ("encode-output-exists", "encode {fx}/encoder --input {fx}/docs.parquet --out {fx}/encodings", 2, "encodings: an encodings folder already exists; pass --overwrite"),
    ("encode-overwrite-empty-corpus", "encode {fx}/encoder --input {fx}/bad/empty.parquet --out {fx}/encodings --overwrite", 2, "encodings: the corpus to encode is empty (0 texts)"),
    ("encode-overwrite-empty-queries", "encode {fx}/encoder --input {fx}/bad/empty.parquet --kind query --out {fx}/queries --overwrite", 2, "queries: the query set to encode is empty (0 texts)"),
    ("encode-overwrite-duplicate-id", "encode {fx}/encoder --input {fx}/bad/duplicate-ids.parquet --out {fx}/encodings --overwrite", 2, "duplicate doc_id 'd0'"),
    ("encode-overwrite-other-files", "encode {fx}/encoder --input {fx}/docs.parquet --out {fx}/bad --overwrite", 2, "bad: holds files that are not an encodings folder; refusing to replace it"),
    ("encode-second-writer", "encode {fx}/encoder --input {fx}/docs.parquet --out {fx}/busy --overwrite", 2, "busy: another process is writing it (pid "),
    ("encode-output-is-a-file", "encode {fx}/encoder --input {fx}/docs.parquet --out {fx}/run.trec", 2, "run.trec"),
    ("encode-output-unwritable", "encode {fx}/encoder --input {fx}/docs.parquet --out {ro}/enc", 2, "{ro}"),
    ("encode-output-under-sys", "encode {fx}/encoder --input {fx}/docs.parquet --out /sys/retriever-test/enc", 2, "/sys/retriever-test"),
    ("encode-prune-top-k-0", "encode {fx}/encoder --input {fx}/docs.parquet --out {tmp}/enc --prune-top-k 0", 2, "argument --prune-top-k: must be an integer >= 1, got '0'"),
    ("encode-batch-size-0", "encode {fx}/encoder --input {fx}/docs.parquet --out {tmp}/enc --batch-size 0", 2, "argument --batch-size: must be an integer >= 1, got '0'"),
    ("encode-prune-dense", "encode {fx}/encoder-dense --input {fx}/docs.parquet --out {tmp}/enc --prune-top-k 5", 2, "prune_top_k applies to sparse encoders"),
    ("encode-max-length-1", "encode {fx}/encoder --input {fx}/docs.parquet --out {tmp}/enc --max-length 1", 2, "max_length 1 leaves no room for text"),
    ("encode-actors-negative", "encode {fx}/encoder --input {fx}/docs.parquet --out {tmp}/enc --actors -1", 2, "argument --actors: must be an integer >= 0, got '-1'"),
    # ---------------------------------------------------------------- index
    ("index-encodings-missing", "index {fx}/absent --out {tmp}/index", 2, "absent"),
    ("index-not-encodings", "index {fx}/configs --out {tmp}/index", 2, "configs/encoding.json"),
    ("index-encodings-edited", "index {fx}/encodings-edited --out {tmp}/index", 2, "encodings-edited/encoding.json"),
    ("index-output-exists", "index {fx}/encodings --out {fx}/index", 2, "index: an index folder already exists; pass --overwrite"),
    ("index-encodings-changed-byte", "index {fx}/encodings-flipped-byte --out {tmp}/index", 2, "part-00000.parquet: sha256 "),
    ("index-overwrite-changed-byte", "index {fx}/encodings-flipped-byte --out {fx}/index --overwrite", 2, "does not match encoding.json's"),
    ("index-overwrite-cut-part", "index {fx}/encodings-corrupt-part --out {fx}/index --overwrite", 2, "encodings-corrupt-part/part-00000.parquet"),
    ("index-overwrite-other-files", "index {fx}/encodings --out {fx}/bad --overwrite", 2, "bad: holds files that are not an index folder; refusing to replace it"),
    ("index-second-writer", "index {fx}/encodings --out {fx}/busy --overwrite", 2, "busy: another process is writing it (pid "),
    ("index-output-unwritable", "index {fx}/encodings --out {ro}/index", 2, "{ro}"),
    ("index-unknown-kind", "index {fx}/encodings --out {tmp}/index --kind faiss", 2, "unknown index kind 'faiss'; known: exact, flat, hnsw, seismic"),
    ("index-kind-for-dense", "index {fx}/encodings --out {tmp}/index --kind flat", 2, "index kind 'flat' indexes dense vectors, but these are sparse; use exact, seismic"),
    ("index-shards-0", "index {fx}/encodings --out {tmp}/index --shards 0", 2, "argument --shards: must be an integer >= 1, got '0'"),
    ("index-more-shards-than-docs", "index {fx}/encodings --out {tmp}/index --shards 99", 2, "holds 10 documents, fewer than num_shards=99"),
    ("index-prune-0", "index {fx}/encodings --out {tmp}/index --prune-doc-top-k 0", 2, "argument --prune-doc-top-k: must be an integer >= 1, got '0'"),
    # ---------------------------------------------------------------- search
    ("search-index-missing", "search {fx}/absent --queries {fx}/queries --out {tmp}/run.trec", 2, "absent/shards.json: missing"),
    ("search-no-shards-json", "search {fx}/index-no-set --queries {fx}/queries --out {tmp}/run.trec", 2, "index-no-set/shards.json: missing"),
    ("search-shards-json-edited", "search {fx}/index-edited-set --queries {fx}/queries --out {tmp}/run.trec", 2, "index-edited-set/shards.json: checksum does not match the content"),
    ("search-shards-json-corrupt", "search {fx}/index-corrupt-set --queries {fx}/queries --out {tmp}/run.trec", 2, "index-corrupt-set/shards.json: not valid JSON"),
    ("search-manifest-edited", "search {fx}/index-edited-manifest --queries {fx}/queries --out {tmp}/run.trec", 2, "manifest.json: the manifest's checksum does not match its content"),
    ("search-manifest-missing", "search {fx}/index-no-manifest --queries {fx}/queries --out {tmp}/run.trec", 2, "shard-00000/manifest.json: missing"),
    ("search-shard-file-extra", "search {fx}/index-extra-file --queries {fx}/queries --out {tmp}/run.trec", 2, "unexpected file(s) notes.txt not listed in manifest.json"),
    ("search-shard-missing", "search {fx}/index-missing-shard --queries {fx}/queries --out {tmp}/run.trec", 2, "shard-00000: shard listed in shards.json is missing"),
    ("search-k-0", "search {fx}/index --queries {fx}/queries --out {tmp}/run.trec -k 0", 2, "argument -k: must be an integer >= 1, got '0'"),
    ("search-k-not-a-number", "search {fx}/index --queries {fx}/queries --out {tmp}/run.trec -k ten", 2, "argument -k: must be an integer >= 1, got 'ten'"),
    ("search-wrong-encoder", "search {fx}/index --queries {fx}/queries-b --out {tmp}/run.trec", 2, "search with the encoder the index was built from"),
    ("search-queries-missing", "search {fx}/index --queries {fx}/absent --out {tmp}/run.trec", 2, "absent"),
    ("search-passages-as-queries", "search {fx}/index --queries {fx}/encodings --out {tmp}/run.trec", 2, "encodings: holds passage encodings, not queries; encode the queries with `--kind query`"),
    ("search-out-exists", "search {fx}/index --queries {fx}/queries --out {fx}/run.trec", 2, "run.trec: the run file already exists; pass --overwrite"),
    ("search-overwrite-wrong-encoder", "search {fx}/index --queries {fx}/queries-b --out {fx}/run.trec --overwrite", 2, "search with the encoder the index was built from"),
    ("search-queries-changed-byte", "search {fx}/index --queries {fx}/queries-flipped-byte --out {tmp}/run.trec", 2, "does not match encoding.json's"),
    ("search-second-writer", "search {fx}/index --queries {fx}/queries --out {fx}/busy --overwrite", 2, "busy: another process is writing it (pid "),
    ("search-out-is-a-folder", "search {fx}/index --queries {fx}/queries --out {fx}/bad", 2, "{fx}/bad: is a"),
    ("search-out-unwritable", "search {fx}/index --queries {fx}/queries --out {ro}/run.trec", 2, "run.trec"),
    ("search-out-under-sys", "search {fx}/index --queries {fx}/queries --out /sys/retriever-test/run.trec", 2, "/sys/retriever-test"),
    # ---------------------------------------------------------------- eval-checkpoint
    ("eval-checkpoint-not-an-encoder", "eval-checkpoint {fx}/configs --dataset synthetic/test --out {tmp}/eval", 2, "configs: not an encoder directory"),
    ("eval-checkpoint-unknown-dataset", "eval-checkpoint {fx}/encoder --dataset nope/nothing --protocol synthetic --out {tmp}/eval", 2, "unknown dataset id 'nope/nothing'"),
    ("eval-checkpoint-unknown-dataset-no-protocol", "eval-checkpoint {fx}/encoder --dataset nope/nothing --out {tmp}/eval", 2, "unknown dataset id 'nope/nothing'"),
    ("eval-checkpoint-no-default-protocol", "eval-checkpoint {fx}/encoder --dataset vaswani --out {tmp}/eval", 2, "no default evaluation protocol for dataset 'vaswani'; pass --protocol"),
    ("eval-checkpoint-unknown-protocol", "eval-checkpoint {fx}/encoder --dataset synthetic/test --protocol ndcg --out {tmp}/eval", 2, "unknown evaluation protocol 'ndcg'"),
    ("eval-checkpoint-offline", "eval-checkpoint {fx}/encoder --dataset " + OFFLINE_ID + " --out {tmp}/eval", 2, "msmarco-passage/dev/small: the qrels cannot be read: downloads are disabled"),
    ("eval-checkpoint-top-k-too-shallow", "eval-checkpoint {fx}/encoder --dataset " + OFFLINE_ID + " --set eval.top_k=10 --out {tmp}/eval", 2, "eval.top_k=10 is too shallow for msmarco-passage/dev/small"),
    ("eval-checkpoint-bad-set", "eval-checkpoint {fx}/encoder --dataset synthetic/test --set eval.top_k=many --out {tmp}/eval", 2, "eval.top_k: Input should be a valid integer"),
    ("eval-checkpoint-config-empty", "eval-checkpoint {fx}/encoder --dataset synthetic/test --config {fx}/configs/empty.yaml --out {tmp}/eval", 2, "empty.yaml: the config file is empty"),
    ("eval-checkpoint-synthetic-split", "eval-checkpoint {fx}/encoder --dataset synthetic/dev --out {tmp}/eval", 2, "unknown dataset id 'synthetic/dev': the synthetic benchmark has the splits synthetic/train and synthetic/test"),
    # ---------------------------------------------------------------- data register-*, import-classic
    ("register-trec-nothing", "data register-trec nothing", 2, "register_trec needs at least one of docs, topics, qrels (`retriever data register-trec NAME --docs FILE"),
    ("register-trec-bad-name", "data register-trec bad/name --docs {fx}/docs.tsv", 2, "invalid dataset name 'bad/name'"),
    ("register-trec-docs-missing", "data register-trec x --docs {fx}/absent.tsv", 2, "absent.tsv: docs not found"),
    ("register-trec-docs-malformed", "data register-trec x --docs {fx}/bad/docs-one-column.tsv", 2, "docs-one-column.tsv:2: expected doc_id<TAB>text (2 tab-separated columns)"),
    ("register-trec-qrels-malformed", "data register-trec x --qrels {fx}/bad/qrels-grade.txt", 2, "qrels-grade.txt:1: relevance must be an integer, got 'yes'"),
    ("register-beir-missing", "data register-beir x {fx}/absent", 2, "absent: BEIR folder not found"),
    ("register-pool-folder-missing", "data register-pool x {fx}/absent --topics {fx}/topics.tsv --qrels {fx}/qrels.txt", 2, "absent: folder of rank_llm retrieve results not found"),
    ("register-pool-no-match", "data register-pool x {fx}/pool --pattern '*/retrieve_results_dl21.json.gz' --topics {fx}/topics.tsv --qrels {fx}/qrels.txt", 2, "no file matches '*/retrieve_results_dl21.json.gz'"),
    ("register-pool-not-gzip", "data register-pool x {fx}/pool-bad --pattern 'NOTGZ/*' --topics {fx}/topics.tsv --qrels {fx}/qrels.txt", 2, "retrieve_results_dl20.json.gz: not a gzip file"),
    ("register-pool-bad-json", "data register-pool x {fx}/pool-bad --pattern 'JSON/*' --topics {fx}/topics.tsv --qrels {fx}/qrels.txt", 2, "retrieve_results_dl20.json.gz:1: invalid JSON"),
    ("register-pool-no-hits", "data register-pool x {fx}/pool-bad --pattern 'NOHITS/*' --topics {fx}/topics.tsv --qrels {fx}/qrels.txt", 2, "entry 0: expected an object with a 'hits' list"),
    ("register-pool-topics-missing", "data register-pool x {fx}/pool --topics {fx}/absent.tsv --qrels {fx}/qrels.txt", 2, "absent.tsv: topics not found"),
    ("register-pool-bad-name", "data register-pool 'a b' {fx}/pool --topics {fx}/topics.tsv --qrels {fx}/qrels.txt", 2, "invalid dataset name 'a b'"),
    ("import-classic-missing", "data import-classic {fx}/absent", 2, "absent"),
    # ---------------------------------------------------------------- data examples
    ("examples-qrels-missing", "data examples --qrels {fx}/absent.txt --candidates {fx}/run.trec --queries {fx}/topics.tsv --docs {docs} --out {tmp}/ex.parquet", 2, "absent.txt: no such file"),
    ("examples-qrels-malformed", "data examples --qrels {fx}/bad/qrels-columns.txt --candidates {fx}/run.trec --queries {fx}/topics.tsv --docs {docs} --out {tmp}/ex.parquet", 2, "qrels-columns.txt:1: expected 3 columns"),
    ("examples-candidates-malformed", "data examples --qrels {fx}/qrels.txt --candidates {fx}/bad/run-columns.trec --queries {fx}/topics.tsv --docs {docs} --out {tmp}/ex.parquet", 2, "run-columns.trec:2: expected a TREC run line"),
    ("examples-unknown-docs-dataset", "data examples --qrels {fx}/qrels.txt --candidates {fx}/run.trec --queries {fx}/topics.tsv --docs nope/nothing --out {tmp}/ex.parquet", 2, "unknown dataset id 'nope/nothing'"),
    ("examples-unknown-doc-id", "data examples --qrels {fx}/bad/qrels-unknown-doc.txt --candidates {fx}/run.trec --queries {fx}/topics.tsv --docs {docs} --out {tmp}/ex.parquet", 2, "qrels-unknown-doc.txt:1: unknown document id 'd99'"),
    ("examples-query-without-text", "data examples --qrels {fx}/bad/qrels-unknown-query.txt --candidates {fx}/run.trec --queries {fx}/topics.tsv --docs {docs} --out {tmp}/ex.parquet", 2, "query id 'q9' has no text in"),
    ("examples-num-negatives-0", "data examples --qrels {fx}/qrels.txt --candidates {fx}/run.trec --queries {fx}/topics.tsv --docs {docs} --out {tmp}/ex.parquet --num-negatives 0", 2, "argument --num-negatives: must be an integer >= 1, got '0'"),
    ("examples-teacher-malformed", "data examples --qrels {fx}/qrels.txt --candidates {fx}/run.trec --queries {fx}/topics.tsv --docs {docs} --teacher {fx}/bad/teacher.tsv --out {tmp}/ex.parquet", 2, "teacher.tsv:1: expected a number as teacher score (column 3), got 'high'"),
    ("examples-output-exists", "data examples --qrels {fx}/qrels.txt --candidates {fx}/run.trec --queries {fx}/topics.tsv --docs {docs} --out {fx}/run.trec", 2, "run.trec: the training-examples file already exists; pass --overwrite"),
    ("examples-overwrite-bad-qrels", "data examples --qrels {fx}/bad/qrels-columns.txt --candidates {fx}/run.trec --queries {fx}/topics.tsv --docs {docs} --out {fx}/run.trec --overwrite", 2, "qrels-columns.txt:1: expected 3 columns"),
    # ---------------------------------------------------------------- report, convert
    ("report-not-a-sweep", "report {fx}", 2, "not a sweep directory (sweep.json missing)"),
    ("report-sweep-json-corrupt", "report {fx}/sweep-corrupt", 2, "sweep-corrupt/sweep.json:1: not valid JSON"),
    ("report-sweep-json-no-config", "report {fx}/sweep-no-config", 2, "sweep-no-config/sweep.json: no 'config'"),
    # ---------------------------------------------------------------- serve, query
    ("serve-nothing-to-serve", "serve", 2, "serve: give either a serve config YAML or --sweep DIR"),
    ("serve-config-and-sweep", "serve {fx}/configs/good.yaml --sweep {fx}", 2, "serve: give either a serve config YAML or --sweep DIR"),
    ("serve-corpus-without-sweep", "serve {fx}/configs/good.yaml --corpus local/x", 2, "--corpus goes with --sweep"),
    ("serve-not-a-sweep", "serve --sweep {fx}", 2, "not a sweep directory (sweep.json missing)"),
    ("serve-sweep-json-corrupt", "serve --sweep {fx}/sweep-corrupt", 2, "sweep-corrupt/sweep.json:1: not valid JSON"),
    ("serve-config-missing", "serve {fx}/configs/absent.yaml", 2, "absent.yaml: config file not found"),
    ("serve-experiment-config", "serve {fx}/configs/good.yaml", 2, "models: Field required"),
    ("serve-bad-override", "serve {fx}/configs/good.yaml --set port=http", 2, "port: Input should be a valid integer"),
    ("query-unreachable", "query hello --url http://127.0.0.1:9", 2, "http://127.0.0.1:9: cannot reach the service"),
    ("query-token-env-unset", "query hello --token-env RETRIEVER_TEST_NO_SUCH_VARIABLE", 2, "--token-env RETRIEVER_TEST_NO_SUCH_VARIABLE: that environment variable is not set"),
    ("convert-checkpoint-missing", "convert llama2c {fx}/absent.bin {fx}/absent-tok.bin {tmp}/hf", 2, "absent.bin"),
    ("convert-checkpoint-too-short", "convert llama2c {fx}/bad/short.bin {fx}/bad/short.bin {tmp}/hf", 2, "short.bin: 8 bytes is too short for a llama2.c checkpoint"),
]
# fmt: on


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _yaml(data: object) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def _pool_json(queries: list[tuple[str, str]]) -> bytes:
    entries = [
        {
            "query": {"text": text, "qid": qid},
            "hits": [
                {"qid": qid, "docid": f"d{i}", "rank": i + 1, "score": 1.0 / (i + 1), "content": TINY_CORPUS[i]}
                for i in range(3)
            ],
        }
        for qid, text in queries
    ]
    return gzip.compress(json.dumps(entries).encode())


def _configs(fx: Path, tokenizer: Path) -> None:
    from conftest import TINY_EXPERIMENT, merged

    good = merged(
        TINY_EXPERIMENT,
        {
            "backbone": {"name": "tiny-s", "tokenizer": str(tokenizer)},
            "train": {"output_dir": str(fx / "runs-never-written")},
            "sweep": {"backbones": ["tiny-s"], "paradigms": ["sparse"], "losses": ["cl"], "baselines": False},
        },
    )
    c = fx / "configs"
    _write(c / "good.yaml", _yaml(good))
    _write(c / "empty.yaml", "")
    _write(c / "comments.yaml", "# nothing configured yet\n\n")
    _write(c / "malformed.yaml", "train:\n  lr: [1e-4\n")
    _write(c / "latin1.yaml", "name: caf\xe9\n".encode("latin-1"))
    _write(c / "list.yaml", "- train\n- eval\n")
    _write(c / "unknown-key.yaml", _yaml({"train": {"learning_rate": 1e-4}}))
    _write(c / "unknown-section.yaml", _yaml({"trainer": {"lr": 1e-4}}))
    _write(c / "nested-unknown.yaml", _yaml({"backbone": {"lora": {"rank": 8}}}))
    _write(c / "negative-lr.yaml", _yaml({"train": {"lr": -0.1}}))
    _write(c / "wrong-type.yaml", _yaml({"train": {"batch_size": "many"}}))
    _write(c / "both-budgets.yaml", _yaml({"budget": {"flops": 1e15, "max_steps": 10}}))
    _write(c / "fixed-override.yaml", _yaml({"sweep": {"overrides": [{"set": {"budget.flops": 1e15}}]}}))
    (c / "folder.yaml").mkdir()


def _bad_files(fx: Path) -> None:
    b = fx / "bad"
    _write(b / "run-columns.trec", "q1 Q0 d0 1 1.0 t\nq1 Q0 d1 2 0.5\n")
    _write(b / "run-score.trec", "q1 Q0 d0 1 high t\n")
    _write(b / "run-duplicate.trec", "q1 Q0 d0 1 1.0 t\nq1 Q0 d0 2 0.5 t\n")
    _write(b / "run.trec.gz", "q1 Q0 d0 1 1.0 t\n")
    _write(b / "empty.trec", "")
    _write(b / "run-unjudged.trec", "q7 Q0 d0 1 1.0 t\n")
    _write(b / "qrels-grade.txt", "q1 0 d0 yes\n")
    _write(b / "qrels-columns.txt", "q1 d0\n")
    _write(b / "qrels-unknown-doc.txt", "q1 0 d99 1\n")
    _write(b / "qrels-unknown-query.txt", "q9 0 d1 1\n")
    _write(b / "teacher.tsv", "q1\td0\thigh\n")
    _write(b / "docs-one-column.tsv", "d0\tsome text\nd1 no tab here\n")
    _write(b / "not.parquet", "doc_id,text\nd0,hello\n")
    _write(b / "short.bin", b"\x00" * 8)
    pq.write_table(pa.table({"doc_id": ["d0", "d1"]}), b / "no-text.parquet")
    pq.write_table(pa.table({"doc_id": ["d0", "d1", "d0"], "text": ["a", "b", "c"]}), b / "duplicate-ids.parquet")
    pq.write_table(
        pa.table({"doc_id": pa.array([], pa.string()), "text": pa.array([], pa.string())}), b / "empty.parquet"
    )


def _encoder_variants(fx: Path) -> None:
    """Copies of the encoder with one part broken (what a half-copied or hand-edited checkpoint looks like)."""
    source = fx / "encoder"
    variants = fx / "encoders"
    for name in ("corrupt-json", "old-version", "no-paradigm", "no-tokenizer", "no-backbone"):
        shutil.copytree(source, variants / name)
    meta = json.loads((source / "encoder.json").read_text())
    (variants / "corrupt-json" / "encoder.json").write_text('{"format_version": 1,,}')
    (variants / "old-version" / "encoder.json").write_text(json.dumps({**meta, "format_version": 0}))
    (variants / "no-paradigm" / "encoder.json").write_text(
        json.dumps({k: v for k, v in meta.items() if k != "paradigm"})
    )
    shutil.rmtree(variants / "no-tokenizer" / "tokenizer")
    shutil.rmtree(variants / "no-backbone" / "backbone")


def _index_variants(fx: Path) -> None:
    """Copies of the index with one file missing or edited by hand."""
    index = fx / "index"
    names = ("no-set", "edited-set", "corrupt-set", "edited-manifest", "no-manifest", "extra-file", "missing-shard")
    for name in names:
        shutil.copytree(index, fx / f"index-{name}")
    (fx / "index-no-set" / "shards.json").unlink()
    shards = json.loads((index / "shards.json").read_text())
    (fx / "index-edited-set" / "shards.json").write_text(json.dumps({**shards, "num_docs": 11}))
    (fx / "index-corrupt-set" / "shards.json").write_text("{")
    manifest = json.loads((index / "shard-00000" / "manifest.json").read_text())
    (fx / "index-edited-manifest" / "shard-00000" / "manifest.json").write_text(
        json.dumps({**manifest, "doc_count": 9})
    )
    (fx / "index-no-manifest" / "shard-00000" / "manifest.json").unlink()
    _write(fx / "index-extra-file" / "shard-00000" / "notes.txt", "mine\n")
    shutil.rmtree(fx / "index-missing-shard" / "shard-00000")
    shutil.copytree(fx / "encodings", fx / "encodings-edited")
    info = json.loads((fx / "encodings" / "encoding.json").read_text())
    (fx / "encodings-edited" / "encoding.json").write_text(json.dumps({**info, "paradigm": "hybrid"}))
    shutil.copytree(fx / "encodings", fx / "encodings-corrupt-part")
    part = fx / "encodings-corrupt-part" / sorted(info["files"])[0]
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory, tiny_tokenizer_dir):
    """The module's inputs, built once (about 10 s), under `{fx}`:

    - encoder/ (sparse), encoder-b/ (sparse, other weights), encoder-dense/; encoders/<broken copies>
    - docs.parquet (10 docs), queries.parquet (q1, q2); docs.tsv, topics.tsv, qrels.txt; run.trec (searched)
    - encodings/ (docs, encoder), queries/ (encoder), queries-b/ (encoder-b), queries-dense/ (encoder-dense);
      encodings-edited/ (encoding.json edited), encodings-corrupt-part/ (a parquet part cut in half),
      encodings-flipped-byte/ and queries-flipped-byte/ (one bit of a parquet part changed)
    - index/ (one shard of encodings/) and index-<no-set|edited-set|corrupt-set|edited-manifest|no-manifest|
      extra-file|missing-shard>/
    - configs/ (good.yaml and one broken file per problem), bad/ (malformed TREC, TSV, parquet (incl.
      empty.parquet: no rows) and llama2.c files), pool/ and pool-bad/<NOTGZ|JSON|NOHITS>/ (retrieve results),
      sweep-corrupt/, sweep-no-config/

    `{docs}` is a local dataset registered over docs.tsv and topics.tsv. A new row that needs another input adds
    it here."""
    from retriever.config import BackboneConfig, EncoderConfig
    from retriever.data.local import register_trec
    from retriever.models.encoders import build_encoder

    fx = tmp_path_factory.mktemp("cli-errors")
    tokenizer = shutil.copytree(tiny_tokenizer_dir, fx / "tokenizer")
    for name, seed, paradigm in (("encoder", 3, "sparse"), ("encoder-b", 4, "sparse"), ("encoder-dense", 3, "dense")):
        backbone = BackboneConfig(name="tiny-s", tokenizer=str(tokenizer), seed=seed, lora={"enabled": False})
        build_encoder(backbone, EncoderConfig(paradigm=paradigm, passage_max_length=32)).save(fx / name)
    docs = [(f"d{i}", text) for i, text in enumerate(TINY_CORPUS[:10])]
    queries = [("q1", "quick brown fox"), ("q2", "sparse vectors")]
    pq.write_table(pa.table({"doc_id": [d for d, _ in docs], "text": [t for _, t in docs]}), fx / "docs.parquet")
    pq.write_table(
        pa.table({"doc_id": [q for q, _ in queries], "text": [t for _, t in queries]}), fx / "queries.parquet"
    )
    _write(fx / "docs.tsv", "".join(f"{d}\t{t}\n" for d, t in docs))
    _write(fx / "topics.tsv", "".join(f"{q}\t{t}\n" for q, t in queries))
    _write(fx / "qrels.txt", "q1 0 d0 1\nq2 0 d2 1\n")
    _write(fx / "pool" / "BM25" / "retrieve_results_dl20.json.gz", _pool_json(queries))
    _write(fx / "pool-bad" / "NOTGZ" / "retrieve_results_dl20.json.gz", "[]")
    _write(fx / "pool-bad" / "JSON" / "retrieve_results_dl20.json.gz", gzip.compress(b"[{"))
    _write(fx / "pool-bad" / "NOHITS" / "retrieve_results_dl20.json.gz", gzip.compress(b'[{"query": "q"}]'))
    _write(fx / "sweep-corrupt" / "sweep.json", "{")
    _write(fx / "sweep-no-config" / "sweep.json", "{}")
    _configs(fx, tokenizer)
    _bad_files(fx)
    _encoder_variants(fx)

    steps = [
        f"encode {fx}/encoder --input {fx}/docs.parquet --out {fx}/encodings",
        f"encode {fx}/encoder --input {fx}/queries.parquet --kind query --out {fx}/queries",
        f"encode {fx}/encoder-b --input {fx}/queries.parquet --kind query --out {fx}/queries-b",
        f"encode {fx}/encoder-dense --input {fx}/queries.parquet --kind query --out {fx}/queries-dense",
        f"index {fx}/encodings --out {fx}/index",
        f"search {fx}/index --queries {fx}/queries --out {fx}/run.trec -k 5",
    ]
    for step in steps:
        assert cli.main(shlex.split(step)) == 0, step
    for name in ("encodings", "queries"):
        flipped = shutil.copytree(fx / name, fx / f"{name}-flipped-byte")
        part = flipped / "part-00000.parquet"
        data = bytearray(part.read_bytes())
        data[len(data) // 2] ^= 0x01  # one bit of the data pages: a valid parquet file with another value
        part.write_bytes(bytes(data))
    _index_variants(fx)
    dataset = register_trec(f"cli-errors-{fx.name}", docs=fx / "docs.tsv", topics=fx / "topics.tsv")
    return {"fx": fx, "docs": dataset}


@pytest.fixture(scope="module")
def busy(fixtures):
    """`{fx}/busy` is being written by another writer (its lock is held for the whole module)."""
    from retriever.outputs import output_lock

    with output_lock(fixtures["fx"] / "busy"):
        yield


@pytest.fixture(scope="module")
def read_only(tmp_path_factory):
    """A folder nothing can be written to, also by root (immutable attribute); None where chattr fails."""
    folder = tmp_path_factory.mktemp("cli-errors-read-only")
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False)
    if done.returncode != 0:
        yield None
        return
    yield folder
    subprocess.run(["chattr", "-i", str(folder)], check=True)


def _tree(*roots: Path) -> dict[str, str]:
    """sha256 of every file under `roots` (symlinks not followed), by path."""
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("argv, status, message", [pytest.param(a, s, m, id=i) for i, a, s, m in CASES])
def test_bad_input_is_one_error_line_and_changes_nothing(
    argv, status, message, fixtures, read_only, busy, tmp_path, capsys
):
    if "{ro}" in argv and read_only is None:
        pytest.skip("needs `chattr +i` (a folder that root cannot write to)")
    places = {"fx": fixtures["fx"], "docs": fixtures["docs"], "tmp": tmp_path / "out", "ro": read_only}
    args = [part.format(**places) for part in shlex.split(argv)]
    roots = [fixtures["fx"]] + ([read_only] if read_only else [])
    before = _tree(*roots)
    capsys.readouterr()
    try:
        code = cli.main(args)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == status, err
    assert "Traceback" not in err
    expected = message.format(**places)
    assert expected in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ") or ": error: " in line]
    assert lines, err
    assert _tree(*roots) == before


def test_a_bug_keeps_its_traceback(monkeypatch, capsys):
    """Only bad input is shortened to one line: any other exception from a command (RuntimeError, ValueError and
    KeyError included) propagates out of `main` with its traceback."""
    import retriever.models.backbone as backbone

    for bug in (RuntimeError("bug"), ValueError("bug"), KeyError("bug"), TypeError("bug")):

        def broken(*args, bug=bug, **kwargs):
            raise bug

        monkeypatch.setattr(backbone, "count_parameters", broken)  # what `retriever backbones` calls
        with pytest.raises(type(bug), match="bug"):
            cli.main(["backbones"])
    assert "error:" not in capsys.readouterr().err


def test_retriever_debug_re_raises_user_errors(fixtures, monkeypatch, capsys):
    argv = ["plan", str(fixtures["fx"] / "configs" / "empty.yaml")]
    monkeypatch.setenv("RETRIEVER_DEBUG", "1")
    with pytest.raises(UserError, match="the config file is empty"):
        cli.main(argv)
    monkeypatch.setenv("RETRIEVER_DEBUG", "0")
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.startswith("error: ")
