"""File readers: each turns one kind of source into a validated `ReadResult`.

`read_source(cfg)` picks the reader from `cfg.source`. The simulator is not a file
source and has its own module.
"""

from __future__ import annotations

from collections.abc import Callable

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


def read_source(cfg: DataConfig) -> ReadResult:
    """Read `cfg.path` with the reader for `cfg.source`; raises DataSourceError on bad input."""
    reader = READERS.get(cfg.source)
    if reader is None:
        hint = " (the simulator generates its own data)" if cfg.source == "simulator" else ""
        raise ValueError(f"data.source={cfg.source!r} is not a file source{hint}; file readers: {sorted(READERS)}")
    return reader(cfg)


__all__ = ["READERS", "read_amazon", "read_movielens", "read_sequence", "read_source", "read_tabular"]
