"""The training-step diagnosis (pagellm/eval/transitions.py): counts, steps, buckets, recall."""

import numpy as np
import torch

from pagellm.eval.transitions import item_counts, sample_steps, step_recall, training_steps

HISTORIES = [[0, 1, 2], [0, 1], [3, 4], [5, 0, 1]]


def test_counts_and_steps_come_from_the_rows_in_order():
    assert item_counts(HISTORIES, 7).tolist() == [3, 3, 1, 1, 1, 1, 0]
    steps = training_steps(HISTORIES)
    assert steps[(0, 1)] == 3 and steps[(1, 2)] == 1 and steps[(5, 0)] == 1
    assert (1, 0) not in steps  # a step has a direction
    assert sum(steps.values()) == sum(len(h) - 1 for h in HISTORIES)


def test_buckets_hold_only_steps_between_two_rare_or_two_common_items():
    count = item_counts(HISTORIES, 7)
    sample = sample_steps(training_steps(HISTORIES), count, rare=1)
    assert sorted(sample["rare"]) == [(3, 4)]  # 1->2 and 5->0 mix a rare and a common item
    assert sorted(sample["common"]) == [(0, 1)]
    # seeded: the same call draws the same sample; a cap draws without repeats
    rng = np.random.default_rng(1)
    many = [[int(a), int(b)] for a, b in rng.integers(0, 50, size=(400, 2))]
    count = item_counts(many, 50)
    first = sample_steps(training_steps(many), count, rare=int(np.median(count)), per_bucket=20)
    again = sample_steps(training_steps(many), count, rare=int(np.median(count)), per_bucket=20)
    assert first == again and all(len(v) == len(set(v)) == 20 for v in first.values())


def test_recall_excludes_the_history_item_and_counts_top_k_hits():
    scores = torch.tensor([[9.0, 1.0, 0.0, 2.0],   # from [0]: 0 excluded, top-1 is 3
                           [0.0, 9.0, 5.0, 1.0]])  # from [1]: 1 excluded, top-1 is 2
    assert step_recall(scores, [(0, 3), (1, 2)], k=1) == 1.0
    assert step_recall(scores, [(0, 1), (1, 3)], k=1) == 0.0
    assert step_recall(scores, [(0, 1), (1, 3)], k=2) == 1.0
    assert scores[0, 0] == 9.0  # the caller's scores are not overwritten
    assert step_recall(scores, []) == 0.0
