"""MovieLens: `ratings.csv` + `movies.csv` (ml-latest, ml-20m, ...) or the older
`ratings.dat` + `movies.dat` (ml-1m, ml-10m: `::`-separated, latin-1).

Genres are several unordered labels, not a category path; they all go into `categories`
in file order and the pipeline picks one through `data.category_level`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pagellm.config import DataConfig
from pagellm.data.readers.tabular import read_delimited
from pagellm.data.schema import DataSourceError, ReadResult, Rejects
from pagellm.data.validate import canonical_items, finish_read, record_rejects, require_path

DEFAULT_SCALE = (0.5, 5.0)
NO_GENRES = "(no genres listed)"
EXPECTED = "a MovieLens folder with ratings.csv or ratings.dat (or one of those files)"
RATING_FIELDS = ["userId", "movieId", "rating", "timestamp"]
MOVIE_FIELDS = ["movieId", "title", "genres"]


def read_dat(path: Path, fields: list[str], rejects: Rejects) -> pd.DataFrame:
    """A `::`-separated, header-less, latin-1 file as strings with `_line`.

    Lines with the wrong number of fields are `unparseable` rejects.
    """
    lines = path.read_text(encoding="latin-1").splitlines()
    parts = [line.split("::") for line in lines]
    numbers = np.arange(1, len(lines) + 1)
    sizes = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
    blank = np.fromiter((not line.strip() for line in lines), dtype=bool, count=len(lines))
    good = (sizes == len(fields)) & ~blank
    bad = np.flatnonzero(~good & ~blank)
    if len(bad):
        record_rejects(
            rejects, ["unparseable"] * len(bad), path.name, numbers[bad].tolist(),
            [f"expected {len(fields)} '::'-separated fields: {lines[i]}" for i in bad],
        )
    frame = pd.DataFrame([parts[i] for i in np.flatnonzero(good)], columns=fields, dtype=object)
    frame["_line"] = numbers[good]
    return frame


def _require_fields(frame: pd.DataFrame, fields: list[str], path: Path) -> None:
    missing = [f for f in fields if f not in frame.columns]
    if missing:
        present = [c for c in frame.columns if c != "_line"]
        raise DataSourceError(f"{path}: missing columns {missing}; columns present: {present}")


def _find(root: Path, stem: str) -> Path | None:
    for suffix in (".csv", ".dat"):
        if (root / f"{stem}{suffix}").is_file():
            return root / f"{stem}{suffix}"
    return None


def _genres(value) -> list[str]:
    if not isinstance(value, str):
        return []
    return [g for g in (part.strip() for part in value.split("|")) if g and g != NO_GENRES]


def read_movies(path: Path, rejects: Rejects) -> pd.DataFrame:
    """movies.csv / movies.dat as a canonical item table (genres as categories, no brand)."""
    frame = read_dat(path, MOVIE_FIELDS, rejects) if path.suffix == ".dat" else read_delimited(path, rejects)
    _require_fields(frame, MOVIE_FIELDS, path)
    items = pd.DataFrame(
        {
            "item_id": frame["movieId"].to_numpy(dtype=object),
            "categories": [_genres(v) for v in frame["genres"].to_numpy(dtype=object)],
            "brand": None,
            "title": frame["title"].to_numpy(dtype=object),
            "_line": frame["_line"].to_numpy(),
        }
    )
    return canonical_items(items, rejects, path.name)


def read_movielens(cfg: DataConfig) -> ReadResult:
    root = require_path(cfg.path, EXPECTED)
    ratings_path = root if root.is_file() else _find(root, "ratings")
    if ratings_path is None:
        present = sorted(p.name for p in root.iterdir())
        raise DataSourceError(f"{root}: no ratings.csv or ratings.dat; expected {EXPECTED}; found {present}")
    if cfg.items_path:
        movies_path = require_path(cfg.items_path, "a MovieLens movies.csv or movies.dat")
    else:
        movies_path = _find(ratings_path.parent, "movies")

    rejects = Rejects()
    if ratings_path.suffix == ".dat":
        frame = read_dat(ratings_path, RATING_FIELDS, rejects)
    else:
        frame = read_delimited(ratings_path, rejects)
    _require_fields(frame, RATING_FIELDS, ratings_path)
    raw = pd.DataFrame(
        {
            "user_id": frame["userId"],
            "item_id": frame["movieId"],
            "rating": frame["rating"],
            "timestamp": frame["timestamp"],
            "_line": frame["_line"],
        }
    )
    scale = tuple(cfg.rating_scale) if cfg.rating_scale else DEFAULT_SCALE
    notes = ["categories are genres: several unordered labels per movie, not a path"]
    items = read_movies(movies_path, rejects) if movies_path is not None else None
    result = finish_read(raw, items, rejects, scale, notes, source=ratings_path.name, where=str(ratings_path))
    no_genre = int((result.items["categories"].map(len) == 0).sum())
    if no_genre:
        result.notes.append(f"{no_genre} rated movies have no genre: they get category []")
    return result
