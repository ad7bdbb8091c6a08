"""Amazon review dumps, one JSON object per line, plain or .gz, with optional meta_* files.

- 2014: reviewerID, asin, overall, unixReviewTime; meta lines are Python dict literals
  with `categories` as a list of paths (the first is used).
- 2018: same review keys (+ vote, style, verified); `unixReviewTime` is sometimes missing
  and only `reviewTime` ("MM DD, YYYY") is there; meta is JSON with `category`, `brand`, `title`.
- 2023: user_id, parent_asin/asin, rating, timestamp in milliseconds; meta has
  `categories` (one path), `main_category`, `store`, `details.Brand`.
"""

from __future__ import annotations

import ast
import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from pagellm.config import DataConfig
from pagellm.data.schema import DataSourceError, ReadResult, Rejects
from pagellm.data.validate import canonical_items, finish_read, require_path

try:  # orjson is ~3x faster per line; json is the fallback when it is not installed
    import orjson

    _json_loads = orjson.loads
except ImportError:  # pragma: no cover - depends on the environment
    _json_loads = json.loads

DEFAULT_SCALE = (1.0, 5.0)
EXPECTED = (
    "an Amazon reviews file (reviews_*.json[.gz], *.json[l][.gz]) or a folder holding them, "
    "with optional meta_*.json[l][.gz]"
)
_JSON_SUFFIXES = (".json", ".json.gz", ".jsonl", ".jsonl.gz")
_REVIEW_TIME_FORMAT = "%m %d, %Y"  # reviewTime, e.g. "02 28, 2014"


