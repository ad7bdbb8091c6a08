"""Per-user item sequences (the P5 `sequential_data.txt` format), implicit feedback.

Each line is `user item item ...`, oldest first. There are no ratings and no timestamps:
rating is NaN and the timestamp is the position in the user's sequence (0, 1, ...).

Optional companions in the same folder:
- `datamaps.json` (`id2user`, `id2item`): maps the indices back to the original ids. When
  present the original ids are used, because P5 assigned item indices in order of first
  appearance, so the raw indices leak ordering information.
- a RecBole atomic item file (`*.item`, TSV with `name:type` headers), or `data.items_path`.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pandas as pd

from pagellm.config import DataConfig
from pagellm.data.schema import DataSourceError, ReadResult, Rejects
from pagellm.data.validate import canonical_items, finish_read, record_rejects, require_path

EXPECTED = "a sequence file (`user item item ...` per line) or a folder with sequential_data.txt"
DATAMAPS = "datamaps.json"


def _sequence_file(root: Path) -> Path:
    if root.is_file():
        return root
    if (root / "sequential_data.txt").is_file():
        return root / "sequential_data.txt"
    texts = sorted(p for p in root.glob("*.txt") if p.is_file())
    if len(texts) == 1:
        return texts[0]
    present = sorted(p.name for p in root.iterdir())
    raise DataSourceError(
        f"{root}: cannot tell which file holds the sequences; expected {EXPECTED}; found {present}"
    )


def _load_datamaps(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    try:
        maps = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataSourceError(f"{path}: not valid JSON ({exc})") from exc
    if not (isinstance(maps, dict) and all(isinstance(maps.get(k), dict) for k in ("id2user", "id2item"))):
        raise DataSourceError(f"{path}: expected a JSON object with 'id2user' and 'id2item' mappings")
    return maps["id2user"], maps["id2item"]


def _read_sequences(path: Path) -> pd.DataFrame:
    """One row per (line, position): user index, item index, position, line number."""
    users, items, numbers = [], [], []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            tokens = line.split()
            if len(tokens) < 2:  # blank, or a user with no items: no interaction to read
                continue
            count = len(tokens) - 1
            users.extend([tokens[0]] * count)
            items.extend(tokens[1:])
            numbers.extend([number] * count)
    if not users:
        raise DataSourceError(f"{path}: no sequences; expected lines of `user item item ...`")
    raw = pd.DataFrame(
        {
            "user_id": pd.Series(users, dtype=object),
            "item_id": pd.Series(items, dtype=object),
            "_line": np.array(numbers, dtype=np.int64),
        }
    )
    # Position in the user's sequence; counting per user, not per line, keeps a user whose
    # sequence continues on a later line in order.
    raw["timestamp"] = raw.groupby("user_id", sort=False).cumcount().astype(np.int64)
    return raw


def _map_ids(raw: pd.DataFrame, id2user: dict, id2item: dict, rejects: Rejects, source: str) -> pd.DataFrame:
    """Original ids for the indices; an index the maps do not know is a missing_id reject."""
    # Plain dict lookups: several times faster than Series.map(dict) here.
    users = pd.Series([id2user.get(u) for u in raw["user_id"]], dtype=object)
    items = pd.Series([id2item.get(i) for i in raw["item_id"]], dtype=object)
    unknown = (users.isna() | items.isna()).to_numpy()
    rows = np.flatnonzero(unknown)
    if len(rows):
        raws = [
            f"user index {u!r}{'' if ok_u else ' (not in id2user)'}, item index {i!r}"
            f"{'' if ok_i else ' (not in id2item)'} at position {p}"
            for u, i, p, ok_u, ok_i in zip(
                raw["user_id"].iloc[rows], raw["item_id"].iloc[rows], raw["timestamp"].iloc[rows],
                users.notna().iloc[rows], items.notna().iloc[rows],
            )
        ]
        record_rejects(rejects, ["missing_id"] * len(rows), source, raw["_line"].iloc[rows].tolist(), raws)
    return raw.assign(user_id=users, item_id=items)[~unknown].reset_index(drop=True)


def _column(header: list[str], *names: str) -> str | None:
    """The RecBole column (`name:type`) whose name is one of `names`."""
    for column in header:
        if column.split(":", 1)[0] in names:
            return column
    return None


def _token_seq(value) -> list[str] | None:
    """A RecBole token_seq: space-separated tokens, or Amazon's quoted comma list.

    None when a quoted list does not parse.
    """
    if not isinstance(value, str) or not value.strip():
        return []
    text = value.strip()
    if text[0] in "'\"":
        try:
            return [str(label) for label in ast.literal_eval("[" + text + "]")]
        except (ValueError, SyntaxError):
            return None
    return text.split()


def read_recbole_items(path: Path, rejects: Rejects, notes: list[str]) -> pd.DataFrame:
    """A RecBole `.item` file as a canonical item table."""
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError as exc:
        raise DataSourceError(f"{path}: file is empty; expected a RecBole item table") from exc
    header = list(frame.columns)
    id_col = _column(header, "item_id")
    if id_col is None:
        raise DataSourceError(f"{path}: no item_id column; columns present: {header}")
    cat_col = _column(header, "categories", "category", "genre", "genres")
    brand_col, title_col = _column(header, "brand"), _column(header, "title", "movie_title")
    # Items share few distinct category strings: parse each distinct string once.
    distinct = {v: _token_seq(v) for v in frame[cat_col].unique()} if cat_col else {}
    parsed = [distinct[v] for v in frame[cat_col]] if cat_col else [[] for _ in range(len(frame))]
    unreadable = sum(p is None for p in parsed)
    if unreadable:
        notes.append(f"{path.name}: {unreadable} items have categories that do not parse; they get []")
    items = pd.DataFrame(
        {
            "item_id": frame[id_col].to_numpy(dtype=object),
            "categories": [p or [] for p in parsed],
            "brand": frame[brand_col].to_numpy(dtype=object) if brand_col else None,
            "title": frame[title_col].to_numpy(dtype=object) if title_col else None,
        }
    )
    return canonical_items(items, rejects, path.name)


def _item_file(cfg: DataConfig, folder: Path) -> Path | None:
    if cfg.items_path:
        return require_path(cfg.items_path, "a RecBole .item file")
    found = sorted(folder.glob("*.item"))
    return found[0] if found else None


def read_sequence(cfg: DataConfig) -> ReadResult:
    root = require_path(cfg.path, EXPECTED)
    path = _sequence_file(root)
    rejects = Rejects()
    notes = ["no ratings: implicit feedback", "no timestamps: sequence order used as timestamp"]
    raw = _read_sequences(path)
    if (path.parent / DATAMAPS).is_file():
        raw = _map_ids(raw, *_load_datamaps(path.parent / DATAMAPS), rejects, path.name)
    else:
        notes.append(f"no {DATAMAPS}: ids are the file's indices, which may encode first-appearance order")
    raw["rating"] = np.nan
    item_path = _item_file(cfg, path.parent)
    items = read_recbole_items(item_path, rejects, notes) if item_path else None
    return finish_read(raw, items, rejects, None, notes, source=path.name, where=str(path))
