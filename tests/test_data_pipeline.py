"""Stage 1 end to end on a small simulator world, through Ray Data."""

import json

import pandas as pd
import pytest

from pagellm.config import ConfigError, load_config
from pagellm.data.pipeline import run_data_stage

SMALL = ["data.simulator.users=60", "data.simulator.items=80", "data.simulator.categories=5",
         "data.simulator.interactions_per_user=30"]


@pytest.fixture(scope="module")
def built(ray_local, tmp_path_factory):
    cfg = load_config(None, SMALL)
    out = tmp_path_factory.mktemp("run") / "data"
    stats = run_data_stage(cfg, out, log=lambda *_: None)
    return cfg, out, stats


def test_stats_have_design_keys_and_every_family(built):
    _, out, stats = built
    saved = json.loads((out / "stats.json").read_text())
    for key in ("users", "items", "interactions", "positives", "rejected", "split", "sft_rows", "pairs"):
        assert key in saved
    assert set(saved["split"]) == {"train", "val", "test"}
    assert all(saved["pairs"][f] > 0 for f in ("preference", "ranking", "diversity", "redundancy"))
    assert saved["sft_rows"] == len(pd.read_parquet(out / "sft.parquet"))


def test_no_val_or_test_item_in_any_training_row(built):
    _, out, _ = built
    inter = pd.read_parquet(out / "interactions.parquet")
    held = inter[inter["split"] != "train"].groupby("user_index")["item_index"].agg(set)
    sft = pd.read_parquet(out / "sft.parquet")
    pairs = pd.read_parquet(out / "pairs.parquet")
    checked = 0
    for df, cols in ((sft, ["prompt", "target"]), (pairs, ["prompt", "chosen", "rejected"])):
        for row in df.itertuples():
            bad = held.get(row.user_index, set())
            for col in cols:
                assert not bad & set(getattr(row, col)), (col, row.user_index)
                checked += 1
    assert checked > 500


def test_training_targets_are_training_positives_and_pages_valid(built):
    cfg, out, _ = built
    inter = pd.read_parquet(out / "interactions.parquet")
    train_pos = inter[(inter["split"] == "train") & (inter["rating"] > 3)].groupby("user_index")["item_index"].agg(set)
    sft = pd.read_parquet(out / "sft.parquet")
    for row in sft.itertuples():
        assert set(row.target) <= train_pos[row.user_index]
        assert not set(row.prompt) & set(row.target)  # the page holds unseen items only
        assert len(set(row.target)) == len(row.target) <= cfg.data.page_len
    pairs = pd.read_parquet(out / "pairs.parquet")
    same_set = pairs[pairs["family"].isin(["ranking", "redundancy"])]
    assert all(sorted(r.chosen) == sorted(r.rejected) and list(r.chosen) != list(r.rejected)
               for r in same_set.itertuples())


def test_same_seed_same_files(built, tmp_path):
    cfg, out, _ = built
    again = tmp_path / "data"
    run_data_stage(cfg, again, log=lambda *_: None)
    for name in ("vocab", "sft", "pairs", "eval", "items"):
        assert pd.read_parquet(out / f"{name}.parquet").equals(pd.read_parquet(again / f"{name}.parquet")), name


def test_wrong_config_fails_before_work():
    with pytest.raises(ConfigError, match="data.simulator.userz"):
        load_config(None, ["data.simulator.userz=3"])
    with pytest.raises(ConfigError, match="data.split"):
        load_config(None, ["data.split=weekly"])
    with pytest.raises(ConfigError, match="data.path is required"):
        load_config(None, ["data.source=movielens"])
