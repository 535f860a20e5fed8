"""Dataset ids as configs name them, resolved to loadable sources.

`synthetic/<split>` names the offline benchmark described by the config's `data` section: it is generated once
(deterministically) under `<train.output_dir>/data/` and registered as a local BEIR folder; every other id is an
ir_datasets id (hub or local) used as is.
"""

from __future__ import annotations

from pathlib import Path

from retriever.config import ExperimentConfig
from retriever.data.synthetic import SyntheticBenchmark, ensure_synthetic

SYNTHETIC_PREFIX = "synthetic/"


def synthetic_benchmark(cfg: ExperimentConfig) -> SyntheticBenchmark:
    data = cfg.data
    root = (
        Path(cfg.train.output_dir).resolve()
        / "data"
        / (
            f"synthetic-s{data.synthetic_seed}-d{data.synthetic_docs}"
            f"-q{data.synthetic_train_queries}-{data.synthetic_test_queries}"
        )
    )
    return ensure_synthetic(
        root,
        seed=data.synthetic_seed,
        num_docs=data.synthetic_docs,
        num_train_queries=data.synthetic_train_queries,
        num_test_queries=data.synthetic_test_queries,
    )


SYNTHETIC_TOKENIZER = "synthetic"
SYNTHETIC_VOCAB = 4096


def synthetic_tokenizer(cfg: ExperimentConfig, vocab_size: int = SYNTHETIC_VOCAB) -> Path:
    """A byte-level BPE tokenizer trained on the synthetic corpus (deterministic, cached next to it)."""
    from retriever.models.tokenizers import train_bpe_tokenizer

    bench = synthetic_benchmark(cfg)
    out = bench.root / f"tokenizer-bpe{vocab_size}"
    if not (out / "tokenizer.json").is_file():
        train_bpe_tokenizer(list(bench.docs().values()), vocab_size=vocab_size, out_dir=out)
    return out


def resolve_references(cfg: ExperimentConfig) -> ExperimentConfig:
    """A copy of `cfg` whose symbolic references (`backbone.tokenizer: synthetic`) are concrete paths."""
    if cfg.backbone.tokenizer != SYNTHETIC_TOKENIZER:
        return cfg
    resolved = cfg.model_copy(deep=True)
    resolved.backbone.tokenizer = str(synthetic_tokenizer(cfg))
    return resolved


def resolve_dataset(dataset_id: str, cfg: ExperimentConfig) -> str:
    """The id `retriever.data.sources.load_source` can open for a configured dataset id."""
    if not dataset_id.startswith(SYNTHETIC_PREFIX):
        return dataset_id
    from retriever.data.local import register_beir_folder

    split = dataset_id[len(SYNTHETIC_PREFIX) :]
    if split not in ("train", "test"):
        raise ValueError(f"dataset {dataset_id!r}: the synthetic benchmark has splits train and test")
    bench = synthetic_benchmark(cfg)
    return register_beir_folder(f"{bench.root.name}-{split}", bench.root, split=split)
