"""Stage 3, `stage3.algorithm: dpo`: direct preference optimisation of the SFT policy on page
pairs, with the SFT policy as the frozen reference (Ray Train + DeepSpeed, like SFT).

    python -m jobs.dpo --run runs/demo [--set dpo.beta=0.2 --set dpo.on_policy=true]

Re-running after an interruption resumes from the last Ray Train checkpoint.
"""

from __future__ import annotations

import sys

from jobs.common import stage_main
from pagellm.train.dpo import run_dpo_stage


def run(folder, cfg) -> dict:
    return run_dpo_stage(cfg, folder.root)


def main(argv: list[str] | None = None) -> None:
    # The subcommand names the algorithm: the run folder's config records it.
    argv = list(sys.argv[1:] if argv is None else argv)
    stage_main("dpo", __doc__, run, [*argv, "--set", "stage3.algorithm=dpo"])


if __name__ == "__main__":
    main()
