"""Stage 3, `stage3.algorithm: degre`: dense-supervised generative reranking. A lookahead
evaluator is fitted on the run's data, beam search under it mines pages from the SFT
policy's proposals, and the policy is distilled from them (Ray Train + DeepSpeed, like SFT).

    python -m jobs.degre --run runs/demo [--set degre.beam=16]

Re-running after an interruption reuses the fitted evaluator and mined pages and resumes
the distillation from its last Ray Train checkpoint.
"""

from __future__ import annotations

from jobs.common import stage3_main
from pagellm.train.degre import run_degre_stage


def run(folder, cfg) -> dict:
    return run_degre_stage(cfg, folder.root)


def main(argv: list[str] | None = None) -> None:
    stage3_main("degre", __doc__, run, argv)


if __name__ == "__main__":
    main()
