"""k-core filtering and the per-user train/val/test split, vectorised with pandas.

Both are global-by-user operations on at most a few million rows, so they run as
column arithmetic in one process (about a second at 10^6 rows) rather than as a
per-user Python function.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def is_positive(ratings: pd.Series, threshold: float) -> pd.Series:
    """rating > threshold; implicit feedback (NaN rating) is always positive."""
    return ratings.isna() | (ratings > threshold)


def kcore(df: pd.DataFrame, k: int) -> tuple[pd.DataFrame, int]:
    """Drop users and items with fewer than k interactions until none are left.

    Returns the filtered frame and how many rows were removed (reported in stats,
    never silent).
    """
    if k <= 1:
        return df, 0
    before = len(df)
    while True:
        user_n = df.groupby("user_id")["item_id"].transform("size")
        item_n = df.groupby("item_id")["user_id"].transform("size")
        keep = (user_n >= k) & (item_n >= k)
        if keep.all():
            return df, before - len(df)
        df = df[keep]


def assign_split(
    df: pd.DataFrame,
    method: str,
    ratios: tuple[float, float, float],
    positive_threshold: float,
    seed: int,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Label each row train/val/test per user; every kept user has a positive in val and test.

    chrono: time order; random: a seeded per-user shuffle; leave_one_out: the last
    positive is test, the one before it val. Boundaries move earlier when needed so
    val and test each start at a positive; users for whom that is impossible (fewer
    than three positives, or nothing left for train) are dropped and counted.
    Returns the frame (sorted by user, order) with `split` and `pos` columns.
    """
    df = df.copy()
    if method == "random":
        # A hash of (seed, user, item) is a fixed shuffle that does not depend on row order.
        key = pd.util.hash_pandas_object(df[["user_id", "item_id"]], index=False).to_numpy()
        df["_order"] = (key ^ np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)).astype(np.uint64)
    else:
        df["_order"] = df["timestamp"]
    df = df.sort_values(["user_id", "_order", "item_id"], kind="stable").reset_index(drop=True)
    df["pos"] = is_positive(df["rating"], positive_threshold)
    user = df["user_id"]
    rank = df.groupby(user, sort=False).cumcount().to_numpy()
    n = df.groupby(user, sort=False)["item_id"].transform("size").to_numpy()
    pos = df["pos"].to_numpy()

    if method == "leave_one_out":
        test_target = n - 1
        val_target = n - 1
    else:
        test_target = np.minimum(np.floor((ratios[0] + ratios[1]) * n).astype(int), n - 1)
        val_target = np.minimum(np.floor(ratios[0] * n).astype(int), test_target - 1)

    # Test starts at the last positive at or before its target position.
    cand = np.where(pos & (rank <= test_target), rank, -1)
    test_start = pd.Series(cand).groupby(user.to_numpy(), sort=False).transform("max").to_numpy()
    # Val starts at the last positive strictly before test and at or before its target.
    cand = np.where(pos & (rank < test_start) & (rank <= val_target), rank, -1)
    val_start = pd.Series(cand).groupby(user.to_numpy(), sort=False).transform("max").to_numpy()

    no_test = test_start < 0
    no_val = ~no_test & (val_start < 0)
    no_train = ~no_test & ~no_val & (val_start == 0)
    dropped_rows = no_test | no_val | no_train
    dropped = {
        "no_positive_for_test": int(df.loc[no_test, "user_id"].nunique()),
        "no_positive_for_val": int(df.loc[no_val, "user_id"].nunique()),
        "nothing_left_for_train": int(df.loc[no_train, "user_id"].nunique()),
    }
    split = np.where(rank >= test_start, 2, np.where(rank >= val_start, 1, 0))
    df["split"] = split.astype(np.int8)
    df = df[~dropped_rows].drop(columns="_order").reset_index(drop=True)
    return df, {k: v for k, v in dropped.items() if v}