def _has_json_suffix(path: Path) -> bool:
    return path.is_file() and path.name.endswith(_JSON_SUFFIXES)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(_JSON_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _review_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    candidates = [p for p in sorted(root.iterdir()) if _has_json_suffix(p) and not p.name.startswith("meta_")]
    named = [p for p in candidates if p.name.startswith("reviews_") or ".jsonl" in p.name]
    files = named or candidates  # 2018 names are bare: Category_5.json.gz
    if not files:
        present = sorted(p.name for p in root.iterdir())
        raise DataSourceError(f"{root}: no review files; expected {EXPECTED}; found {present}")
    return files


def _meta_files(cfg: DataConfig, root: Path, reviews: list[Path]) -> list[Path]:
    if cfg.items_path:
        meta = require_path(cfg.items_path, "an Amazon meta_*.json[l][.gz] file or a folder of them")
        return [meta] if meta.is_file() else [p for p in sorted(meta.iterdir()) if _has_json_suffix(p)]
    if root.is_dir():
        return [p for p in sorted(root.iterdir()) if p.name.startswith("meta_") and _has_json_suffix(p)]
    # One reviews file: its own category's meta, e.g. reviews_Toy_5.json.gz -> meta_Toy.json.gz.
    category = _stem(reviews[0]).removeprefix("reviews_").removesuffix("_5")
    return [p for s in _JSON_SUFFIXES if _has_json_suffix(p := root.parent / f"meta_{category}{s}")]


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            for number, line in enumerate(fh, 1):
                if line.strip():
                    yield number, line
    except (OSError, EOFError, zlib.error) as exc:
        raise DataSourceError(f"{path}: cannot be read to the end ({exc}); is the .gz file complete?") from exc


def _parse(line: bytes) -> dict | None:
    try:
        record = _json_loads(line)
    except ValueError:
        # 2014 meta (and some 2014 review) lines are Python literals, not JSON.
        try:
            record = ast.literal_eval(line.decode("utf-8", errors="replace").strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return None
    return record if isinstance(record, dict) else None


def _read_reviews(path: Path, rejects: Rejects) -> pd.DataFrame:
    users, items, ratings, stamps, numbers = [], [], [], [], []
    kinds = []  # per stamp: 0 unixReviewTime (s), 1 2023 timestamp (ms), 2 reviewTime date
    for number, line in _lines(path):
        record = _parse(line)
        if record is None:
            rejects.add("unparseable", path.name, number, line.decode("utf-8", errors="replace").strip())
            continue
        users.append(record.get("reviewerID", record.get("user_id")))
        items.append(record.get("parent_asin") or record.get("asin"))
        ratings.append(record.get("overall", record.get("rating")))
        if "unixReviewTime" in record:
            kind, stamp = 0, record["unixReviewTime"]
        elif "timestamp" in record:
            kind, stamp = 1, record["timestamp"]
        else:
            kind, stamp = 2, record.get("reviewTime")
        stamps.append(stamp)
        kinds.append(kind)
        numbers.append(number)
    return pd.DataFrame(
        {
            "user_id": pd.Series(users, dtype=object),
            "item_id": pd.Series(items, dtype=object),
            "rating": pd.Series(ratings, dtype=object),
            "timestamp": _seconds(pd.Series(stamps, dtype=object), np.array(kinds, dtype=np.int8)),
            "_line": np.array(numbers, dtype=np.int64),
            "_source": path.name,
        }
    )


def _seconds(stamps: pd.Series, kinds: np.ndarray) -> pd.Series:
    """Timestamps in seconds: unixReviewTime as is, 2023 milliseconds / 1000, reviewTime parsed.

    A value that cannot be converted is kept as it was, so validation rejects it with its text.
    """
    out = stamps.copy()
    millis = kinds == 1
    if millis.any():
        values = pd.to_numeric(stamps[millis], errors="coerce")
        good = values.notna() & np.isfinite(values) & (values >= 0)  # keep bad ones as written
        out.loc[good[good].index] = (values[good] // 1000).astype(object)
    dated = kinds == 2
    if dated.any():
        text = stamps[dated].where(stamps[dated].map(lambda v: isinstance(v, str)))
        parsed = pd.to_datetime(text, format=_REVIEW_TIME_FORMAT, errors="coerce", utc=True)
        good = parsed.notna()
        stamps_utc = parsed[good].dt.tz_localize(None)
        out.loc[good[good].index] = ((stamps_utc - pd.Timestamp(0)) // pd.Timedelta(seconds=1)).astype(object)
    return out


def _category_path(record: dict) -> list[str]:
    categories = record.get("categories")
    if isinstance(categories, list) and categories:
        first = categories[0]
        path = first if isinstance(first, list) else categories  # 2014: list of paths
    elif isinstance(record.get("category"), list):  # 2018
        path = record["category"]
    elif record.get("main_category"):  # 2023 item with no path
        path = [record["main_category"]]
    else:
        path = []
    # 2018 category lists sometimes carry scraped HTML fragments; they are not labels.
    labels = [str(label).strip() for label in path]
    return [label for label in labels if label and not (label.startswith("<") or "</" in label)]


def _brand(record: dict) -> str | None:
    details = record.get("details")
    from_details = details.get("Brand") if isinstance(details, dict) else None
    return record.get("brand") or from_details or record.get("store") or None


def _read_meta(path: Path, wanted: set[str], rejects: Rejects) -> tuple[pd.DataFrame, int]:
    """Metadata rows of the interacted items, and how many lines the file held."""
    rows, total = [], 0
    for number, line in _lines(path):
        total += 1
        record = _parse(line)
        if record is None:
            rejects.add("unparseable", path.name, number, line.decode("utf-8", errors="replace").strip())
            continue
        item = record.get("parent_asin") or record.get("asin")
        if item is None or str(item).strip() in wanted:
            title = record.get("title")
            rows.append((item, _category_path(record), _brand(record), title, number))
    frame = pd.DataFrame(rows, columns=["item_id", "categories", "brand", "title", "_line"])
    return frame, total


def read_amazon(cfg: DataConfig) -> ReadResult:
    root = require_path(cfg.path, EXPECTED)
    reviews = _review_files(root)
    rejects = Rejects()
    raw = pd.concat([_read_reviews(path, rejects) for path in reviews], ignore_index=True)
    scale = tuple(cfg.rating_scale) if cfg.rating_scale else DEFAULT_SCALE
    source = reviews[0].name if len(reviews) == 1 else root.name
    meta_files = _meta_files(cfg, root, reviews)
    if not meta_files:
        return finish_read(raw, None, rejects, scale, [], source=source, where=str(root))

    # Meta dumps list far more products than were reviewed: keep only the reviewed ones.
    wanted = set(raw["item_id"].dropna().astype(str).str.strip())
    notes, frames = [], []
    for path in meta_files:
        frame, total = _read_meta(path, wanted, rejects)
        notes.append(f"{path.name}: {total} metadata lines, {len(frame)} for reviewed items")
        frames.append(frame.assign(_source=path.name))
    items = canonical_items(pd.concat(frames, ignore_index=True), rejects, meta_files[0].name)
    return finish_read(raw, items, rejects, scale, notes, source=source, where=str(root))
