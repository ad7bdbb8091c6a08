"""The `pagellm` command: one subcommand per stage, plus `run` for the whole pipeline."""

from __future__ import annotations

import importlib
import sys

STAGES = {
    "run": ("jobs.pipeline", "every stage, then evaluation and the report"),
    "data": ("jobs.data", "build prompts, golden pages and pairs (Ray Data)"),
    "sft": ("jobs.sft", "supervised fine-tuning on golden pages (Ray Train + DeepSpeed)"),
    "reward": ("jobs.reward", "train the two-headed reward model"),
    "ppo": ("jobs.ppo", "stage 3, ppo or grpo: asynchronous RL against R_c + R_f"),
    "dpo": ("jobs.dpo", "stage 3, dpo: direct preference optimisation on page pairs"),
    "degre": ("jobs.degre", "stage 3, degre: evaluator-mined pages distilled into the policy"),
    "guided": ("jobs.guided", "stage 3, guided: the page prior's category term in the policy's decoding"),
    "eval": ("jobs.eval", "metrics, baselines, report and plots"),
    "serve": ("jobs.serve", "serve the policy with Ray Serve"),
}


def usage() -> str:
    lines = ["usage: pagellm <stage> --run RUN [--config FILE] [--set key=value ...] [--verbose]", "", "stages:"]
    lines += [f"  {name:<7} {desc}" for name, (_, desc) in STAGES.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        raise SystemExit(0 if argv else 2)
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"error: unknown stage {stage!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    importlib.import_module(STAGES[stage][0]).main(rest)


if __name__ == "__main__":
    main()
