"""Stage 3, `stage3.algorithm: guided`: reward terms written into the SFT policy's decoding
(pagellm/train/guided.py): an independently fitted SASRec's item scores at the weight that
raises validation accuracy, and the page prior's category discount as far as validation
accuracy allows. Needs the reward stage's page prior; trains nothing but the evaluator.

    python -m jobs.guided --run runs/demo [--set guided.margin=0.02] [--set guided.evaluator=none]
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
