"""The serving engine without Ray: checkpoint choice, cold start, exclusions, batching."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from pagellm.config import load_config
from pagellm.models.decoding import generate_pages
from pagellm.models.policy import build_policy, save_policy
from pagellm.serve.app import deployment_options
from pagellm.serve.engine import PageEngine, PageScorer, find_policy, policy_version
from pagellm.serve.schemas import PageRequest, RequestError, ScoreRequest, parse_request
from pagellm.vocab import PromptEncoder, Vocab

N_USERS, N_ITEMS = 12, 30
# Item i has popularity N_ITEMS - i, except two ties that the index breaks.
POPULARITY = np.array([N_ITEMS - i for i in range(N_ITEMS)])
POPULARITY[5] = POPULARITY[4]


def make_run(root, n_positions: int = 256, positions: str = "start"):
    """A run folder as the data and SFT stages leave it (random weights)."""
    vocab = Vocab.build([f"u{i}" for i in range(N_USERS)], [f"i{i:02d}" for i in range(N_ITEMS)])
    vocab.to_parquet(root / "data" / "vocab.parquet")
    items = pd.DataFrame({"index": np.arange(N_ITEMS), "item_id": vocab.item_ids, "popularity": POPULARITY})
    items.to_parquet(root / "data" / "items.parquet")
    cfg = load_config(None, [f"model.init.n_positions={n_positions}", f"model.positions={positions}",
                             "data.history_len=20"])
    model, tok, layout = build_policy(cfg.model, vocab, seed=0)
    save_policy(model, tok, layout, root / "sft")
    return cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_run")
    cfg = make_run(root)
    return root, cfg, PageEngine.load(root, cfg, device="cpu")


def req(**fields) -> PageRequest:
    return parse_request(PageRequest, json.dumps(fields), max_k=50, max_history=200)


def direct_page(engine: PageEngine, user, history, k, blocked):
    prompt = PromptEncoder(None, engine.layout).encode_prompt(user, history)
    return generate_pages(engine.model, engine.layout, [prompt], k, exclude=[set(blocked)])


def test_page_is_the_constrained_greedy_page_of_the_users_prompt(run):
    _, _, engine = run
    page = engine.page(req(user_id="u3", history=["i01", "i07", 4], k=8, exclude=["i10", "i11"]))
    # "4" is not an item id (ids are compared as strings): skipped and reported.
    assert page.warnings == ["history ids not in the catalogue were skipped: ['4']"]
    assert page.fallback is None and len(page.item_ids) == 8 == len(set(page.item_ids))
    assert not set(page.item_ids) & {"i01", "i07", "i10", "i11"}
    assert set(page.item_ids) <= set(engine.vocab.item_ids)
    user, hist = engine.vocab.user_index("u3"), [engine.vocab.item_index("i01"), engine.vocab.item_index("i07")]
    blocked = hist + [engine.vocab.item_index("i10"), engine.vocab.item_index("i11")]
    ref = direct_page(engine, user, hist, 8, blocked)
    assert page.item_ids == [engine.vocab.item_ids[i] for i in ref.items[0]]
    assert np.allclose(page.scores, ref.logprobs[0, :8].tolist(), atol=1e-6)
    assert all(s <= 0 for s in page.scores)


def test_unknown_user_is_served_from_history_alone(run):
    _, _, engine = run
    page = engine.page(req(user_id="stranger", history=["i02", "i03"], k=5))
    assert page.warnings == ["unknown user_id 'stranger': served from the history alone"]
    assert page.fallback is None
    hist = [engine.vocab.item_index("i02"), engine.vocab.item_index("i03")]
    ref = direct_page(engine, None, hist, 5, hist)
    assert page.item_ids == [engine.vocab.item_ids[i] for i in ref.items[0]]


def test_known_user_without_history_gets_a_model_page(run):
    _, _, engine = run
    page = engine.page(req(user_id="u1", k=4))
    assert page.fallback is None and page.warnings == [] and len(page.item_ids) == 4


def test_nothing_usable_gets_the_popularity_page_without_excluded_items(run):
    _, _, engine = run
    page = engine.page(req(user_id="nobody", history=["x", "y"], k=5, exclude=["i00", "i02", "zz"]))
    assert page.fallback == "popularity"
    # Most popular first; i04 and i05 tie and the lower index goes first.
    assert page.item_ids == ["i01", "i03", "i04", "i05", "i06"]
    assert page.scores == sorted(page.scores, reverse=True) and all(np.isfinite(page.scores))
    assert any("skipped: ['x', 'y']" in w for w in page.warnings)
    assert any("unknown user_id 'nobody'" in w for w in page.warnings)
    assert any("ignored: ['zz']" in w for w in page.warnings)
    assert any("most popular" in w for w in page.warnings)
    anonymous = engine.page(req(k=3))
    assert anonymous.fallback == "popularity" and anonymous.item_ids == ["i00", "i01", "i02"]


def test_asking_for_more_items_than_allowed_gives_a_short_page_and_a_warning(run):
    _, _, engine = run
    history = [f"i{i:02d}" for i in range(20)]
    page = engine.page(req(user_id="u0", history=history, k=15, exclude=["i20", "i21"]))
    assert sorted(page.item_ids) == [f"i{i:02d}" for i in range(22, N_ITEMS)]
    assert page.warnings[-1].startswith("only 8 items can be served")
    cold = engine.page(req(history=["nope"], k=40))
    assert len(cold.item_ids) == N_ITEMS and "only 30 items" in cold.warnings[-1]


def test_a_batch_gives_each_request_the_page_it_gets_alone(run):
    _, _, engine = run
    requests = [
        req(user_id="u2", history=["i05"], k=3),
        req(user_id="u4", history=["i06", "i07", "i08", "i09"], k=10, exclude=["i11"]),
        req(history=["??"], k=2),  # popularity rows ride along with model rows
        req(user_id="who", history=["i12"], k=6),
    ]
    batched = engine.pages([engine.prepare(r) for r in requests])
    for r, page in zip(requests, batched):
        alone = engine.page(r)
        assert page.item_ids == alone.item_ids and page.fallback == alone.fallback
        assert np.allclose(page.scores, alone.scores, atol=1e-5)
    assert [len(p.item_ids) for p in batched] == [3, 10, 2, 6]


def test_prompt_uses_the_most_recent_training_window(run):
    root, cfg, engine = run
    assert engine.history_window == cfg.data.history_len == 20
    history = [f"i{i:02d}" for i in range(25)]
    prep = engine.prepare(req(user_id="u0", history=history, k=2))
    assert prep.prompt_items == [engine.vocab.item_index(f"i{i:02d}") for i in range(5, 25)]
    assert prep.blocked == {engine.vocab.item_index(h) for h in history}  # the whole history stays excluded


def test_a_short_context_shrinks_the_window_and_a_too_short_one_fails(tmp_path):
    cfg = make_run(tmp_path, n_positions=64)
    engine = PageEngine.load(tmp_path, cfg, device="cpu")
    # 64 positions - 11 template tokens (incl. the user) - (max_k 50 + eos) leaves 2 prompt items.
    assert engine.history_window == 2
    page = engine.page(req(user_id="u0", history=["i01", "i02", "i03"], k=50))
    assert len(page.item_ids) == N_ITEMS - 3
    too_small = cfg.model_copy(deep=True)
    too_small.serve.max_k = 60
    with pytest.raises(ValueError, match="cannot hold a prompt plus a page of serve.max_k=60"):
        PageEngine.load(tmp_path, too_small, device="cpu")


def test_prompt_end_positions_leave_half_the_context_to_the_prompt(tmp_path):
    cfg = make_run(tmp_path, n_positions=128, positions="prompt_end")
    cfg.data.history_len = 60
    engine = PageEngine.load(tmp_path, cfg, device="cpu")
    # Prompts end at position 64: 64 - 11 template tokens (incl. the user) = 53 items, and
    # a max_k page (51 tokens) fits in the other half.
    assert engine.history_window == 53
    page = engine.page(req(user_id="u0", history=[f"i{i:02d}" for i in range(N_ITEMS - 5)], k=5))
    assert len(page.item_ids) == 5
    too_long = cfg.model_copy(deep=True)
    too_long.serve.max_k = 64
    with pytest.raises(ValueError, match="cannot hold a prompt plus a page of serve.max_k=64"):
        PageEngine.load(tmp_path, too_long, device="cpu")


def test_score_inputs_resolve_ids_and_refuse_unknown_page_items(run):
    _, _, engine = run
    body = {"user_id": "u5", "history": ["i01", "bad"], "page": ["i03", "i04"]}
    inputs = engine.score_inputs(parse_request(ScoreRequest, json.dumps(body), 50, 200))
    assert (inputs.user_index, inputs.prompt_items, inputs.page) == (engine.vocab.user_index("u5"), [1], [3, 4])
    assert inputs.warnings == ["history ids not in the catalogue were skipped: ['bad']"]
    body["page"] = ["i03", "ghost", 77]
    with pytest.raises(RequestError, match=r"page holds item ids not in the catalogue: \['ghost', '77'\]") as err:
        engine.score_inputs(parse_request(ScoreRequest, json.dumps(body), 50, 200))
    assert err.value.status == 422


def test_no_reward_model_means_no_scorer(run):
    root, _, _ = run
    assert PageScorer.load(root) is None


def test_checkpoint_choice_and_version(tmp_path, run):
    root, _, _ = run
    assert find_policy(root) == ("sft", root / "sft")
    assert policy_version("sft", root / "sft", root).startswith("sft@")
    run2 = tmp_path / "run2"
    shutil.copytree(root / "sft", run2 / "sft")
    shutil.copytree(root / "sft", run2 / "ppo" / "step_7")
    shutil.copytree(root / "sft", run2 / "ppo" / "step_30")
    os.utime(run2 / "ppo" / "step_7", (1e9, 2e9))  # newer mtime, but the step decides
    assert find_policy(run2) == ("ppo", run2 / "ppo" / "step_30")
    assert policy_version("ppo", run2 / "ppo" / "step_30", run2) == "ppo@30"
    # A PPO checkpoint written straight into ppo/: the step comes from metrics.jsonl.
    shutil.rmtree(run2 / "ppo")
    shutil.copytree(root / "sft", run2 / "ppo")
    (run2 / "ppo" / "metrics.jsonl").write_text('{"step": 1, "policy_version": 1}\n{"step": 2, "policy_version": 2}\n')
    assert find_policy(run2) == ("ppo", run2 / "ppo") and policy_version("ppo", run2 / "ppo", run2) == "ppo@2"
    with pytest.raises(FileNotFoundError, match="pagellm sft --run"):
        find_policy(tmp_path / "empty")


def test_a_lora_checkpoint_is_served_merged_with_the_same_pages(tmp_path, run):
    root, cfg, _ = run
    lora_cfg = load_config(None, ["model.lora.enabled=true", "model.lora.r=4", "model.init.n_layer=1"])
    vocab = Vocab.from_parquet(root / "data" / "vocab.parquet")
    model, tok, layout = build_policy(lora_cfg.model, vocab, seed=0)
    with torch.no_grad():  # move the adapters off their zero init so merging matters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    shutil.copytree(root / "data", tmp_path / "data")
    save_policy(model, tok, layout, tmp_path / "ppo" / "step_3")
    engine = PageEngine.load(tmp_path, lora_cfg, device="cpu")
    assert engine.version == "ppo@3" and not type(engine.model).__name__.startswith("Peft")
    page = engine.page(req(user_id="u2", history=["i04"], k=6))
    model.eval()
    prompt = PromptEncoder(None, layout).encode_prompt(engine.vocab.user_index("u2"), [4])
    ref = generate_pages(model, layout, [prompt], 6, exclude=[{4}])  # the unmerged adapter model
    assert page.item_ids == [engine.vocab.item_ids[i] for i in ref.items[0]]
    assert np.allclose(page.scores, ref.logprobs[0, :6].tolist(), atol=1e-4)


def test_a_checkpoint_from_another_data_build_is_refused(tmp_path, run):
    root, cfg, _ = run
    shutil.copytree(root / "sft", tmp_path / "sft")
    Vocab.build(["u0"], ["a", "b"]).to_parquet(tmp_path / "data" / "vocab.parquet")
    shutil.copy(root / "data" / "items.parquet", tmp_path / "data" / "items.parquet")
    with pytest.raises(ValueError, match="another data build"):
        PageEngine.load(tmp_path, cfg, device="cpu")


@pytest.mark.parametrize(
    "body, message",
    [
        ('{"history": [', "malformed JSON"),
        ('["i01"]', "the request body must be a JSON object, got array"),
        ('{"k": 0}', "k: k must be between 1 and 50, got 0"),
        ('{"k": 51}', "k: k must be between 1 and 50, got 51"),
        ('{"k": "10"}', "k: Input should be a valid integer, got string"),
        ('{"k": 2.5}', "k: Input should be a valid integer, got number"),
        ('{"history": "i01"}', "history: Input should be a valid array, got string"),
        ('{"history": [1.5]}', "history[0]: an id must be a string or an integer, got number 1.5"),
        ('{"user_id": true}', "user_id: an id must be a string or an integer, got boolean true"),
        ('{"history": [' + ",".join(['"i01"'] * 201) + "]}", "history holds 201 items; the limit is 200"),
        ('{"hisotry": []}', "hisotry: unknown field"),
        ("", "empty body"),
    ],
)
def test_bad_page_requests_get_one_readable_message(body, message):
    with pytest.raises(RequestError) as err:
        parse_request(PageRequest, body.encode(), max_k=50, max_history=200)
    assert err.value.status == 422 and message in err.value.message
    assert err.value.message.startswith("invalid request: ")


def test_deployment_options_follow_the_serve_config():
    cfg = load_config(None, [])
    assert deployment_options(cfg.serve) == {"max_ongoing_requests": 32, "num_replicas": 1,
                                             "logging_config": {"enable_access_log": True}}
    quiet = load_config(None, ["serve.access_log=false"])
    assert deployment_options(quiet.serve)["logging_config"] == {"enable_access_log": False}
    scaled = load_config(None, ["serve.autoscaling={min_replicas: 1, max_replicas: 4}", "serve.max_batch_size=8"])
    opts = deployment_options(scaled.serve)
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}
    assert "num_replicas" not in opts and opts["max_ongoing_requests"] == 16
    auto = load_config(None, ["serve.num_replicas=auto"])
    assert deployment_options(auto.serve)["num_replicas"] == "auto"

