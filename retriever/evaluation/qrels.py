"""Qrels from a TREC file or an ir_datasets id."""

from __future__ import annotations

import logging
from pathlib import Path

from retriever.trec import QrelsDict, TrecFormatError, read_qrels

logger = logging.getLogger(__name__)


def qrels_from_ir_datasets(dataset_id: str) -> QrelsDict:
    """Qrels of an ir_datasets dataset (``ir_datasets.load(id).qrels_iter()``).

    Repeated identical judgments are merged (and counted in a warning); conflicting grades are an error.
    """
    import ir_datasets

    try:
        dataset = ir_datasets.load(dataset_id)
    except KeyError:
        raise KeyError(
            f"{dataset_id!r} is neither an existing qrels file nor a known ir_datasets id "
            "(see https://ir-datasets.com for ids)"
        ) from None
    if not dataset.has_qrels():
        raise ValueError(f"ir_datasets dataset {dataset_id!r} has no qrels; pick a split with judgments")
    qrels: QrelsDict = {}
    repeated = 0
    try:
        for qrel in dataset.qrels_iter():
            docs = qrels.setdefault(str(qrel.query_id), {})
            docid, grade = str(qrel.doc_id), int(qrel.relevance)
            if docid in docs:
                if docs[docid] != grade:
                    raise TrecFormatError(
                        f"{dataset_id}: document {docid!r} of query {qrel.query_id!r} is judged both "
                        f"{docs[docid]} and {grade}"
                    )
                repeated += 1
            docs[docid] = grade
    except RuntimeError as err:
        raise RuntimeError(
            f"could not read the qrels of ir_datasets id {dataset_id!r} ({err}); when offline, place the files "
            "under IR_DATASETS_HOME or pass a TREC qrels file instead"
        ) from err
    if repeated:
        logger.warning("%s: %d repeated identical judgments merged", dataset_id, repeated)
    return qrels


def load_qrels(qrels_or_dataset_id: str | Path) -> QrelsDict:
    """Qrels from a TREC qrels file when the argument is an existing file, otherwise from an ir_datasets id."""
    if Path(qrels_or_dataset_id).is_file():
        return read_qrels(qrels_or_dataset_id)
    return qrels_from_ir_datasets(str(qrels_or_dataset_id))
