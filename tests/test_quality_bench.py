"""bench/quality.py's arithmetic: mean ± sample std over seeds, and paired gains over SFT."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from quality import aggregate, mean_std, paired_gains, parse_variant  # noqa: E402


def test_mean_and_sample_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)


def test_paired_gains_compare_each_seed_with_its_own_sft():
    # Two worlds far apart (utility 1.0 vs 0.5): the stage-3 model gains +10 % on both, which
    # the unpaired means (0.825 vs 0.75, stds 0.39 and 0.35) would call "no change".
    per_seed = {0: {"models": {"sft": {"sim_utility": 1.0, "ndcg@10": 0.2}, "ppo": {"sim_utility": 1.1, "ndcg@10": 0.2},
                               "sasrec": {"sim_utility": 0.9}}},
                1: {"models": {"sft": {"sim_utility": 0.5, "ndcg@10": 0.4}, "ppo": {"sim_utility": 0.55, "ndcg@10": 0.3}}}}
    gains = aggregate(paired_gains(per_seed), ["sim_utility", "ndcg@10"])
    assert set(gains) == {"ppo"}  # baselines and SFT itself are not stage-3 rows
    assert gains["ppo"]["sim_utility"]["mean"] == pytest.approx(0.10)
    assert gains["ppo"]["sim_utility"]["std"] == pytest.approx(0.0, abs=1e-12)
    assert gains["ppo"]["ndcg@10"]["values"] == pytest.approx([0.0, -0.25])


def test_parse_variant():
    assert parse_variant("grpo=ppo.advantage=grpo ppo.samples_per_prompt=8") == (
        "grpo", ["ppo.advantage=grpo", "ppo.samples_per_prompt=8"])
    with pytest.raises(SystemExit):
        parse_variant("grpo")
