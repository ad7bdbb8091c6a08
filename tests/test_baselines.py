"""Baselines: popularity counts, SASRec learns a deterministic next-item rule, shared ranking."""

from __future__ import annotations

import numpy as np
import pytest

from pagellm.eval.baselines import Baseline, make_baseline, rank
from pagellm.eval.baselines.popularity import PopularityBaseline
from pagellm.eval.baselines.sasrec import SASRec

N = 20  # items in the synthetic successor task: the next item is always (i + 1) mod N

TINY = {"hidden": 32, "blocks": 1, "heads": 1, "max_len": 8, "dropout": 0.1, "lr": 5e-3,
        "batch_size": 32, "fixed_epochs": 12, "seed": 0, "verbose": False}


def successor_sequences(n_users: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[(int(s) + j) % N for j in range(int(length))]
            for s, length in zip(rng.integers(0, N, n_users), rng.integers(4, 12, n_users))]


@pytest.fixture(scope="module")
def sasrec() -> SASRec:
    model = SASRec(TINY)
    model.fit(successor_sequences(160, seed=1), N)
    return model


def test_popularity_ranks_by_training_count():
    pop = PopularityBaseline()
    pop.fit([[0, 1, 1], [1, 2], [2]], n_items=4)  # counts: 0 -> 1, 1 -> 3, 2 -> 2, 3 -> 0
    scores = pop.score([[0], [3], []])
    assert scores.shape == (3, 4)
    assert scores[0].tolist() == [1, 3, 2, 0] and (scores[2] == scores[0]).all()
    assert rank(pop, [[0], [1]], k=3) == [[1, 2, 0], [1, 2, 0]]
    # excluded items never appear; with too few left the list is shorter, not padded
    assert rank(pop, [[0], [1]], k=3, exclude=[[1], [1, 2, 0]]) == [[2, 0, 3], [3]]
    assert isinstance(pop, Baseline) and pop.name == "popularity"


def test_popularity_rejects_bad_input():
    with pytest.raises(ValueError, match="outside"):
        PopularityBaseline().fit([[0, 5]], n_items=4)
    with pytest.raises(RuntimeError, match="before fit"):
        PopularityBaseline().score([[0]])


def test_sasrec_learns_the_successor_rule(sasrec: SASRec):
    histories = successor_sequences(100, seed=2)
    scores = sasrec.score(histories)
    assert scores.shape == (100, N) and scores.dtype == np.float32
    top1 = rank(sasrec, histories, k=1)
    hr1 = np.mean([t[0] == (h[-1] + 1) % N for t, h in zip(top1, histories)])
    assert hr1 >= 0.9, f"HR@1 {hr1:.2f} on a deterministic successor task"
    assert [r["epoch"] for r in sasrec.training_log] == list(range(1, TINY["fixed_epochs"] + 1))
    assert sasrec.training_log[-1]["loss"] < sasrec.training_log[0]["loss"]


def test_sasrec_ranking_masks_history_and_handles_long_histories(sasrec: SASRec):
    long_history = [i % N for i in range(3 * N + 5)]  # longer than max_len: only the tail is read
    ranked = rank(sasrec, [long_history, [4, 5]], k=N, exclude=[[5, 6], [4, 5]])
    assert 6 not in ranked[0] and 5 not in ranked[0] and len(ranked[0]) == N - 2
    assert ranked[1][0] == 6 and len(set(ranked[1])) == len(ranked[1])
    # padding is invisible: a short history scores the same alone or batched with a long one
    np.testing.assert_allclose(sasrec.score([[4, 5], long_history])[0], sasrec.score([[4, 5]])[0], atol=1e-5)
    # scoring only reads the last max_len items
    np.testing.assert_allclose(sasrec.score([long_history]), sasrec.score([long_history[-TINY["max_len"]:]]), atol=1e-5)


def test_sasrec_is_seeded_and_validates():
    seqs = successor_sequences(40, seed=3)
    a, b = SASRec({**TINY, "fixed_epochs": 1}), SASRec({**TINY, "fixed_epochs": 1})
    a.fit(seqs, N)
    b.fit(seqs, N)
    np.testing.assert_array_equal(a.score(seqs[:5]), b.score(seqs[:5]))
    with pytest.raises(ValueError, match="unknown SASRec"):
        SASRec({"hiden": 64})
    with pytest.raises(ValueError, match="outside"):
        a.score([[N]])
    with pytest.raises(RuntimeError, match="before fit"):
        SASRec().score([[0]])


def test_sasrec_early_stopping_keeps_the_best_epoch():
    seqs = successor_sequences(120, seed=4)
    hist, targets = [s[:-1] for s in seqs], [[s[-1]] for s in seqs]
    model = SASRec({**TINY, "epochs": 40, "patience": 2})
    model.fit([s[:-1] for s in seqs], N, val_histories=hist[:60], val_targets=targets[:60])
    val = [r["val_ndcg@10"] for r in model.training_log]
    assert len(val) < 40  # stopped: the task saturates long before 40 epochs
    assert max(val) == pytest.approx(model.validate(hist[:60], targets[:60]))  # best weights restored


