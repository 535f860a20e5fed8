"""Encoding: texts → dense vectors or sparse term weights, and the one owner of the encodings folder format
(`retriever.encoding.store`): in process (`encode_corpus`) or on a Ray Data actor pool (`encode_corpus_ray`).

Names are imported from their modules on first use, so the index (which reads encodings through `batches` and
`store`: numpy and pyarrow only) does not pay for torch and transformers at import time.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "batches": ("Batch", "DenseBatch", "EncodingFormatError", "Paradigm", "SparseBatch", "make_batch"),
    "corpus": ("encode_corpus", "encode_corpus_auto"),
    "encoder": ("EncoderInfo", "LoadedEncoder", "encoder_fingerprint", "load_inference_encoder"),
    "engine": ("Terms", "encode_texts", "length_batches", "sparse_terms"),
    "inputs": ("docs_to_parquet",),
    "ray_data": ("EncoderActor", "encode_corpus_ray"),
    "run": ("EmptyInputError", "EncodingResult"),
    "store": (
        "ENCODING_FILE",
        "EncodingInfo",
        "EncodingWriter",
        "finished_encoding",
        "read_encoding_info",
        "read_encodings",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'retriever.encoding' has no attribute {name!r}")
    value = getattr(import_module(f"retriever.encoding.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value
