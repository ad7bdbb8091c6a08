"""Stage 3, `stage3.algorithm: dpo`: direct preference optimisation of the SFT policy on page
pairs, with the SFT policy as the frozen reference (Ray Train + DeepSpeed, like SFT).

    python -m jobs.dpo --run runs/demo [--set dpo.beta=0.2 --set dpo.on_policy=true]

Re-running after an interruption resumes from the last Ray Train checkpoint.
"""

from __future__ import annotations

from jobs.common import stage3_main
from pagellm.train.dpo import run_dpo_stage


def run(folder, cfg) -> dict:
    return run_dpo_stage(cfg, folder.root)


def main(argv: list[str] | None = None) -> None:
    stage3_main("dpo", __doc__, run, argv)


if __name__ == "__main__":
    main()
