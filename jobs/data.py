"""Stage 1: ratings → prompts, golden pages and preference pairs (Ray Data).

    python -m jobs.data --run runs/demo [--config configs/tiny.yaml] [--set data.split=random]
"""

from __future__ import annotations

from jobs.common import stage_main
from pagellm.data.pipeline import run_data_stage


def run(folder, cfg) -> dict:
    return run_data_stage(cfg, folder.data)


def main(argv: list[str] | None = None) -> None:
    stage_main("data", __doc__, run, argv)


if __name__ == "__main__":
    main()
