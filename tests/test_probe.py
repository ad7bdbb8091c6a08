"""The validation probe's halves: SFT and stage 3 select on disjoint users."""

from pathlib import Path

import pandas as pd
import pytest

from pagellm.eval.probe import PROBE_PARTS, RankingProbe


class _Encoder:
    def encode_prompt(self, user: int, items: list[int]) -> list[int]:
        return [user, *items]


def _write_data(data_dir: Path, n_users: int, with_val: int) -> None:
    """`n_users` users, the first `with_val` of them with a validation positive."""
    data_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"user_index": u, "prompt_val": [1, 2], "train_items": [1, 2], "val_items": [3] if u < with_val else [],
             "train_positives": [1, 2], "prompt_test": [1, 2, 3], "seen_before_test": [1, 2, 3], "test_items": [4]}
            for u in range(n_users)]
    pd.DataFrame(rows).to_parquet(data_dir / "eval.parquet")
    pd.DataFrame({"index": range(5), "categories": [[0]] * 5, "popularity": [1] * 5}).to_parquet(data_dir / "items.parquet")


def test_halves_are_disjoint_and_each_gets_the_asked_users(tmp_path):
    _write_data(tmp_path, n_users=50, with_val=50)
    sft = RankingProbe.from_data(tmp_path, _Encoder(), 10, users=10, part="sft")
    stage3 = RankingProbe.from_data(tmp_path, _Encoder(), 10, users=10, part="stage3")
    assert len(sft.users) == 10 and len(stage3.users) == 10
    assert not sft.users & stage3.users
    # Both halves spread over the whole user range, not one end of it.
    assert min(sft.users) < 10 < 40 < max(sft.users) and min(stage3.users) < 10 < 40 < max(stage3.users)
    # The prompts belong to the half's own users.
    assert {p[0] for p in stage3.prompts} == stage3.users


def test_small_data_splits_every_validation_user_between_the_halves(tmp_path):
    _write_data(tmp_path, n_users=9, with_val=7)  # two users have no validation positive
    halves = [RankingProbe.from_data(tmp_path, _Encoder(), 10, users=2000, part=p) for p in PROBE_PARTS]
    assert sorted(len(h.users) for h in halves) == [3, 4]
    assert halves[0].users | halves[1].users == set(range(7))


def test_bad_part_and_too_few_users_fail_clearly(tmp_path):
    _write_data(tmp_path, n_users=3, with_val=1)
    with pytest.raises(ValueError, match="probe part 'ppo'"):
        RankingProbe.from_data(tmp_path, _Encoder(), 10, users=5, part="ppo")
    with pytest.raises(ValueError, match="1 user\\(s\\) with validation positives"):
        RankingProbe.from_data(tmp_path, _Encoder(), 10, users=5, part="sft")
