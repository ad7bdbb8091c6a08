"""One helper shared by the stage-3 tests: a run folder with the data stage's output and an
untrained SFT policy, the starting point every stage-3 algorithm reads."""

from pagellm.config import load_config
from pagellm.data.pipeline import run_data_stage
from pagellm.models.policy import build_policy, save_policy
from pagellm.vocab import Vocab


def untrained_run(root, overrides: list[str]):
    cfg = load_config(None, overrides)
    run_data_stage(cfg, root / "data", log=lambda *_: None)
    model, tok, layout = build_policy(cfg.model, Vocab.from_parquet(root / "data" / "vocab.parquet"), seed=0)
    save_policy(model, tok, layout, root / "sft")
    (root / "sft" / "metrics.json").write_text("{}")  # as the SFT stage leaves it
    return root
