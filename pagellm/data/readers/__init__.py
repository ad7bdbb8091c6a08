"""File readers: each turns one kind of source into a validated `ReadResult`.

`read_source(cfg)` picks the reader from `cfg.source`. The simulator is not a file
source and has its own module.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pagellm.config import DataConfig
from pagellm.data.readers.amazon import read_amazon
from pagellm.data.readers.movielens import read_movielens
from pagellm.data.readers.sequence import read_sequence
from pagellm.data.readers.tabular import read_tabular
from pagellm.data.schema import ReadResult

READERS: dict[str, Callable[[DataConfig], ReadResult]] = {
    "amazon": read_amazon,
    "movielens": read_movielens,
    "sequence": read_sequence,
    "csv": read_tabular,
    "parquet": read_tabular,
}


def _is_sequence_folder(path: str | None) -> bool:
    folder = Path(path) if path else None
    if folder is None or not folder.is_dir() or not (folder / "sequential_data.txt").exists():
        return False
    return not any(folder.glob("*review*")) and not any(folder.glob("*.jsonl*"))


def read_source(cfg: DataConfig) -> ReadResult:
    """Read `cfg.path` with the reader for `cfg.source`; raises DataSourceError on bad input."""
    reader = READERS.get(cfg.source)
    if cfg.source == "amazon" and _is_sequence_folder(cfg.path):
        # Amazon data is also distributed in the P5 sequence form (e.g. Beauty 5-core):
        # a folder with sequential_data.txt and no review dump is read as a sequence.
        reader = read_sequence
    if reader is None:
        hint = " (the simulator generates its own data)" if cfg.source == "simulator" else ""
        raise ValueError(f"data.source={cfg.source!r} is not a file source{hint}; file readers: {sorted(READERS)}")
    return reader(cfg)


__all__ = ["READERS", "read_amazon", "read_movielens", "read_sequence", "read_source", "read_tabular"]
