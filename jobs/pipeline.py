"""The whole pipeline in one Ray session: data → sft → reward → ppo → eval (+ report).

    pagellm run --config configs/tiny.yaml --out runs/demo
    ray job submit --working-dir . --runtime-env-json '{"env_vars": {"PAGELLM_STORAGE": "/mnt/shared"}}' \
        -- python -m jobs.pipeline --run demo     # the run folder must be on shared storage

A stage whose output already exists in the run folder is skipped (delete the folder, or
pass --from STAGE, to redo it); an interrupted stage resumes from its own checkpoints.
"""

from __future__ import annotations

import importlib
import time

from jobs.common import open_run, ray_session, stage_parser

STAGES = ["data", "sft", "reward", "ppo", "eval"]


def is_done(folder, stage: str) -> bool:
    marker = {
        "data": folder.data / "stats.json",
        "sft": folder.sft / "metrics.json",
        "reward": folder.reward / "metrics.json",
        "ppo": folder.ppo / "DONE",
        "eval": folder.eval / "metrics.json",
    }[stage]
    return marker.exists()


def clear(folder, stage: str) -> None:
    """Remove a stage's outputs and its Ray Train runs, so a redo starts fresh instead of
    resuming a checkpoint trained on older inputs."""
    import shutil

    targets = {"data": [folder.data], "sft": [folder.sft, folder.root / "ray_train" / "sft",
                                             folder.root / "ray_train" / "sft_meta"],
               "reward": [folder.reward, folder.root / "ray_train" / "reward"], "ppo": [folder.ppo],
               "eval": [folder.eval]}[stage]
    for path in targets:
        shutil.rmtree(path, ignore_errors=True)


def wanted(cfg, stage: str) -> bool:
    if stage == "ppo":
        return cfg.ppo.enabled
    if stage == "reward":  # the reward model exists to drive PPO; a hits-only reward needs none
        return cfg.ppo.enabled and (cfg.ppo.model_reward_weight > 0 or cfg.ppo.prior_reward_weight > 0)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser("run", __doc__)
    parser.add_argument("--from", dest="start", choices=STAGES, default=None,
                        help="redo this stage and every later one even if their outputs exist")
    args = parser.parse_args(argv)
    folder, cfg = open_run(args)
    redo = STAGES[STAGES.index(args.start):] if args.start else []
    t0 = time.perf_counter()
    with ray_session():
        for stage in STAGES:
            if not wanted(cfg, stage):
                print(f"[run] {stage}: off in this config", flush=True)
                continue
            if is_done(folder, stage) and stage not in redo:
                print(f"[run] {stage}: already done in {folder.root}, skipping", flush=True)
                continue
            if stage in redo:
                clear(folder, stage)
            print(f"[run] {stage} ...", flush=True)
            t = time.perf_counter()
            importlib.import_module(f"jobs.{stage}").run(folder, cfg)
            print(f"[run] {stage} finished in {time.perf_counter() - t:.0f}s", flush=True)
    print(f"[run] all stages done in {time.perf_counter() - t0:.0f}s; report: {folder.eval / 'report.md'}", flush=True)


if __name__ == "__main__":
    main()
