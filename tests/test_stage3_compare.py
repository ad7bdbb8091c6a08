"""bench/stage3_compare.py's table and verdicts on synthetic per-seed results (no pipeline runs)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from stage3_compare import (algorithm_of, best_line, done_facts, paired_table, paired_users,  # noqa: E402
                            share_reward, summarise, variant_name, verdict)


def _seed(sft: float, ppo: float, dpo: float, hr_sft: float, hr_ppo: float, hr_dpo: float) -> dict:
    return {"models": {
        "sft": {"sim_utility": sft, "hr@10": hr_sft, "hr@10%": 0.2},
        "ppo": {"sim_utility": ppo, "hr@10": hr_ppo, "hr@10%": 0.3, "kl": 0.1, "stage_seconds": 100.0,
                "pages_generated": 1000, "pages_per_s": 10.0, "published_step": 30},
        "dpo": {"sim_utility": dpo, "hr@10": hr_dpo, "stage_seconds": 50.0, "published_step": 2}}}


# Two worlds far apart. sim_utility: PPO +10 % and +12 % over its own seed's SFT (mean 0.11,
# std 0.014: beats SFT); DPO +1 % and -1 % (mean 0, std 0.014: no change). hr@10: PPO -20 %
# and -10 % (mean -0.15, std 0.071: worse); DPO +5 % and -5 %: no change.
PER_SEED = {0: _seed(1.0, 1.10, 1.01, 0.5, 0.4, 0.525), 1: _seed(0.5, 0.56, 0.495, 0.2, 0.18, 0.19)}


def test_verdict_needs_more_than_one_std_and_two_seeds():
    assert verdict({"mean": 0.11, "std": 0.014, "n": 2}) == "beats SFT"
    assert verdict({"mean": -0.15, "std": 0.07, "n": 2}) == "worse"
    assert verdict({"mean": 0.05, "std": 0.07, "n": 3}) == "no change"
    assert verdict({"mean": 0.0, "std": 0.0, "n": 2}) == "no change"
    assert verdict({"mean": 0.5, "std": 0.0, "n": 1}) == "1 seed"
    assert verdict(None) == "–"


def test_summary_rows_gains_best_and_verdicts():
    text, table, gains = summarise(PER_SEED, ["ppo", "dpo"], "synthetic")
    assert set(table) == {"sft", "ppo", "dpo"}
    assert table["ppo"]["sim_utility"]["mean"] == pytest.approx(0.83)
    assert gains["ppo"]["sim_utility"]["mean"] == pytest.approx(0.11)
    assert gains["dpo"]["hr@10"]["values"] == pytest.approx([0.05, -0.05])
    first_table = text.split("\n### ")[0]
    rows = {line.split("|")[1].strip(): line for line in first_table.splitlines() if line.startswith("| ")}
    assert "| ppo | beats SFT | worse |" in text and "| dpo | no change | no change |" in text
    assert "– |" in rows["dpo"]  # no kl, no pages: a dash, not a number
    assert "**" not in rows["ppo"].split("|")[7]  # stage_seconds is a fact, never bolded as best
    assert "Best algorithm on sim_utility: ppo (0.8300" in text and "hr@10: dpo (0.3575" in text


def test_best_line_skips_a_metric_no_algorithm_has():
    table = {"ppo": {"hr@10": {"mean": 0.3, "std": 0.01}}}
    assert best_line(table, ["ppo"]) == "Best algorithm on hr@10: ppo (0.3000 ± 0.0100)."
    tied = {name: {"hr@10": {"mean": 0.07, "std": 0.0, "n": 1}} for name in ("ppo", "dpo")}
    assert best_line(tied, ["ppo", "dpo"]) == "Best algorithm on hr@10: tie between ppo, dpo (0.0700 ± 0.0000)."
    # Level with SFT (DeGRe published the SFT policy in every seed) is not "best".
    level = {"sft": {"hr@10": {"mean": 0.12, "std": 0.002}}, "degre": {"hr@10": {"mean": 0.12, "std": 0.002}},
             "dpo": {"hr@10": {"mean": 0.119, "std": 0.001}}}
    assert best_line(level, ["dpo", "degre"]) == "Best algorithm on hr@10: none above SFT (0.1200; best degre, 0.1200)."


def test_done_facts_rate_and_optional_kl(tmp_path):
    (tmp_path / "DONE").write_text(json.dumps({"seconds": 40.0, "pages_generated": 2000, "published_step": 3}))
    assert done_facts(tmp_path) == {"stage_seconds": 40.0, "pages_generated": 2000, "pages_per_s": 50.0}
    (tmp_path / "DONE").write_text(json.dumps({"seconds": 40.0, "kl": 0.2}))
    assert done_facts(tmp_path) == {"stage_seconds": 40.0, "kl": 0.2}


def test_the_first_trained_reward_model_is_shared(tmp_path):
    seed, variant = tmp_path / "seed0", tmp_path / "seed0" / "variants" / "ppo"
    (variant / "reward").mkdir(parents=True)
    (variant / "reward" / "metrics.json").write_text("{}")
    share_reward(seed, variant)
    assert (seed / "reward" / "metrics.json").exists()
    (variant / "reward" / "metrics.json").write_text('{"other": 1}')
    share_reward(seed, variant)  # the seed keeps the one it has
    assert (seed / "reward" / "metrics.json").read_text() == "{}"


def test_paired_users_pools_discordant_users_over_seeds(tmp_path):
    """Seed 0: the algorithm alone hits users 1 and 2, SFT alone user 3; seed 1: the algorithm
    alone hits user 5. Pooled 3 vs 1; a seed evaluated without per-user rows is left out."""
    import pandas as pd

    def rows(seed, ppo_hits, sft_hits):
        folder = tmp_path / f"seed{seed}" / "variants" / "ppo" / "eval"
        folder.mkdir(parents=True)
        users = list(range(len(ppo_hits)))
        frame = pd.DataFrame({"model": ["ppo"] * len(users) + ["sft"] * len(users), "user_index": users[::-1] + users,
                              "hr@10": ppo_hits[::-1] + sft_hits})
        if seed == 0:  # a simulator run: per-user utility above SFT by 3, 2, 1, 2, 1 (users 0-4)
            frame["sim_utility"] = [3.0, 2.0, 1.0, 3.0, 2.0][::-1] + [0.0, 0.0, 0.0, 1.0, 1.0]
        frame.to_parquet(folder / "per_user.parquet")

    rows(0, [1, 1, 1, 0, 0], [1, 0, 0, 1, 0])
    rows(1, [0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0])
    (tmp_path / "seed2" / "variants" / "ppo" / "eval").mkdir(parents=True)
    paired = paired_users([tmp_path / f"seed{s}" for s in range(3)], ["ppo", "dpo"])
    assert set(paired) == {"ppo"}  # dpo has no per-user rows anywhere
    hr = paired["ppo"]["hr@10"]
    assert hr["only_a"] == 3 and hr["only_b"] == 1 and hr["seeds"] == 2
    assert hr["p_value"] == pytest.approx(10 / 16)  # P(|X - 2| >= 1), X ~ Bin(4, 1/2)
    util = paired["ppo"]["sim_utility"]  # seed 0 alone holds it; users aligned by index
    assert util["seeds"] == 1 and util["users"] == 5
    assert util["mean_diff"] == pytest.approx((1 + 2 + 3 + 2 + 1) / 5)
    table = paired_table(paired)
    assert "| ppo | 3 | 1 | 0.625 | +1.8000 ± 0.3742 |" in table and table.rstrip().endswith("| 2 |")
    assert paired_table({}) == ""


def test_a_labelled_entry_reads_its_own_folder_and_its_algorithm_rows(tmp_path):
    """`degre:prior` runs stage3.algorithm=degre in variants/degre-prior; its per-user rows
    are eval's `degre` rows there, not the plain `degre` entry's."""
    import pandas as pd

    assert algorithm_of("degre:prior") == "degre" and variant_name("degre:prior") == "degre-prior"
    assert algorithm_of("dpo") == "dpo" == variant_name("dpo")
    for folder, hits in (("degre", [0, 0]), ("degre-prior", [1, 1])):
        path = tmp_path / "seed0" / "variants" / folder / "eval"
        path.mkdir(parents=True)
        pd.DataFrame({"model": ["degre", "degre", "sft", "sft"], "user_index": [0, 1, 0, 1],
                      "hr@10": hits + [0, 0]}).to_parquet(path / "per_user.parquet")
    paired = paired_users([tmp_path / "seed0"], ["degre", "degre:prior"])
    assert paired["degre"]["hr@10"]["only_a"] == 0 and paired["degre:prior"]["hr@10"]["only_a"] == 2
