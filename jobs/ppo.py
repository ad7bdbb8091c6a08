"""Stage 4: asynchronous PPO of the SFT policy against R = R_c + R_f (rollout, reward and
learner Ray actors).

    python -m jobs.ppo --run runs/demo [--set ppo.max_staleness=0]   # 0 = synchronous

Re-running after an interruption resumes from the last learner checkpoint.
"""

from __future__ import annotations

from actors.orchestrator import run_ppo_stage
from jobs.common import stage_main


def run(folder, cfg) -> dict:
    return run_ppo_stage(cfg, folder.root)


def main(argv: list[str] | None = None) -> None:
    stage_main("ppo", __doc__, run, argv)


if __name__ == "__main__":
    main()
