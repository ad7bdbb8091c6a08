"""Evaluation: every policy of the run next to the baselines, on the same users and split.

    python -m jobs.eval --run runs/demo [--split val]

Writes <run>/eval/metrics.json, report.md and PNG plots.
"""

from __future__ import annotations

from jobs.common import open_run, stage_parser
from pagellm.eval.runner import run_eval_stage


def run(folder, cfg, split: str = "test") -> dict:
    return run_eval_stage(cfg, folder.root, split=split)


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser("eval", __doc__)
    parser.add_argument("--split", choices=["test", "val"], default="test")
    args = parser.parse_args(argv)
    folder, cfg = open_run(args)
    run(folder, cfg, args.split)  # single-process: no Ray needed for scoring


if __name__ == "__main__":
    main()
