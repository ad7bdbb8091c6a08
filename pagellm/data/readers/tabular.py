"""Generic CSV / Parquet interactions with a column mapping (`data.columns`).

`data.columns` maps canonical names to the file's names: user_id and item_id are required,
rating and timestamp optional; for the item table (`data.items_path`) item_id, category,
brand and title. Unmapped names default to the canonical name when the file has it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.dataset as pads

from pagellm.config import DataConfig
from pagellm.data.schema import DataSourceError, ReadResult, Rejects
from pagellm.data.validate import canonical_items, finish_read, parse_numbers, record_rejects, require_path

INTERACTION_KEYS = ("user_id", "item_id", "rating", "timestamp")
ITEM_KEYS = ("item_id", "category", "brand", "title")
DEFAULT_SCALE = (1.0, 5.0)


def read_delimited(
    path: Path, rejects: Rejects, sep: str = ",", encoding: str = "utf-8"
) -> pd.DataFrame:
    """A headed delimited file as strings (empty cell = ""), with `_line` = its row number.

    Rows with more or fewer fields than the header are `unparseable` rejects. pyarrow's
    reader reports them with their row number; it runs single-threaded because only then
    does it know those numbers. Row number = line number unless a quoted value spans lines.
    """
    header = column_names(path, parquet=False, sep=sep, encoding=encoding)
    bad: list[tuple[int, str]] = []

    def on_invalid(row) -> str:
        bad.append((row.number, f"{row.actual_columns} fields, header has {row.expected_columns}: {row.text}"))
        return "skip"

    try:
        table = pcsv.read_csv(
            path,
            read_options=pcsv.ReadOptions(use_threads=False, encoding=encoding),
            parse_options=pcsv.ParseOptions(
                delimiter=sep, newlines_in_values=True, ignore_empty_lines=False, invalid_row_handler=on_invalid
            ),
            convert_options=pcsv.ConvertOptions(
                column_types={name: pa.string() for name in header},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as exc:
        raise DataSourceError(f"{path}: not a readable delimited file ({exc})") from exc
    if bad:
        record_rejects(rejects, ["unparseable"] * len(bad), path.name, [b[0] for b in bad], [b[1] for b in bad])
    rows = np.arange(2, table.num_rows + len(bad) + 2)  # the header is row 1
    lines = rows[~np.isin(rows, [b[0] for b in bad])]
    frame = table.to_pandas()
    # Blank lines were kept so the numbering counts them; they hold no row.
    blank = (frame == "").all(axis=1).to_numpy()
    frame = frame[~blank].reset_index(drop=True)
    frame["_line"] = lines[~blank]
    return frame


def column_names(path: Path, parquet: bool, sep: str = ",", encoding: str = "utf-8") -> list[str]:
    if parquet:
        return list(pads.dataset(str(path), format="parquet").schema.names)
    try:
        return list(pd.read_csv(path, nrows=0, sep=sep, encoding=encoding).columns)
    except pd.errors.EmptyDataError as exc:
        raise DataSourceError(f"{path}: file is empty; expected a header row and data rows") from exc


def resolve_columns(
    mapping: dict[str, str], keys: tuple[str, ...], required: tuple[str, ...], present: list[str], where: Path
) -> dict[str, str]:
    """canonical -> file column for the keys the file has; errors name what is missing."""
    resolved = {}
    for key in keys:
        name = mapping.get(key, key)
        if name in present:
            resolved[key] = name
        elif key in mapping or key in required:
            how = f"data.columns.{key} = {name!r}" if key in mapping else f"default name {name!r}"
            raise DataSourceError(
                f"{where}: column for {key} ({how}) not found; columns present: {present}"
            )
    return resolved


def _datetimes_to_seconds(col: pd.Series) -> pd.Series:
    """Datetime columns and ISO date strings as epoch seconds; anything else unchanged.

    Unparseable values are left as they are so validation rejects them with their text.
    """
    if pd.api.types.is_datetime64_any_dtype(col):
        if getattr(col.dt, "tz", None) is not None:
            col = col.dt.tz_convert("UTC").dt.tz_localize(None)
        seconds = (col - pd.Timestamp(0)) // pd.Timedelta(seconds=1)
        return seconds.astype(object).where(col.notna(), None)
    if pd.api.types.is_numeric_dtype(col):
        return col
    values, absent = parse_numbers(col)
    not_number = np.isnan(values) & ~absent
    if not not_number.any():
        return col
    text = col.astype(str).str.strip()
    # Only strings with digits: pandas would read "today"/"now" as the current time.
    candidates = pd.Series(not_number, index=col.index) & text.str.contains(r"\d", regex=True)
    if not candidates.any():
        return col
    parsed = pd.to_datetime(text[candidates], format="ISO8601", errors="coerce", utc=True)
    good = parsed.notna()
    out = col.astype(object).copy()
    stamps = parsed[good].dt.tz_localize(None)
    out.loc[good[good].index] = ((stamps - pd.Timestamp(0)) // pd.Timedelta(seconds=1)).astype(object)
    return out


def _load(path: Path, parquet: bool, columns: list[str], rejects: Rejects) -> pd.DataFrame:
    if parquet:
        frame = pd.read_parquet(path, columns=columns)
        frame["_line"] = np.arange(1, len(frame) + 1)  # row number, 1-based
        return frame
    return read_delimited(path, rejects)


def _files(root: Path, parquet: bool) -> list[Path]:
    if root.is_file() or parquet:  # a parquet folder is one dataset
        return [root]
    files = sorted(root.glob("*.csv")) + sorted(root.glob("*.csv.gz"))
    if not files:
        raise DataSourceError(f"{root}: folder has no *.csv files; expected interactions CSV")
    return files


def read_items_table(cfg: DataConfig, rejects: Rejects) -> pd.DataFrame:
    """The item table at `cfg.items_path` (CSV or Parquet by suffix), canonical."""
    path = require_path(cfg.items_path, "an item table (CSV or Parquet) with an item id column")
    parquet = path.suffix == ".parquet" or path.is_dir()
    present = column_names(path, parquet)
    names = resolve_columns(cfg.columns, ITEM_KEYS, ("item_id",), present, path)
    frame = _load(path, parquet, list(names.values()), rejects)
    categories = frame[names["category"]] if "category" in names else pd.Series([None] * len(frame))
    items = pd.DataFrame(
        {
            "item_id": frame[names["item_id"]].to_numpy(dtype=object),
            "categories": [_split_category(v) for v in categories.to_numpy(dtype=object)],
            "brand": frame[names["brand"]].to_numpy(dtype=object) if "brand" in names else None,
            "title": frame[names["title"]].to_numpy(dtype=object) if "title" in names else None,
            "_line": frame["_line"].to_numpy(),
        }
    )
    return canonical_items(items, rejects, path.name)


def _split_category(value) -> list[str]:
    """A `|`-separated string or a list (Parquet list column) as a list of labels."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split("|") if part.strip()]
    return [str(v) for v in value]


