"""Stage 2 of the pipeline: supervised fine-tuning on golden pages (Ray Train + DeepSpeed).

    python -m jobs.sft --run runs/demo [--set sft.workers=2 --set sft.zero_stage=2]

Re-running resumes from the last Ray Train checkpoint of the run folder.
"""

from __future__ import annotations

from jobs.common import stage_main
from pagellm.train.sft import run_sft_stage


def run(folder, cfg) -> dict:
    return run_sft_stage(cfg, folder.root)


def main(argv: list[str] | None = None) -> None:
    stage_main("sft", __doc__, run, argv)


if __name__ == "__main__":
    main()
