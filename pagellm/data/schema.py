"""The canonical tables every reader and the simulator produce, and rejects bookkeeping.

interactions: user_id (str), item_id (str), rating (float64; NaN = implicit positive),
              timestamp (int64; seconds, or the position in the user's sequence when the
              source only gives order)
items:        item_id (str), categories (list<str>: the category path, root first, or []),
              brand (str | None), title (str | None)

Readers never drop a row silently: every row they cannot turn into a canonical row goes
into `Rejects` with a reason, and the pipeline writes them to `data/rejects.parquet` and
counts them in `stats.json["rejected"]`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pandas as pd

INTERACTION_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]
ITEM_COLUMNS = ["item_id", "categories", "brand", "title"]

# Reasons a row is rejected; stats.json counts each.
REASONS = (
    "unparseable",  # the line/row could not be parsed at all
    "missing_id",  # user or item id empty/missing
    "bad_rating",  # rating not a number or outside the scale
    "bad_timestamp",  # timestamp not an integer-like number or negative
    "duplicate",  # a later (user, item) row of one already kept
)


@dataclass
class Rejects:
    """Rows that did not make it, with the reason and enough context to find them."""

    rows: list[dict] = field(default_factory=list)

    def add(self, reason: str, source: str, line: int | None, raw: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown reject reason {reason!r}")
        self.rows.append({"reason": reason, "source": source, "line": line, "raw": str(raw)[:500]})

    def extend(self, other: "Rejects") -> None:
        self.rows.extend(other.rows)

    def counts(self) -> dict[str, int]:
        return dict(Counter(r["reason"] for r in self.rows))

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["reason", "source", "line", "raw"])

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class ReadResult:
    interactions: pd.DataFrame  # INTERACTION_COLUMNS, dtypes as documented above
    items: pd.DataFrame  # ITEM_COLUMNS; may be empty when the source has no metadata
    rejects: Rejects
    rating_scale: tuple[float, float] | None  # None: implicit feedback (no ratings)
    notes: list[str] = field(default_factory=list)  # what the source lacks, for stats.json


def empty_items() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in ITEM_COLUMNS})


def canonical_interactions(df: pd.DataFrame) -> pd.DataFrame:
    """Cast to the canonical dtypes (after validation has removed bad rows)."""
    return pd.DataFrame(
        {
            "user_id": df["user_id"].astype(str),
            "item_id": df["item_id"].astype(str),
            "rating": pd.to_numeric(df["rating"], errors="coerce").astype("float64"),
            "timestamp": df["timestamp"].astype("int64"),
        }
    ).reset_index(drop=True)


class DataSourceError(RuntimeError):
    """A data source that cannot be read at all (missing path, empty file, no rows)."""
