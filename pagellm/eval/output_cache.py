"""What evaluation may reuse across runs that share data and models: a fitted SASRec's
weights and a policy's greedy lists, each stored under a key of everything that decides it.

Why: a stage-3 variant (bench/quality.py `run_variant`, bench/stage3_compare.py) copies its
seed's data and SFT policy and is evaluated on the same users; without this its evaluation
fits SASRec again and writes the SFT policy's lists again, ~20 of a Beauty variant's 28
minutes (docs/BENCHMARKS.md), to get the same numbers. The key is a hash of the inputs
themselves (the training sequences, parameters and seed; the policy's files, the prompts,
exclusions, list length and batch size), not of paths or run names, so a cache copied to
another run is used exactly when it would reproduce what is stored, and a changed input is
a miss that recomputes and stores anew. Metrics are always computed afresh from the lists.

Plain files in one folder beside the evaluation's (`<run>/eval_cache/`, so redoing the eval
stage, which clears `<run>/eval/`, keeps it: a stale entry cannot be read, its key no longer
matches): `<kind>-<key>.safetensors` (SASRec's state dict) and `<kind>-<key>.parquet`
(lists). Written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

CACHE_DIR = "eval_cache"  # in the run folder


def input_key(*parts: Any) -> str:
    """16 hex digits of a SHA-256 over JSON-serialisable parts (lists, dicts, numbers, str);
    dicts are hashed with sorted keys, so their order does not matter."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=_plain).encode())
        digest.update(b"\x00")
    return digest.hexdigest()[:16]


def _plain(value: Any):
    """JSON for numpy scalars and arrays, and sets (sorted), which json cannot write."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot key a {type(value).__name__}")


def files_key(directory: Path) -> str:
    """16 hex digits of a SHA-256 over every file directly in `directory` and in its
    `evaluator/` (relative names and bytes): a policy's weights, layout and tokenizer, and a
    guided policy's evaluator, which its pages depend on. Other folders (an RL run's
    checkpoints/) are not the published policy and are left out."""
    from pagellm.models.evaluator import EVALUATOR_DIR

    digest = hashlib.sha256()
    root = Path(directory)
    files = [p for p in root.iterdir() if p.is_file()]
    if (root / EVALUATOR_DIR).is_dir():
        files += [p for p in (root / EVALUATOR_DIR).iterdir() if p.is_file()]
    for path in sorted(files):
        digest.update(str(path.relative_to(root)).encode() + b"\x00")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


class OutputCache:
    """Lists and SASRec weights by key, in one folder (callers without a cache pass None)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def _path(self, kind: str, key: str, suffix: str) -> Path:
        return self.directory / f"{kind}-{key}{suffix}"

    def lists(self, kind: str, key: str) -> list[list[int]] | None:
        path = self._path(kind, key, ".parquet")
        if not path.exists():
            return None
        return [list(map(int, row)) for row in pq.read_table(path).column("items").to_pylist()]

    def put_lists(self, kind: str, key: str, lists: list[list[int]]) -> None:
        path = self._path(kind, key, ".parquet")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        pq.write_table(pa.table({"items": pa.array(lists, type=pa.list_(pa.int32()))}), tmp)
        tmp.replace(path)

    def state(self, kind: str, key: str) -> dict | None:
        path = self._path(kind, key, ".safetensors")
        if not path.exists():
            return None
        from safetensors.torch import load_file

        return load_file(path)

    def put_state(self, kind: str, key: str, state: dict) -> None:
        path = self._path(kind, key, ".safetensors")
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
        tmp.replace(path)
