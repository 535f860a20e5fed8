"""What a config names, made concrete: its relative paths, the `synthetic` tokenizer, dataset ids and corpora.

`synthetic` names the offline benchmark described by the config's `data` section (its tokenizer, training data and
corpus); `synthetic/<split>` its test or train split. It is generated once (deterministically) under
`<train.output_dir>/data/` and registered as a local BEIR folder; every other dataset id is an ir_datasets id
(hub or local) used as is.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from retriever.config import ExperimentConfig
from retriever.data.synthetic import SyntheticBenchmark, ensure_synthetic
from retriever.errors import UnknownNameError

SYNTHETIC_PREFIX = "synthetic/"


def synthetic_benchmark(cfg: ExperimentConfig) -> SyntheticBenchmark:
    data = cfg.data
    root = (
        Path(cfg.train.output_dir).resolve()
        / "data"
        / (
            f"synthetic-s{data.synthetic_seed}-d{data.synthetic_docs}"
            f"-q{data.synthetic_train_queries}-{data.synthetic_test_queries}-c{data.synthetic_candidates}"
        )
    )
    return ensure_synthetic(
        root,
        seed=data.synthetic_seed,
        num_docs=data.synthetic_docs,
        num_train_queries=data.synthetic_train_queries,
        num_test_queries=data.synthetic_test_queries,
        num_candidates=data.synthetic_candidates,
    )


SYNTHETIC = "synthetic"  # the symbolic name of the offline benchmark's tokenizer, training data and corpus


def synthetic_tokenizer(cfg: ExperimentConfig) -> Path:
    """The synthetic corpus's word-level tokenizer (its made-up words stay whole; deterministic, cached next to
    the benchmark)."""
    from retriever.models.tokenizers import train_word_tokenizer

    bench = synthetic_benchmark(cfg)
    out = bench.root / "tokenizer-words"
    if not (out / "tokenizer.json").is_file():
        train_word_tokenizer(bench.docs().values(), out_dir=out)
    return out


def absolute_paths(cfg: ExperimentConfig, base: str | Path | None = None) -> ExperimentConfig:
    """A copy whose relative paths are absolute against ``base`` (default: the current directory).

    Ray Tune trials and Train workers run in other working directories, so a config is made absolute where the
    user started the job before it travels to them. ``train.output_dir`` and the artifact and SQLite locations
    always become absolute; fields that hold a name or id *or* a path (backbone, tokenizer, adapter, data files,
    pre-training corpora) only when they are not a preset or ``synthetic`` and the relative path exists, so ids
    stay ids.
    """
    from retriever.models.backbone import find_preset

    base = Path(base or Path.cwd()).resolve()
    resolved = cfg.model_copy(deep=True)

    def local(value: str | None) -> str | None:
        if value is None or value == SYNTHETIC or Path(value).is_absolute() or not (base / value).exists():
            return value
        return str(base / value)

    resolved.train.output_dir = str(base / cfg.train.output_dir)
    if find_preset(cfg.backbone.name) is None:
        resolved.backbone.name = local(cfg.backbone.name) or cfg.backbone.name
    resolved.backbone.tokenizer = local(cfg.backbone.tokenizer)
    resolved.backbone.init_adapter = local(cfg.backbone.init_adapter)
    resolved.backbone.init_weights = local(cfg.backbone.init_weights)
    resolved.data.train = local(cfg.data.train) or cfg.data.train
    resolved.data.docs = local(cfg.data.docs)
    resolved.mntp.corpus = local(cfg.mntp.corpus) or cfg.mntp.corpus
    resolved.bow.corpus = local(cfg.bow.corpus) or cfg.bow.corpus
    location = cfg.tracking.artifact_location
    if location is not None and "://" not in location and not location.startswith("file:"):
        resolved.tracking.artifact_location = str(base / location)
    uri = cfg.tracking.tracking_uri
    if uri is not None and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        resolved.tracking.tracking_uri = f"sqlite:///{base / uri.removeprefix('sqlite:///')}"
    return resolved


def resolve_references(cfg: ExperimentConfig) -> ExperimentConfig:
    """A copy of `cfg` whose relative paths are absolute (`absolute_paths`) and whose symbolic references
    (`backbone.tokenizer: synthetic`) are concrete paths."""
    resolved = absolute_paths(cfg)
    if resolved.backbone.tokenizer == SYNTHETIC:
        resolved.backbone.tokenizer = str(synthetic_tokenizer(resolved))
    return resolved


def resolve_dataset(dataset_id: str, cfg: ExperimentConfig) -> str:
    """The id `retriever.data.sources.load_source` can open for a configured dataset id."""
    if not dataset_id.startswith(SYNTHETIC_PREFIX):
        return dataset_id
    from retriever.data.local import register_beir_folder

    split = dataset_id[len(SYNTHETIC_PREFIX) :]
    if split not in ("train", "test"):
        raise UnknownNameError(
            f"unknown dataset id {dataset_id!r}: the synthetic benchmark has the splits {SYNTHETIC_PREFIX}train and "
            f"{SYNTHETIC_PREFIX}test"
        )
    bench = synthetic_benchmark(cfg)
    return register_beir_folder(f"{bench.root.name}-{split}", bench.root, split=split)


def corpus_texts(corpus: str, cfg: ExperimentConfig) -> Iterator[str]:
    """Texts of `synthetic`, a text file (one text per line) or a dataset id known to `retriever.data.sources`."""
    if corpus == SYNTHETIC:
        yield from synthetic_benchmark(cfg).docs().values()
        return
    path = Path(corpus)
    if path.is_file():
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                if line.strip():
                    yield line.rstrip("\n")
        return
    from retriever.data.sources import load_source

    for _, text in load_source(corpus).docs():
        yield text
