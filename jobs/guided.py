"""Stage 3, `stage3.algorithm: guided`: the page prior's category term written into the SFT
policy's decoding, the largest repeat penalty validation accuracy allows
(pagellm/train/guided.py). Needs the reward stage's page prior; trains nothing.

    python -m jobs.guided --run runs/demo [--set guided.margin=0.02]
"""

from __future__ import annotations

from jobs.common import stage3_main
from pagellm.train.guided import run_guided_stage


def run(folder, cfg) -> dict:
    return run_guided_stage(cfg, folder.root)


def main(argv: list[str] | None = None) -> None:
    stage3_main("guided", __doc__, run, argv)


if __name__ == "__main__":
    main()
