"""The per-user split and k-core, on hand-made frames."""

import numpy as np
import pandas as pd

from pagellm.data.split import assign_split, kcore


def frame(ratings_by_user):
    rows = []
    for u, ratings in ratings_by_user.items():
        for t, r in enumerate(ratings):
            rows.append((u, f"i{u}{t}", r, 1000 + t))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])


def test_chrono_split_ten_positives():
    df, dropped = assign_split(frame({"a": [5.0] * 10}), "chrono", (0.8, 0.1, 0.1), 3.0, seed=0)
    assert df["split"].tolist() == [0] * 8 + [1, 2] and not dropped


def test_boundaries_move_to_positives_and_users_without_are_dropped():
    # Last two ratings are negative: test and val shift back to the last positives.
    df, _ = assign_split(frame({"a": [5, 5, 5, 5, 5, 5, 5, 5, 1, 1]}), "chrono", (0.8, 0.1, 0.1), 3.0, seed=0)
    assert df["split"].tolist() == [0] * 6 + [1, 2, 2, 2]
    assert df.loc[df["split"] == 1, "pos"].all()
    df, dropped = assign_split(frame({"b": [5, 1, 1, 1], "c": [1, 1, 1, 1]}), "chrono", (0.8, 0.1, 0.1), 3.0, 0)
    assert df.empty and dropped == {"no_positive_for_test": 1, "no_positive_for_val": 1}


def test_leave_one_out_and_implicit():
    df, _ = assign_split(frame({"a": [np.nan] * 6}), "leave_one_out", (0.8, 0.1, 0.1), 3.0, seed=0)
    assert df["split"].tolist() == [0, 0, 0, 0, 1, 2]


def test_random_split_is_seeded_and_keeps_proportions():
    f = frame({"a": [5.0] * 20})
    a, _ = assign_split(f, "random", (0.8, 0.1, 0.1), 3.0, seed=1)
    b, _ = assign_split(f.sample(frac=1, random_state=3), "random", (0.8, 0.1, 0.1), 3.0, seed=1)
    c, _ = assign_split(f, "random", (0.8, 0.1, 0.1), 3.0, seed=2)
    assert a[["item_id", "split"]].equals(b[["item_id", "split"]])  # row order does not matter
    assert not a["item_id"].equals(c["item_id"])
    assert (a["split"] == 0).sum() == 16


def test_kcore_iterates_to_a_fixed_point():
    df = pd.DataFrame({"user_id": ["u1", "u1", "u2", "u2", "u3"], "item_id": ["a", "b", "a", "b", "a"],
                       "rating": 5.0, "timestamp": range(5)})
    out, removed = kcore(df, 2)
    assert set(out["user_id"]) == {"u1", "u2"} and removed == 1
