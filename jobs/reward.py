"""Stage 3 of the pipeline: the two-headed reward model on preference pairs (Ray Train + DeepSpeed).

    python -m jobs.reward --run runs/demo [--set reward.heads=coarse --set reward.workers=2]

Needs <run>/data (pagellm data) and <run>/sft (pagellm sft). Re-running resumes from the
last Ray Train checkpoint of the run folder; <run>/reward/ gets the best epoch's weights,
metrics.json, report.md and accuracy_by_family.png.
"""

from __future__ import annotations

from jobs.common import stage_main
from pagellm.train.reward import run_reward_stage


def run(folder, cfg) -> dict:
    return run_reward_stage(cfg, folder.root)


def main(argv: list[str] | None = None) -> None:
    stage_main("reward", __doc__, run, argv)


if __name__ == "__main__":
    main()
