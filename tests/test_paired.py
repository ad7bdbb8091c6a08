"""The per-user paired comparison (pagellm/eval/paired.py), by hand."""

import pytest

from pagellm.eval.paired import discordant, mcnemar


def test_discordant_counts_only_users_whose_outcome_differs():
    a = [1, 1, 0, 0, 1, 0]
    b = [1, 0, 1, 0, 0, 0]
    assert discordant(a, b) == (2, 1)
    with pytest.raises(ValueError, match="different lengths"):
        discordant([1, 0], [1])
    with pytest.raises(ValueError, match="0 or 1"):
        discordant([0.5], [1])


def test_mcnemar_exact_p_by_hand():
    # 8 vs 2 discordant users: P(X <= 2 or X >= 8), X ~ Bin(10, 1/2) = 2 (1 + 10 + 45) / 1024.
    assert mcnemar(8, 2)["p_value"] == pytest.approx(112 / 1024)
    # 46 vs 44 is a coin flip.
    assert mcnemar(46, 44)["p_value"] > 0.9
    assert mcnemar(0, 0) == {"only_a": 0, "only_b": 0, "p_value": 1.0}
    assert mcnemar(5, 0)["p_value"] == pytest.approx(2 / 32)


def test_paired_difference_by_hand():
    from pagellm.eval.paired import paired_difference

    # Differences 1, 2, 3: mean 2, sd 1, se 1/sqrt(3), t = 2 sqrt(3) on 2 degrees of freedom.
    r = paired_difference([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    assert r["mean_diff"] == pytest.approx(2.0) and r["se"] == pytest.approx(1 / 3 ** 0.5) and r["users"] == 3
    t = 2 * 3 ** 0.5
    assert r["p_value"] == pytest.approx(1 - t / (t * t + 2) ** 0.5)  # two-sided, t with 2 df
    assert paired_difference([1.0, 1.0], [1.0, 1.0])["p_value"] == 1.0
    with pytest.raises(ValueError, match="at least 2"):
        paired_difference([1.0], [0.0])
