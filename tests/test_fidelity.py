"""Reward fidelity arithmetic, by hand (pagellm/eval/fidelity.py)."""

import numpy as np
import pytest

from pagellm.eval.fidelity import best_of, fidelity_block, share_above, within_user_spearman


def test_within_user_spearman_by_hand_and_skips_ties():
    truth = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    scores = np.array([[10.0, 20.0, 30.0],  # same order: +1
                       [1.0, 2.0, 3.0],  # reversed: -1
                       [2.0, 1.0, 3.0],  # ranks (2,1,3) vs (1,2,3): 1 - 6*2/(3*8) = 0.5
                       [1.0, 2.0, 3.0]])  # truth all tied: skipped
    rho, skipped = within_user_spearman(scores, truth)
    assert skipped == 1
    assert rho == pytest.approx((1.0 - 1.0 + 0.5) / 3)
    # Only one user per side of the mean is not a pooled correlation: pooled over these two
    # users (1..3 vs 4..6 on both sides) would be +1, the within-user one is 0.
    rho, _ = within_user_spearman(np.array([[1.0, 2.0, 3.0], [6.0, 5.0, 4.0]]),
                                  np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    assert rho == pytest.approx(0.0)
    assert within_user_spearman(np.ones((2, 3)), np.ones((2, 3))) == (None, 2)
    with pytest.raises(ValueError, match="at least 2 samples"):
        within_user_spearman(np.ones((2, 1)), np.ones((2, 1)))


def test_share_above_and_best_of():
    assert share_above(np.array([2.0, 1.0, 3.0, 1.0]), np.array([1.0, 1.0, 4.0, 0.0])) == 0.5  # ties do not count
    truth = np.array([[0.1, 0.9, 0.5], [0.7, 0.2, 0.3]])
    scores = np.array([[3.0, 1.0, 2.0], [5.0, 5.0, 1.0]])  # picks 0.1 and (first of a tie) 0.7
    assert best_of(scores, truth) == pytest.approx(0.4)
    assert best_of(truth, truth) == pytest.approx(0.8)


def test_fidelity_block_reports_every_signal():
    truth = np.array([[1.0, 2.0], [2.0, 1.0]])
    block = fidelity_block({"R": np.array([[1.0, 2.0], [1.0, 2.0]])}, truth,
                           greedy={"R": np.array([5.0, 1.0])}, oracle={"R": np.array([4.0, 2.0])},
                           greedy_truth=np.array([1.0, 1.0]), oracle_truth=np.array([2.0, 2.0]))
    assert block["spearman/R"] == pytest.approx(0.0)  # +1 for user 0, -1 for user 1
    assert block["oracle_above_greedy/R"] == 0.5 and block["oracle_above_greedy/truth"] == 1.0
    assert block["best_of_S/R"] == pytest.approx(1.5) and block["best_of_S/truth"] == 2.0
    assert block["sampled_mean"] == 1.5 and block["users"] == 2 and block["samples_per_user"] == 2
