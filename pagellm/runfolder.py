"""Where each stage reads and writes inside a run folder (docs/ARCHITECTURE.md §2)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pagellm.config import Config, load_config, save_config


@dataclass(frozen=True)
class RunFolder:
    root: Path

    def _stage(name: str) -> property:  # noqa: N805 - a class-body helper, not a method
        return property(lambda self: self.root / name, doc=f"<run>/{name}")

    config = property(lambda self: self.root / "config.yaml", doc="<run>/config.yaml")
    data, sft, reward, ppo, eval = _stage("data"), _stage("sft"), _stage("reward"), _stage("ppo"), _stage("eval")
    del _stage

    def require(self, stage_dir: Path, what: str, hint: str) -> Path:
        if not stage_dir.exists():
            raise FileNotFoundError(f"{what} not found at {stage_dir}: run `{hint}` first")
        return stage_dir


def resolve_run(run: str | Path, config_path: str | None, overrides: list[str]) -> tuple[RunFolder, Config]:
    """Open or create a run folder and its resolved config.

    A new run takes --config (default tiny.yaml); an existing run reuses its saved
    config.yaml unless --config is given again. Overrides always apply and the
    resolved config is saved back, so the folder says exactly what ran.
    """
    folder = RunFolder(Path(run))
    if config_path is None and folder.config.exists():
        cfg = load_config(folder.config, overrides)
    else:
        cfg = load_config(config_path, overrides)
    cfg.run_dir = str(folder.root)
    folder.root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, folder.config)
    return folder, cfg


def publish_dir(src: Path, dest: Path) -> None:
    """Copy a finished checkpoint directory to its stage folder atomically: readers (eval,
    serve, the next stage) see the old folder or the new one, never half of one."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_jsonable))
    tmp.replace(path)  # atomic: a reader never sees half a file


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj)}")
