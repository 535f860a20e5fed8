"""The findings as pages: ``findings.md`` (verdicts, numbers and rules), ``findings.json`` and the short section of
the results page."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from retriever.report.findings import BEST_CELL, SCALING, SPARSE_VS_DENSE, Finding, Findings
from retriever.report.formatting import format_count, metric_label


def _num(value: float | None, digits: int = 4, sign: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    value = round(value, digits) + 0.0  # no "-0.0000"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _interval_text(d: Mapping[str, float] | None, sign: bool = True) -> str:
    if d is None:
        return "–"
    return f"{_num(d['estimate'], sign=sign)} [{_num(d['ci_low'], sign=sign)}, {_num(d['ci_high'], sign=sign)}]"


def _verdict_table(findings: Findings) -> list[str]:
    lines = ["| Finding | Verdict | Why |", "|:---|:---|:---|"]
    return lines + [f"| {f.id[0]}. {f.claim} | **{f.verdict}** | {_md(f.reason)} |" for f in findings.findings]


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def findings_summary(findings: Findings, link: str = "findings.md") -> list[str]:
    """A short Markdown section of the verdicts for the results page, linking to the full page."""
    return [
        "## The paper's findings",
        "",
        f"On `{findings.dataset}`, from per-query {metric_label(findings.metric)} ({findings.num_queries} queries).",
        "",
        *_verdict_table(findings),
        "",
        f"Numbers, intervals and the rules behind each verdict: [{link}]({link}).",
    ]


def findings_markdown(findings: Findings) -> str:
    """The human-readable page of the findings (findings.md)."""
    s = findings.settings
    label = metric_label(findings.metric)
    if "error" in s:
        method = f"Not judged: {s['error']}."
    else:
        method = (
            f"Intervals: {round(100 * s['confidence'])}% percentile bootstrap over queries "
            f"({s['bootstrap_resamples']} resamples, seed {s['seed']}, the same resamples for every cell). "
            f"Tests: {s['test']}, significant at p < {s['alpha']:g}."
        )
    md = [
        "# The paper's findings, judged from this sweep",
        "",
        f"arXiv 2502.15526 on `{findings.dataset}`, {label} over {findings.num_queries} judged queries. {method} "
        "Verdicts are `reproduced`, `not reproduced` or `inconclusive`.",
        "",
        *_verdict_table(findings),
    ]
    md += _scaling_section(findings[SCALING], label)
    md += _sparse_vs_dense_section(findings[SPARSE_VS_DENSE], label)
    md += _best_cell_section(findings[BEST_CELL])
    return "\n".join(md) + "\n"


def _section(number: int, finding: Finding) -> list[str]:
    return [
        "",
        f"## {number}. {finding.claim}",
        "",
        f"**{finding.verdict}**: {finding.reason}",
        "",
        f"Rule: {finding.rule}",
    ]


def _table(header: str, align: str, rows: list[str]) -> list[str]:
    return ["", header, align, *rows]


def _scaling_section(scaling: Finding, label: str) -> list[str]:
    if not scaling.details.get("lines"):
        return _section(1, scaling)
    rows = []
    for line in scaling.details["lines"]:
        points = ", ".join(
            f"{c['backbone']} ({format_count(c['parameters'])}): {c['mean']:.4f}" for c in line["cells"]
        )
        exponent = _interval_text(line["exponent"]) if line["exponent"] else f"no fit: {line.get('reason')}"
        rows.append(f"| {line['paradigm']} | {line['loss'].upper()} | {points} | {exponent} | {_num(line['r2'])} |")
    verdicts = [
        f"| {p['paradigm']} | {_interval_text(p['kd_minus_cl'])} | {p['verdict']} | {p['reason']} |"
        for p in scaling.details["paradigms"]
    ]
    return [
        *_section(1, scaling),
        *_table(
            f"| Paradigm | Loss | Cells (params: mean {label}) | b [95% CI] | R² |", "|:---|:---|:---|---:|---:|", rows
        ),
        *_table("| Paradigm | b_KD - b_CL [95% CI] | Verdict | Why |", "|:---|---:|:---|:---|", verdicts),
    ]


def _sparse_vs_dense_section(versus: Finding, label: str) -> list[str]:
    rows = []
    for pair in versus.details.get("pairs", []):
        t = pair["test"]
        better = {"a": "sparse", "b": "dense"}.get(t["better"], "neither")
        rows.append(
            f"| {pair['backbone']} | {pair['loss'].upper()} | {t['mean_a']:.4f} | {t['mean_b']:.4f} | "
            f"{_interval_text(t['difference'])} | {t['p_value']:.3g} | {better} |"
        )
    if not rows:
        return _section(2, versus)
    header = f"| Backbone | Loss | sparse {label} | dense {label} | sparse - dense [95% CI] | p | better |"
    return [*_section(2, versus), *_table(header, "|:---|:---|---:|---:|---:|---:|:---|", rows)]


def _best_cell_section(best: Finding) -> list[str]:
    d = best.details
    if "cell" not in d:
        return _section(3, best)
    header = "| Cell | mean [95% CI] | rank | best cell | best mean | best - cell [95% CI] | p |"
    row = (
        f"| {d['cell']} | {_interval_text(d['cell_mean'], sign=False)} | {d['rank']} of {d['cells']} | "
        f"{d['best']} | {d['best_mean']:.4f} | "
        f"{_interval_text(d['to_best']['difference']) if d['to_best'] else '–'} | "
        f"{_num(d['to_best']['p_value'], 3) if d['to_best'] else '–'} |"
    )
    return [*_section(3, best), *_table(header, "|:---|---:|---:|:---|---:|---:|---:|", [row])]


def write_findings(report_dir: str | Path, findings: Findings) -> dict[str, dict[str, Any]]:
    """Write ``findings.md`` and ``findings.json`` under ``report_dir``; return `Findings.mlflow` (tags, metrics)."""
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = json.dumps(_finite(findings.to_dict()), indent=2, allow_nan=False)
    (out / "findings.json").write_text(payload + "\n", encoding="utf-8")
    (out / "findings.md").write_text(findings_markdown(findings), encoding="utf-8")
    return findings.mlflow()


def _finite(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
