"""Qrels from a TREC file or a dataset id."""

from __future__ import annotations

import logging
from pathlib import Path

from retriever.trec import QrelsDict, TrecFormatError, read_qrels

logger = logging.getLogger(__name__)


def qrels_from_ir_datasets(dataset_id: str) -> QrelsDict:
    """Qrels of a dataset id (ir_datasets hub or local registration), read like every other command reads a
    dataset (``retriever.data.sources``): offline, a file that would have to be downloaded is an error naming
    the file to place, and relevance codes that are not gains (Cranfield) are mapped to gains.

    Repeated identical judgments are merged (and counted in a warning); conflicting grades are an error.
    """
    from retriever.data.sources import IrDatasetsSource, UnknownSourceError, known_datasets_hint

    try:
        source = IrDatasetsSource(dataset_id)
    except UnknownSourceError:
        raise UnknownSourceError(
            f"{dataset_id!r} is neither an existing qrels file nor a known dataset id; {known_datasets_hint()}"
        ) from None
    qrels: QrelsDict = {}
    repeated = 0
    for query_id, doc_id, grade in source.judgments():
        docs = qrels.setdefault(query_id, {})
        if doc_id in docs:
            if docs[doc_id] != grade:
                raise TrecFormatError(
                    f"{dataset_id}: document {doc_id!r} of query {query_id!r} is judged both {docs[doc_id]} and "
                    f"{grade}"
                )
            repeated += 1
        docs[doc_id] = grade
    if repeated:
        logger.warning("%s: %d repeated identical judgments merged", dataset_id, repeated)
    return qrels


def load_qrels(qrels_or_dataset_id: str | Path) -> QrelsDict:
    """Qrels from a TREC qrels file when the argument is an existing file, otherwise from a dataset id."""
    if Path(qrels_or_dataset_id).is_file():
        return read_qrels(qrels_or_dataset_id)
    return qrels_from_ir_datasets(str(qrels_or_dataset_id))
