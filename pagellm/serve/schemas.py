"""Request and response bodies of the serving API (docs/ARCHITECTURE.md §8), checked with pydantic.

Limits that come from the config (max_k, max_history) are passed as validation context,
so one model class serves every run. `parse_request` turns any failure (malformed JSON,
wrong types, out-of-range k, oversize history) into one readable message for a 422.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

DEFAULT_LIMITS = {"max_k": 50, "max_history": 200}


def _as_id(value: Any) -> str:
    """Raw ids are strings; JSON integers are accepted and compared as their decimal text."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        shown = json.dumps(value, default=str)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        kind = _json_kind(value)
        raise ValueError(f"an id must be a string or an integer, got {kind}" + ("" if value is None else f" {shown}"))
    text = str(value)
    if not text.strip():
        raise ValueError("an id must not be empty")
    return text


RawId = Annotated[str, BeforeValidator(_as_id)]


def _limit(info: ValidationInfo, name: str) -> int:
    return int((info.context or {}).get(name, DEFAULT_LIMITS[name]))


class _Request(BaseModel):
    # Unknown fields are refused: a typo ("hisotry") must not silently serve a cold-start page.
    model_config = ConfigDict(extra="forbid")

    user_id: RawId | None = None
    history: list[RawId] = Field(default_factory=list, description="item ids, oldest first")

    @field_validator("history")
    @classmethod
    def _history_fits(cls, history: list[str], info: ValidationInfo) -> list[str]:
        limit = _limit(info, "max_history")
        if len(history) > limit:
            raise ValueError(f"history holds {len(history)} items; the limit is {limit} (send the most recent ones)")
        return history


class PageRequest(_Request):
    k: int = Field(10, strict=True, description="page length, 1..max_k")
    exclude: list[RawId] = Field(default_factory=list, description="item ids never to serve")

    @field_validator("k")
    @classmethod
    def _k_in_range(cls, k: int, info: ValidationInfo) -> int:
        limit = _limit(info, "max_k")
        if not 1 <= k <= limit:
            raise ValueError(f"k must be between 1 and {limit}, got {k}")
        return k

    @field_validator("exclude")
    @classmethod
    def _exclude_fits(cls, exclude: list[str], info: ValidationInfo) -> list[str]:
        # Bounded like the history: the exclusion mask is built per request on the hot path.
        limit = max(_limit(info, "max_history"), 1000)
        if len(exclude) > limit:
            raise ValueError(f"exclude holds {len(exclude)} items; the limit is {limit}")
        return exclude


class ScoreRequest(_Request):
    page: list[RawId] = Field(description="the page to score, item ids in display order")

    @field_validator("page")
    @classmethod
    def _page_ok(cls, page: list[str], info: ValidationInfo) -> list[str]:
        limit = _limit(info, "max_k")
        if not page:
            raise ValueError("page is empty; send at least one item id")
        if len(page) > limit:
            raise ValueError(f"page holds {len(page)} items; the limit is {limit}")
        seen, repeated = set(), []
        for item in page:
            if item in seen and item not in repeated:
                repeated.append(item)
            seen.add(item)
        if repeated:
            raise ValueError(f"page repeats item ids {repeated}; a page holds each item once")
        return page


class PageItem(BaseModel):
    item_id: str
    score: float  # log-probability of the item's token under the constrained distribution


class Timings(BaseModel):
    queue: float  # ms waiting for the batch to start
    decode: float  # ms of the batched decode this request rode in
    total: float  # ms from request arrival to answer


class PageResponse(BaseModel):
    items: list[PageItem]
    model_version: str
    fallback: Literal["popularity"] | None = None
    warnings: list[str] = Field(default_factory=list)
    timings_ms: Timings


class ScoreResponse(BaseModel):
    r_c: float
    r_f: float
    r: float
    model_version: str
    warnings: list[str] = Field(default_factory=list)


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model_version: str
    reward_model_version: str | None = None


class RequestError(ValueError):
    """A request that cannot be served as sent; `status` is the HTTP code to answer with."""

    def __init__(self, message: str, status: int = 422, errors: list[dict] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.errors = errors or []

    def body(self) -> dict:
        return {"error": self.message, "errors": self.errors}


def _where(loc: tuple) -> str:
    """("history", 3) -> "history[3]"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


_JSON_KINDS = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}


def _json_kind(value: Any) -> str:
    return "null" if value is None else _JSON_KINDS.get(type(value), type(value).__name__)


def describe(exc: ValidationError) -> RequestError:
    """One line per problem, e.g. `k: k must be between 1 and 50, got 0`."""
    errors, lines = [], []
    for err in exc.errors(include_url=False, include_context=False):
        if err["type"] == "json_invalid":
            msg = f"malformed JSON: {err['msg'].removeprefix('Invalid JSON: ')}"
            where = "body"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            where = _where(err["loc"])
            if err["type"] == "extra_forbidden":
                msg = "unknown field"
            elif err["type"] == "model_type":
                msg = f"the request body must be a JSON object, got {_json_kind(err.get('input'))}"
            elif err["type"].endswith(("_type", "_parsing")):
                msg = f"{msg}, got {_json_kind(err.get('input'))}"
        errors.append({"loc": where, "msg": msg})
        lines.append(msg if where == "body" else f"{where}: {msg}")
    return RequestError("invalid request: " + "; ".join(lines), 422, errors)


def parse_request(model: type[_Request], body: bytes | str, max_k: int, max_history: int):
    """Validate a raw JSON body against `model` with the run's limits; RequestError on failure."""
    if isinstance(body, bytes) and not body.strip():
        errors = [{"loc": "body", "msg": "empty body"}]
        raise RequestError("invalid request: empty body; send a JSON object", 422, errors)
    try:
        return model.model_validate_json(body, context={"max_k": max_k, "max_history": max_history})
    except ValidationError as exc:
        raise describe(exc) from None
