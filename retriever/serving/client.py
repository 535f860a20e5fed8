"""`retriever query`: a small HTTP client of the search API that prints a ranked table."""

from __future__ import annotations

import json
import shutil
import textwrap
import urllib.error
import urllib.request
from typing import Any

from retriever.errors import UserError


class QueryError(UserError, RuntimeError):
    """The service refused the query or could not be reached; the message carries the server's own words."""


def _call(url: str, path: str, token: str | None, body: dict[str, Any] | None, timeout_s: float) -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url.rstrip("/") + path, data=data, headers=headers, method="POST" if data else "GET"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail", exc.reason)
        except (ValueError, AttributeError):
            detail = exc.reason
        retry = exc.headers.get("Retry-After")
        hint = f" (retry after {retry} s)" if retry else ""
        raise QueryError(f"{url}: HTTP {exc.code}: {detail}{hint}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise QueryError(f"{url}: cannot reach the service ({reason}); is `retriever serve` running there?") from None


def served_models(url: str, token: str | None = None, timeout_s: float = 30.0) -> list[str]:
    """Names of the models the service serves (GET /models)."""
    return [model["name"] for model in _call(url, "/models", token, None, timeout_s)["models"]]


def query_service(
    url: str,
    text: str,
    models: list[str],
    k: int = 10,
    *,
    token: str | None = None,
    explain: bool = False,
    with_text: bool = False,
    timeout_s: float = 30.0,
) -> dict[str, Any]:
    """POST /search and return the response body."""
    body = {"query": text, "k": k, "model": models[0] if len(models) == 1 else models, "explain": explain}
    if with_text:
        body["text"] = True
    return _call(url, "/search", token, body, timeout_s)


def format_hits(response: dict[str, Any], width: int | None = None) -> str:
    """Rank, doc id, score, and (when present) the passage text and the top matched terms."""
    width = width or shutil.get_terminal_size((120, 20)).columns
    model = response["model"] if isinstance(response["model"], str) else " + ".join(response["model"])
    lines = [f"model {model} · {len(response['hits'])} hits · {response['took_ms']:.1f} ms"]
    if response.get("partial"):
        lines.append(f"PARTIAL: shards {', '.join(response['missing_shards'])} did not answer")
    lines.append(f"{'rank':>4}  {'docid':<20} {'score':>10}")
    for rank, hit in enumerate(response["hits"], start=1):
        lines.append(f"{rank:>4}  {hit['docid']:<20} {hit['score']:>10.4f}")
        if hit.get("text"):
            lines.append("      " + textwrap.shorten(hit["text"], max(20, width - 8), placeholder=" …"))
        if hit.get("terms"):
            terms = ", ".join(f"{t['term']} {t['weight']:.2f}" for t in hit["terms"][:8])
            lines.append(f"      matched: {terms}")
    return "\n".join(lines)
