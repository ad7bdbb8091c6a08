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


def test_the_ranking_scores_are_the_top_of_the_first_positions_item_scores():
    """full_* score the k best items of the policy's first page position, the user's
    excluded items never among them; worked out by hand from the model's own scores."""
    import torch

    from pagellm.config import load_config
    from pagellm.models.decoding import first_item_scores
    from pagellm.models.policy import build_policy
    from pagellm.vocab import PromptEncoder, Vocab

    cfg = load_config(None, ["model.init.n_layer=1", "model.init.n_embd=32"]).model
    model, tok, layout = build_policy(cfg, Vocab.build(["u0", "u1"], [f"i{i}" for i in range(30)]), seed=0)
    model.eval()
    enc = PromptEncoder(tok, layout)
    prompts = [enc.encode_prompt(0, [1, 2]), enc.encode_prompt(1, [3])]
    order = [torch.argsort(s, descending=True).tolist() for s in first_item_scores(model, layout, prompts)]
    # User 0: its best item is excluded, so its second best ranks first (NDCG 1). User 1:
    # the target is its 11th best item, outside the top 10 (NDCG and HR 0).
    exclude = [{order[0][0]}, set()]
    targets = [[order[0][1]], [order[1][10]]]
    probe = RankingProbe({0, 1}, prompts, exclude, targets, page_len=10)
    scores = probe(model, layout)
    assert scores["full_ndcg@10"] == pytest.approx(0.5) and scores["full_hr@10"] == pytest.approx(0.5)
    assert 0.0 <= scores["ndcg@10"] <= scores["hr@10"] <= 1.0