def test_make_baseline():
    assert make_baseline("popularity").name == "popularity"
    assert make_baseline("sasrec", {"hidden": 16}).params["hidden"] == 16
    with pytest.raises(ValueError, match="unknown baseline"):
        make_baseline("bpr")
    assert make_baseline("ease", {"lambdas": [10.0]}).params["lambdas"] == [10.0]
    with pytest.raises(ValueError, match="lambdas must be"):
        make_baseline("ease", {"lambdas": [0.0]})


def co_bought_sequences(n_users: int, seed: int) -> list[list[int]]:
    """Items come in pairs (2j, 2j + 1) bought together, in either order, plus one random item:
    co-occurrence without order, what EASE reads."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_users):
        j = int(rng.integers(0, N // 2))
        pair = [2 * j, 2 * j + 1][:: 1 if rng.random() < 0.5 else -1]
        out.append([*pair, int(rng.integers(0, N))])
    return out


def test_ease_is_the_closed_form_ridge_regression_with_a_zero_diagonal():
    from pagellm.eval.baselines.ease import EASE, ease_weights

    seqs = co_bought_sequences(60, seed=0)
    x = np.zeros((len(seqs), N))
    for u, s in enumerate(seqs):
        x[u, s] = 1
    lam = 3.0
    b = ease_weights(x.T @ x, lam)
    assert np.allclose(np.diag(b), 0)
    # Column j is ridge regression of item j on every other item (the constraint removes j itself).
    for j in (0, 7):
        others = [i for i in range(N) if i != j]
        a = x[:, others]
        direct = np.linalg.solve(a.T @ a + lam * np.eye(N - 1), a.T @ x[:, j])
        assert np.allclose(b[others, j], direct, atol=1e-4)
    model = EASE({"fixed_lambda": lam, "verbose": False})
    model.fit(seqs, N)  # no validation step: the fixed lambda
    assert [r["lambda"] for r in model.training_log] == [lam]
    assert np.allclose(model.score([[0, 5]]), b[0] + b[5], atol=1e-5)
    # It learns the pairs: after 2j the best item is its partner.
    top1 = rank(model, [[2 * j] for j in range(N // 2)], k=1, exclude=[[2 * j] for j in range(N // 2)])
    assert [t[0] for t in top1] == [2 * j + 1 for j in range(N // 2)]


def test_ease_chooses_lambda_on_validation_and_round_trips_its_state():
    from pagellm.eval.baselines.ease import EASE, ease_weights

    seqs = co_bought_sequences(80, seed=1)
    val_h = [[2 * j] for j in range(N // 2)]
    val_t = [[2 * j + 1] for j in range(N // 2)]
    model = EASE({"lambdas": [1e6, 1.0], "edge_steps": 0, "verbose": False})
    model.fit(seqs, N, val_h, val_t)
    assert [r["lambda"] for r in model.training_log] == [1.0, 1e6]
    best = max(model.training_log, key=lambda r: r["val_ndcg@10"])["lambda"]
    x = np.zeros((len(seqs), N))
    for u, s in enumerate(seqs):
        x[u, s] = 1
    assert np.allclose(model.weights, ease_weights(x.T @ x, best))
    again = EASE({"lambdas": [1.0, 1e6], "edge_steps": 0, "verbose": False})
    again.restore(model.state(), N)
    assert np.array_equal(again.score(val_h), model.score(val_h))
    with pytest.raises(ValueError, match="shape"):
        EASE().restore(model.state(), N + 1)
    with pytest.raises(RuntimeError, match="before fit"):
        EASE().score([[0]])


def test_ease_steps_past_the_grid_edge_while_validation_improves():
    from pagellm.eval.baselines.ease import EASE

    class ValleyAt3(EASE):
        """Validation peaks at lambda 3; B filled with lambda says which fit was kept."""

        def _try(self, gram, lam, val_histories, val_targets):
            self.training_log.append({"lambda": lam})
            return -abs(np.log(lam / 3.0)), np.full((N, N), lam, dtype=np.float32)

    seqs, val = co_bought_sequences(20, seed=2), [[0]]
    model = ValleyAt3({"lambdas": [1000.0, 100.0], "edge_steps": 3, "edge_factor": 2.5, "verbose": False})
    model.fit(seqs, N, val, val)
    assert [r["lambda"] for r in model.training_log] == pytest.approx([100, 1000, 40, 16, 6.4])  # 3 steps, all better
    assert model.weights[0, 0] == pytest.approx(6.4)
    inside = ValleyAt3({"lambdas": [1.0, 3.0, 10.0], "verbose": False})
    inside.fit(seqs, N, val, val)
    assert [r["lambda"] for r in inside.training_log] == [1.0, 3.0, 10.0]  # the optimum is inside: no step
    past = ValleyAt3({"lambdas": [4.0, 10.0], "edge_factor": 4.0, "verbose": False})
    past.fit(seqs, N, val, val)
    assert [r["lambda"] for r in past.training_log] == [4.0, 10.0, 1.0]  # 1 is worse than 4: stop there
    assert past.weights[0, 0] == 4.0
    with pytest.raises(ValueError, match="edge_factor"):
        EASE({"edge_factor": 1.0})
    # A catalogue whose inverse would not fit is refused with the way out, before any work.
    with pytest.raises(ValueError, match="remove ease from eval.baselines"):
        EASE({"max_items": N - 1}).fit(seqs, N)


def community_sequences(n_users: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """Two communities: even users buy 4 of items 0..N/2-1, odd users 4 of N/2..N-1 (user
    indices 100, 101, ...: not row numbers). What a user-item graph reads."""
    rng = np.random.default_rng(seed)
    half = N // 2
    seqs = [(rng.choice(half, 4, replace=False) + (half if u % 2 else 0)).tolist() for u in range(n_users)]
    return seqs, [100 + u for u in range(n_users)]


def test_lightgcn_layers_are_the_normalised_adjacency_and_bpr_is_the_pairwise_loss():
    import torch
    from scipy import sparse

    from pagellm.eval.baselines.lightgcn import bpr_loss, normalised_adjacency, propagate, sample_negatives

    r = sparse.csr_matrix(np.array([[1, 1, 0], [0, 1, 0]], dtype=np.float32))  # 2 users x 3 items
    adj = normalised_adjacency(r).to_dense()
    # user 0 (degree 2) - item 1 (degree 2): 1/sqrt(2*2); user 1 (1) - item 1 (2): 1/sqrt(2)
    assert adj[0, 3].item() == pytest.approx(0.5) and adj[1, 3].item() == pytest.approx(2 ** -0.5)
    assert torch.equal(adj, adj.T) and adj[4].abs().sum() == 0  # item 2 has no edge
    e = torch.randn(5, 3)
    assert torch.allclose(propagate(e, normalised_adjacency(r), 0), e)
    assert torch.allclose(propagate(e, normalised_adjacency(r), 2), (e + adj @ e + adj @ adj @ e) / 3, atol=1e-6)
    u, p, n = torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 5.0]])
    assert bpr_loss(u, p, n).item() == pytest.approx(np.log1p(np.exp(-2.0)))
    seen = sparse.csr_matrix(np.eye(4, 50, dtype=np.float32))  # user u saw item u
    draws = sample_negatives(np.repeat(np.arange(4), 500), seen, np.random.default_rng(0))
    assert not (draws == np.repeat(np.arange(4), 500)).any()


def test_lightgcn_ranks_the_users_community_first_selects_its_epoch_and_round_trips():
    from pagellm.eval.baselines.lightgcn import LightGCN

    seqs, users = community_sequences(60, seed=0)
    params = {"dim": 16, "layers": 2, "lr": 0.05, "batch_size": 64, "epochs": 40, "eval_every": 2, "patience": 5,
              "seed": 0, "verbose": False, "threads": 1}
    half = N // 2
    # Validation: 20 users, each holding out an unseen item of its own community.
    val_h, val_u = seqs[:20], users[:20]
    val_t = [[next(i for i in range(half) if i not in s) + (half if u % 2 else 0)] for u, s in enumerate(val_h)]
    model = make_baseline("lightgcn", params)
    assert model.by_user and isinstance(model, Baseline)
    with pytest.raises(ValueError, match="give `users`"):
        model.fit(seqs, N)
    model.fit(seqs, N, val_h, val_t, users=users, val_users=val_u)
    validated = [r for r in model.training_log if "val_ndcg@10" in r]
    assert len(validated) >= 2 and all(r["epoch"] % 2 == 0 for r in validated[:-1])
    top = rank(model, seqs, k=3, exclude=seqs, users=users)
    own = [all((i >= half) == bool(u % 2) for i in t) for u, t in enumerate(top)]
    assert np.mean(own) > 0.95  # the graph joins users through shared items: their side's items come first
    with pytest.raises(ValueError, match="pass their indices"):
        rank(model, seqs, k=3)
    again = LightGCN(params)
    again.restore(model.state(), N)
    assert np.array_equal(again.score(seqs[:5], users=users[:5]), model.score(seqs[:5], users=users[:5]))
    # A user without a node (no training positive) is the mean user, not an error.
    stranger = model.score([[]], users=[7])[0]
    assert np.allclose(stranger, (model.users.mean(0) @ model.items.T).numpy(), atol=1e-5)
    assert model.nodeless == {7}
    with pytest.raises(ValueError, match="hold 20 items, expected 21"):
        LightGCN(params).restore(model.state(), N + 1)
