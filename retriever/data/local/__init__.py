"""Local collections served through ir_datasets: strict file `readers`, `handlers`, dataset `specs` and the
persistent `registry` (``$IR_DATASETS_HOME/retriever_local.json``) that every process sees."""

from retriever.data.local.readers import (
    FORMATS,
    DataFormatError,
    LocalDoc,
    Located,
    join_title_text,
    numbered_lines,
    require_file,
    sniff_format,
    split_lines,
)
from retriever.data.local.registry import (
    install_lazy_lookup,
    persisted_datasets,
    register_beir_folder,
    register_local_dataset,
    register_trec,
    registry_file,
    reregister_persisted,
    unregister_local_dataset,
)
from retriever.data.local.specs import build_dataset, check_dataset_id, check_name, validate_dataset

__all__ = [
    "FORMATS",
    "DataFormatError",
    "LocalDoc",
    "Located",
    "build_dataset",
    "check_dataset_id",
    "check_name",
    "install_lazy_lookup",
    "join_title_text",
    "numbered_lines",
    "persisted_datasets",
    "register_beir_folder",
    "register_local_dataset",
    "register_trec",
    "registry_file",
    "require_file",
    "reregister_persisted",
    "sniff_format",
    "split_lines",
    "unregister_local_dataset",
    "validate_dataset",
]
