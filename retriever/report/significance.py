"""Whether the sweep's best encoders differ significantly from BM25 and from each other, per query.

On the primary dataset and metric, the best cell of each paradigm (by mean), BM25 and each other are compared with
`retriever.evaluation.compare_runs` (two-sided paired t-test over the judged queries, significant at p <= 0.05) on
the run files the sweep wrote: ``cells/<cell>/eval/<dataset>/run.trec`` and ``baselines/bm25/eval/<dataset>/
run.trec``. A run that is missing is left out, and the result says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from retriever.records import BASELINES_DIR, cell_dir, run_file
from retriever.report.formatting import metric_label
from retriever.report.ranking import best_cells

BM25 = "BM25"
TEST = "student"
MAX_P = 0.05


def _best_runs(root: Path, records: list[dict[str, Any]], dataset: str, metric: str) -> dict[str, Path]:
    """``{label: run file}`` of BM25 and of each paradigm's best cell, for the run files that exist."""
    candidates = {BM25: run_file(root / BASELINES_DIR / "bm25", dataset)}
    for paradigm, record in sorted(best_cells(records, dataset, metric).items()):
        label = f"best {paradigm}: {record['backbone']} {paradigm} {record['loss'].upper()}"
        candidates[label] = run_file(cell_dir(root, record), dataset)
    return candidates


def compare_best(
    root: str | Path,
    records: list[dict[str, Any]],
    qrels: Mapping[str, Mapping[str, int]],
    *,
    dataset: str,
    metric: str,
) -> dict[str, Any]:
    """The paired tests between BM25 and each paradigm's best cell (and between those cells) on ``dataset``.

    Returns ``{"dataset", "metric", "test", "max_p", "runs": {label: run file}, "missing": [...], "comparisons":
    [...]}`` with `compare_runs`' rows (``run_a``, ``run_b``, means, ``p_value``, ``significant``, ``better``);
    no comparisons when fewer than two runs exist.
    """
    from retriever.evaluation import compare_runs, protocol_for_dataset
    from retriever.trec import read_run

    candidates = _best_runs(Path(root), records, dataset, metric)
    runs = {label: path for label, path in candidates.items() if path.is_file()}
    missing = [f"{label} ({path})" for label, path in candidates.items() if label not in runs]
    result: dict[str, Any] = {"dataset": dataset, "metric": metric, "test": TEST, "max_p": MAX_P}
    result |= {"runs": {label: str(path) for label, path in runs.items()}, "missing": missing, "comparisons": []}
    if len(runs) >= 2:
        compared = compare_runs(
            qrels,
            {label: read_run(path) for label, path in runs.items()},
            metrics=[metric],
            test=TEST,
            max_p=MAX_P,
            protocol=protocol_for_dataset(dataset),
        )
        result["comparisons"] = compared["comparisons"]
        result["num_queries"] = compared["num_queries"]
    return result


def significance_summary(result: Mapping[str, Any]) -> list[str]:
    """The Markdown section of the results page."""
    label = metric_label(result["metric"])
    md = ["## Significance of the best cells", ""]
    if not result["comparisons"]:
        md.append(f"Not tested on `{result['dataset']}`: fewer than two runs ({_missing(result['missing'])}).")
        return md
    md += [
        f"On `{result['dataset']}`, per-query {label} over {result['num_queries']} judged queries: two-sided paired "
        f"t-test, significant at p ≤ {result['max_p']:g}.",
        "",
        f"| A | B | A {label} | B {label} | A - B | p | significant |",
        "|:---|:---|---:|---:|---:|---:|:---|",
    ]
    for row in result["comparisons"]:
        md.append(
            f"| {row['run_a']} | {row['run_b']} | {row['mean_a']:.4f} | {row['mean_b']:.4f} | "
            f"{row['difference']:+.4f} | {row['p_value']:.3g} | {'yes' if row['significant'] else 'no'} |"
        )
    if result["missing"]:
        md += ["", f"Left out: {_missing(result['missing'])}."]
    return md


def _missing(missing: Sequence[str]) -> str:
    return "no run file for " + ", ".join(missing) if missing else "nothing to compare"


__all__ = ["compare_best", "significance_summary"]
