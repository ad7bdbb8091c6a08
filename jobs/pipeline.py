"""The whole pipeline in one Ray session: data → sft → reward → stage 3 → eval (+ report).

Stage 3 is `stage3.algorithm`: ppo, grpo, dpo, degre or guided (or none).

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

STAGES = ["data", "sft", "reward", "stage3", "eval"]
# The module that runs stage 3 for each `stage3.algorithm` (ppo and grpo share the RL loop).
STAGE3_JOBS = {"ppo": "ppo", "grpo": "ppo", "dpo": "dpo", "degre": "degre", "guided": "guided"}


def stage_dir(folder, cfg, stage: str):
    """Where a stage writes: stage 3 writes <run>/<algorithm>/."""
    return folder.root / (cfg.stage3.algorithm if stage == "stage3" else stage)


def is_done(folder, cfg, stage: str) -> bool:
    marker = "DONE" if stage == "stage3" else ("stats.json" if stage == "data" else "metrics.json")
    return (stage_dir(folder, cfg, stage) / marker).exists()


def clear(folder, cfg, stage: str) -> None:
    """Remove a stage's outputs and its Ray Train runs, so a redo starts fresh instead of
    resuming a checkpoint trained on older inputs."""
    import shutil

    train_runs = {"sft": ["sft", "sft_meta"], "reward": ["reward"],
                  "stage3": {"dpo": ["dpo"], "degre": ["degre"]}.get(cfg.stage3.algorithm, [])}.get(stage, [])
    for path in [stage_dir(folder, cfg, stage), *(folder.root / "ray_train" / name for name in train_runs)]:
        shutil.rmtree(path, ignore_errors=True)


def wanted(cfg, stage: str) -> bool:
    if stage == "stage3":
        return cfg.stage3.algorithm != "none"
    if stage == "reward":  # the reward model exists to drive stage 3; a hits-only reward needs none
        return cfg.uses_reward_model()
    return True


def stage_module(cfg, stage: str) -> str:
    return f"jobs.{STAGE3_JOBS[cfg.stage3.algorithm] if stage == 'stage3' else stage}"


def warn_saved_policy(sft_dir, cfg) -> None:
    """Say which model fields the existing SFT policy keeps against the config: they are
    fixed when the policy is built, so every later stage reads the saved values."""
    from pagellm.models.policy import layout_mismatches
    from pagellm.vocab import TokenLayout

    for line in layout_mismatches(TokenLayout.load(sft_dir), cfg.model):
        print(f"[run] warning: {line}; later stages use the saved value (--from sft rebuilds it)", flush=True)


def check_catalogue(folder, cfg) -> None:
    """Once the catalogue is known, before any training: a baseline that cannot fit it (EASE's
    n_items^2 inverse) fails now, not in the evaluation hours later."""
    import json

    from pagellm.eval.baselines.ease import check_catalogue as ease_fits

    if "ease" in cfg.eval.baselines or (cfg.stage3.algorithm == "guided" and "ease" in cfg.guided.evaluator):
        ease_fits(int(json.loads((folder.data / "stats.json").read_text())["items"]), cfg.eval.ease)


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser("run", __doc__)
    parser.add_argument("--from", dest="start", choices=STAGES + list(STAGE3_JOBS), default=None,
                        help="redo this stage and every later one even if their outputs exist "
                             "(an algorithm's name means stage3)")
    args = parser.parse_args(argv)
    folder, cfg = open_run(args)
    start = "stage3" if args.start in STAGE3_JOBS else args.start
    redo = STAGES[STAGES.index(start):] if start else []
    t0 = time.perf_counter()
    with ray_session():
        for stage in STAGES:
            if not wanted(cfg, stage):
                print(f"[run] {stage}: off in this config", flush=True)
                continue
            if is_done(folder, cfg, stage) and stage not in redo:
                print(f"[run] {stage}: already done in {folder.root}, skipping", flush=True)
                if stage == "data":
                    check_catalogue(folder, cfg)
                if stage == "sft":
                    warn_saved_policy(stage_dir(folder, cfg, stage), cfg)
                continue
            if stage in redo:
                clear(folder, cfg, stage)
            name = cfg.stage3.algorithm if stage == "stage3" else stage
            print(f"[run] {name} ...", flush=True)
            t = time.perf_counter()
            importlib.import_module(stage_module(cfg, stage)).run(folder, cfg)
            print(f"[run] {name} finished in {time.perf_counter() - t:.0f}s", flush=True)
            if stage == "data":
                check_catalogue(folder, cfg)
    print(f"[run] all stages done in {time.perf_counter() - t0:.0f}s; report: {folder.eval / 'report.md'}", flush=True)


if __name__ == "__main__":
    main()