def read_tabular(cfg: DataConfig) -> ReadResult:
    parquet = cfg.source == "parquet"
    kind = "Parquet" if parquet else "CSV"
    root = require_path(cfg.path, f"a {kind} file (or folder) of interactions")
    unknown = set(cfg.columns) - set(INTERACTION_KEYS) - set(ITEM_KEYS)
    if unknown:
        raise DataSourceError(
            f"data.columns has unknown keys {sorted(unknown)}; known: {list(INTERACTION_KEYS + ITEM_KEYS)}"
        )
    rejects, notes, parts = Rejects(), [], []
    for path in _files(root, parquet):
        present = column_names(path, parquet)
        names = resolve_columns(cfg.columns, INTERACTION_KEYS, ("user_id", "item_id"), present, path)
        frame = _load(path, parquet, list(names.values()), rejects)
        part = pd.DataFrame({key: frame[name] for key, name in names.items()})
        part["_line"], part["_source"] = frame["_line"].to_numpy(), path.name
        parts.append(part)
    raw = pd.concat(parts, ignore_index=True)
    if "rating" not in raw.columns:
        raw["rating"] = np.nan
        notes.append("no ratings: implicit feedback")
        scale = None
    else:
        scale = tuple(cfg.rating_scale) if cfg.rating_scale else DEFAULT_SCALE
        if not cfg.rating_scale:
            notes.append(f"rating scale {scale[0]:g}-{scale[1]:g} assumed (set data.rating_scale to change)")
    if "timestamp" not in raw.columns:
        # Row order is the only order there is: number each user's rows 0, 1, ...
        raw["timestamp"] = raw.groupby("user_id", sort=False).cumcount()
        notes.append("no timestamps: file row order used as timestamp")
    else:
        raw["timestamp"] = _datetimes_to_seconds(raw["timestamp"])
    items = read_items_table(cfg, rejects) if cfg.items_path else None
    return finish_read(raw, items, rejects, scale, notes, source=root.name, where=str(root))
