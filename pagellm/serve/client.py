"""A small Python client for the PageLLM serving API (docs/ARCHITECTURE.md §8).

    from pagellm.serve.client import get_page, score_page
    page = get_page("http://127.0.0.1:8000", history=["B00A", "B00B"], k=10, user_id="A1")
    [item["item_id"] for item in page["items"]], page["fallback"], page["warnings"]

Errors the server explains (422 bad input, 503 no reward model, ...) raise `PageLLMError`
carrying the status and the server's message.
"""

from __future__ import annotations

from typing import Any

import requests


class PageLLMError(RuntimeError):
    def __init__(self, status: int, message: str, body: Any = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.body = body


def _post(url: str, path: str, payload: dict, timeout: float, session: requests.Session | None) -> dict:
    http = session or requests
    resp = http.post(url.rstrip("/") + path, json=payload, timeout=timeout)
    try:
        body = resp.json()
    except ValueError:
        body = None
    if resp.status_code != 200:
        message = body.get("error") if isinstance(body, dict) else None
        raise PageLLMError(resp.status_code, message or resp.text[:500], body)
    return body


def get_page(
    url: str,
    history: list,
    k: int = 10,
    user_id: str | int | None = None,
    exclude: list | None = None,
    timeout: float = 10.0,
    session: requests.Session | None = None,
) -> dict:
    """POST /v1/page -> {"items": [{"item_id", "score"}], "model_version", "fallback",
    "warnings", "timings_ms"}. Pass a `requests.Session` to reuse connections."""
    payload: dict = {"history": list(history), "k": k}
    if user_id is not None:
        payload["user_id"] = user_id
    if exclude:
        payload["exclude"] = list(exclude)
    return _post(url, "/v1/page", payload, timeout, session)


def score_page(
    url: str,
    history: list,
    page: list,
    user_id: str | int | None = None,
    timeout: float = 10.0,
    session: requests.Session | None = None,
) -> dict:
    """POST /v1/score -> {"r_c", "r_f", "r", "model_version", "warnings"}."""
    payload: dict = {"history": list(history), "page": list(page)}
    if user_id is not None:
        payload["user_id"] = user_id
    return _post(url, "/v1/score", payload, timeout, session)


def health(url: str, timeout: float = 5.0) -> dict:
    """GET /healthz -> {"status": "ok", "model_version", "reward_model_version"}."""
    resp = requests.get(url.rstrip("/") + "/healthz", timeout=timeout)
    if resp.status_code != 200:
        raise PageLLMError(resp.status_code, resp.text[:500])
    return resp.json()
