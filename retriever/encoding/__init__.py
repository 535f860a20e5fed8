"""Encoding: texts → dense vectors or sparse term weights, and the one owner of the encodings folder format
(`retriever.encoding.store`): in process (`encode_corpus`) or on a Ray Data actor pool (`encode_corpus_ray`)."""

from retriever.encoding.batches import Batch, DenseBatch, EncodingFormatError, Paradigm, SparseBatch, make_batch
from retriever.encoding.corpus import encode_corpus, encode_corpus_auto
from retriever.encoding.encoder import EncoderInfo, LoadedEncoder, encoder_fingerprint, load_inference_encoder
from retriever.encoding.engine import Terms, encode_texts, length_batches, sparse_terms
from retriever.encoding.inputs import docs_to_parquet
from retriever.encoding.ray_data import EncoderActor, encode_corpus_ray
from retriever.encoding.run import EncodingResult
from retriever.encoding.store import (
    ENCODING_FILE,
    EncodingInfo,
    EncodingWriter,
    finished_encoding,
    read_encoding_info,
    read_encodings,
)

__all__ = [
    "ENCODING_FILE",
    "Batch",
    "DenseBatch",
    "EncoderActor",
    "EncoderInfo",
    "EncodingFormatError",
    "EncodingInfo",
    "EncodingResult",
    "EncodingWriter",
    "LoadedEncoder",
    "Paradigm",
    "SparseBatch",
    "Terms",
    "docs_to_parquet",
    "encode_corpus",
    "encode_corpus_auto",
    "encode_corpus_ray",
    "encode_texts",
    "encoder_fingerprint",
    "finished_encoding",
    "length_batches",
    "load_inference_encoder",
    "make_batch",
    "read_encoding_info",
    "read_encodings",
    "sparse_terms",
]
