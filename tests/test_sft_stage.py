"""The SFT stage: loss masks, and the real loop on 2 Ray Train workers under ZeRO-2 and ZeRO-3."""

import json

import pytest
import torch

from pagellm.config import load_config
from pagellm.data.pipeline import run_data_stage
from pagellm.models.decoding import generate_pages
from pagellm.models.policy import build_policy, load_policy
from pagellm.train.sft import run_sft_stage
from pagellm.train.sft_rows import IGNORE, history_rows, page_rows
from pagellm.vocab import PromptEncoder, Vocab

SMALL = ["data.simulator.users=40", "data.simulator.items=40", "data.simulator.categories=4",
         "data.simulator.interactions_per_user=20", "model.init.n_layer=1", "model.init.n_embd=32",
         "sft.batch_size=16", "sft.meta_epochs=0", "sft.epochs=2", "sft.workers=2", "sft.log_every=1000"]


def encoder():
    vocab = Vocab.build([f"u{i}" for i in range(3)], [f"i{i}" for i in range(9)])
    _, tok, layout = build_policy(load_config(None, SMALL).model, vocab, seed=0)
    return PromptEncoder(tok, layout), layout


def test_page_rows_take_loss_on_the_page_only_and_add_user_free_copies():
    enc, layout = encoder()
    rows = page_rows(enc, [1, 2], [[0, 1], [2]], [[5, 6], [7]], user_dropout=1.0, seed=0)
    assert len(rows) == 4  # every row again without its user token
    ids, labels, targets, blocked, prompt_len, is_page = rows[0]
    page = [layout.item_offset + 5, layout.item_offset + 6, layout.eos_id]
    assert ids[-3:] == page and labels[-3:] == page
    assert all(label == IGNORE for label in labels[:-3])
    assert layout.user_offset + 1 in rows[0][0] and layout.user_offset + 1 not in rows[1][0]
    # Teacher forcing under the decoding constraints: item t, with the prompt and the
    # page so far masked; <eos> has no item target.
    assert targets == [[5], [6], []]
    assert blocked == [[0, 1], [0, 1, 5], [0, 1, 5, 6]]
    assert prompt_len == len(ids) - 3 and is_page


def test_set_page_rows_accept_any_item_not_yet_placed():
    enc, _ = encoder()
    (row,) = page_rows(enc, [0], [[1]], [[5, 6, 7]], user_dropout=0.0, seed=0, page_loss="set")
    assert row.targets == [[5, 6, 7], [6, 7], [7], []]


def test_page_rows_without_user_tokens_have_no_user_token_and_no_copies():
    enc, layout = encoder()
    layout.user_tokens = False
    rows = page_rows(enc, [1], [[0, 1]], [[5, 6]], user_dropout=1.0, seed=0)
    assert len(rows) == 1
    assert not any(layout.user_offset <= t < layout.user_offset + layout.n_users for t in rows[0].ids)


def test_history_rows_predict_every_item_but_the_first_and_the_last_after_the_prompt():
    enc, layout = encoder()
    (row,) = history_rows(enc, [0], [[3, 4, 5]], max_items=50)
    assert [t for t in row.labels if t != IGNORE] == [layout.item_offset + 4, layout.item_offset + 5]
    assert row.targets == [[4], [5]] and row.blocked == [[], []]
    # The last item follows the prompt template's tail, where every generated page starts.
    assert row.ids[:-1] == enc.encode_prompt(0, [3, 4]) and row.ids[-1] == layout.item_offset + 5
    assert history_rows(enc, [0], [[3]], max_items=50) == []  # nothing to predict


def test_history_rows_with_block_seen_mask_the_items_before_each_position_but_its_target():
    """sft.meta_block_seen: position k's softmax excludes what the user took before it (as
    decoding excludes the history), a repeated item stays a reachable target, and the
    held-out rows of validation mask the whole training history."""
    enc, _ = encoder()
    (row,) = history_rows(enc, [0], [[3, 4, 5, 3]], max_items=50, block_seen=True)
    assert row.targets == [[4], [5], [3]]
    assert row.blocked == [[3], [3, 4], [4, 5]]  # 3 is the last target: a repeat, not masked
    (held,) = history_rows(enc, [0], [[3, 4, 5, 6]], max_items=50, scored=[1], block_seen=True)
    assert held.targets == [[6]] and held.blocked == [[3, 4, 5]]
    # Through collate, the masked items are (position, item) pairs of the loss's softmax.
    from pagellm.train.sft_rows import collate

    batch = collate([row], pad_id=0)
    assert batch["blocked"].T.tolist() == [[0, 3], [1, 3], [1, 4], [2, 4], [2, 5]]


def test_without_the_prompt_tail_the_page_is_read_out_where_history_items_are(tmp_path):
    """model.prompt_tail=false: the prompt ends with the last history item, so a meta row
    trains its last item from the same kind of position as every other (SASRec's read-out),
    the page's first item follows the history, and the layout survives a save/load."""
    from pagellm.models.policy import save_policy

    vocab = Vocab.build([f"u{i}" for i in range(3)], [f"i{i}" for i in range(9)])
    model_cfg = load_config(None, SMALL + ["model.prompt_tail=false"]).model
    model, tok, layout = build_policy(model_cfg, vocab, seed=0)
    enc = PromptEncoder(tok, layout)
    assert layout.tail_ids == []
    assert enc.encode_prompt(0, [3, 4])[-2:] == [layout.item_offset + 3, layout.item_offset + 4]
    (row,) = history_rows(enc, [0], [[3, 4, 5]], max_items=50)
    assert row.ids[-3:] == [layout.item_offset + i for i in (3, 4, 5)] and row.targets == [[4], [5]]
    (page,) = page_rows(enc, [0], [[3, 4]], [[5, 6]], user_dropout=0.0, seed=0)
    assert page.ids[page.prompt_len - 1] == layout.item_offset + 4  # history's last item, then the page
    assert enc.encode_prompt(0, []) == layout.prefix_ids + [layout.user_offset] + layout.head_ids
    save_policy(model, tok, layout, tmp_path)
    _, _, loaded = load_policy(tmp_path, model_cfg)
    assert loaded.tail_ids == [] and loaded.empty_ids == layout.head_ids
    pages = generate_pages(model, layout, [enc.encode_prompt(0, [3, 4]), enc.encode_prompt(1, [])], k=3,
                           exclude=[{3, 4}, set()]).items
    assert all(len(p) == 3 and len(set(p)) == 3 for p in pages) and not {3, 4} & set(pages[0])
    # The default keeps the paper's template, closing words and all.
    assert build_policy(load_config(None, SMALL).model, vocab, seed=0)[2].tail_ids


def test_item_loss_terms_by_hand():
    from pagellm.train.sft import item_loss_terms

    logits = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.5, 3.0]])
    # position 0: target item 1, item 2 blocked; position 1: target {0, 1} (set), nothing blocked.
    targets = torch.tensor([[0, 1, 1], [1, 0, 1]])
    blocked = torch.tensor([[0], [2]])
    losses, positions = item_loss_terms(logits, targets, blocked)
    p0 = torch.tensor([1.0, 2.0]).softmax(0)[1]
    p1 = torch.tensor([0.5, 0.5, 3.0]).softmax(0)[:2].sum()
    assert positions.tolist() == [0, 1]
    assert torch.allclose(losses, -torch.log(torch.stack([p0, p1])), atol=1e-6)


def test_stop_after_patience_and_best_record():
    from pagellm.train.harness import patience_exhausted
    from pagellm.eval.probe import best_record

    history = [{"epoch": 1, "m": 0.1}, {"epoch": 2, "m": 0.3}, {"epoch": 3, "m": 0.2}, {"epoch": 4, "m": 0.3}]
    assert not patience_exhausted(history, "m", 3)
    assert patience_exhausted(history, "m", 2)  # the first 0.3 is the best; two epochs since
    assert best_record(history, "m")["epoch"] == 2
    assert best_record([{"epoch": 1}], "m") is None


@pytest.fixture(scope="module")
def data_run(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    cfg = load_config(None, SMALL)
    run_data_stage(cfg, root / "data", log=lambda *_: None)
    return root


def _check_policy(run_dir):
    model, tok, layout = load_policy(run_dir / "sft", trainable=False)
    vocab = Vocab.from_parquet(run_dir / "data" / "vocab.parquet")
    prompt = PromptEncoder(tok, layout).encode_prompt(0, [1, 2])
    pages = generate_pages(model, layout, [prompt], k=5).items[0]
    assert len(set(pages)) == 5 and all(0 <= i < vocab.n_items for i in pages)


@pytest.mark.parametrize("zero,meta,own,distill", [(2, 1, 0.0, 1.0), (3, 0, 0.5, 0.0)])
def test_sft_on_two_workers(data_run, tmp_path, zero, meta, own, distill):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(data_run, run_dir)
    # own: half of each batch written by the policy itself, on two ZeRO-3 ranks at once;
    # distill: the meta checkpoint, frozen, teaches every page position its ranking, with
    # half the training histories replayed among the page rows.
    cfg = load_config(None, SMALL + [f"sft.zero_stage={zero}", f"sft.meta_epochs={meta}", f"sft.own_prefix={own}",
                                     f"sft.page_loss={'set' if own else 'sequence'}", f"sft.rank_distill={distill}",
                                     f"sft.history_replay={0.5 if distill else 0.0}"])
    metrics = run_sft_stage(cfg, run_dir, log=lambda *_: None)
    saved = json.loads((run_dir / "sft" / "metrics.json").read_text())
    assert saved["history"]["sft"][0]["epoch"] == 1 and "val_loss" in saved["history"]["sft"][0]
    assert ("meta" in saved["history"]) == bool(meta)
    # Every epoch is judged by the pages the policy writes for validation users.
    assert all(0.0 <= h["val_ndcg@10"] <= h["val_hr@10"] for phase in saved["history"].values() for h in phase)
    # ... and by its next-item ranking (what the meta phase selects on).
    assert all(0.0 <= h["val_full_ndcg@10"] <= h["val_full_hr@10"] for phase in saved["history"].values() for h in phase)
    # The published weights are the chosen checkpoint's, byte for byte.
    from safetensors.torch import load_file

    chosen = load_file(f"{saved['published']['checkpoint']}/model.safetensors")
    published = load_file(run_dir / "sft" / "model.safetensors")
    assert chosen.keys() == published.keys() and all(torch.equal(chosen[k], published[k]) for k in chosen)
    best = max((h["val_ndcg@10"] for phase in saved["history"].values() for h in phase))
    assert metrics["published"]["val_ndcg@10"] == best
    _check_policy(run_dir)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_target_token_loss_equals_the_models_own_loss(arch):
    from pagellm.train.sft import target_token_loss
    from pagellm.train.sft_rows import collate

    init = ({"n_layer": 1, "n_embd": 32, "n_head": 2} if arch == "gpt2" else
            {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
             "num_key_value_heads": 1})
    cfg = load_config(None, [f"model.arch={arch}"]).model.model_copy(update={"init": init})
    vocab = Vocab.build(["u0", "u1"], [f"i{i}" for i in range(9)])
    model, tok, layout = build_policy(cfg, vocab, seed=0)
    model.eval()
    rows = page_rows(PromptEncoder(tok, layout), [0, 1], [[1, 2, 3], [4]], [[5, 6], [7, 8, 0]], 0.0, 0)
    batch = collate(rows, layout.pad_id)
    expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert torch.allclose(target_token_loss(model, batch), expected, atol=1e-5)


def test_item_token_loss_is_the_constrained_page_likelihood():
    """The page-phase item loss equals the mean negative log-probability that constrained
    decoding (prompt items excluded) gives each golden item: training and decoding agree.
    The loss trains the page model itself, so the agreement is with decoding without
    model.ranking_prior (DPO's page likelihood, which applies it, is tested in test_dpo)."""
    from pagellm.models.decoding import constrained_logprobs
    from pagellm.models.positions import prompt_anchor
    from pagellm.train.sft import item_token_loss
    from pagellm.train.sft_rows import collate

    cfg = load_config(None, ["model.init.n_layer=1", "model.init.n_embd=32", "model.ranking_prior=0"]).model
    vocab = Vocab.build(["u0", "u1"], [f"i{i}" for i in range(9)])
    model, tok, layout = build_policy(cfg, vocab, seed=0)
    model.eval()
    enc = PromptEncoder(tok, layout)
    prompts, pages = [[1, 2, 3], [4]], [[5, 6], [7, 8, 0]]
    batch = collate(page_rows(enc, [0, 1], prompts, pages, 0.0, 0), layout.pad_id, anchor=prompt_anchor(model))
    item_logps = torch.cat([
        constrained_logprobs(model, layout, [enc.encode_prompt(u, p)], [enc.encode_page(page)], exclude=[p])[0][0, :-1]
        for u, p, page in zip([0, 1], prompts, pages)
    ])  # <eos> is the only choice once the page is full: logprob 0, no loss there
    assert torch.allclose(item_token_loss(model, batch, layout), -item_logps.mean(), atol=1e-5)


def _fake_sft_fits(tmp_path, monkeypatch, scores: dict[str, dict[str, list[float]]]):
    """Stand in for harness.fit: each run's epochs carry the given validation scores, and
    its best checkpoint is picked by the `checkpoint_score` the stage asks for, as Ray
    Train's CheckpointConfig does. Returns what each run was asked (score, init dir)."""
    import pagellm.train.harness as harness
    from pagellm.train.harness import FitResult

    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "sft.parquet").write_text("")  # the stage checks the data exists
    asked = {}

    def fake_fit(loop_fn, loop_config, train_cfg, run_dir, name, checkpoint_score=None, **_):
        history = []
        for epoch, values in enumerate(zip(*scores[name].values()), start=1):
            ckpt = tmp_path / "ray_train" / name / f"checkpoint_epoch{epoch:03d}"
            (ckpt / "hf").mkdir(parents=True, exist_ok=True)
            (ckpt / "hf" / "which.txt").write_text(f"{name} epoch {epoch}")
            history.append({"epoch": epoch, "val_loss": 1.0, **dict(zip(scores[name], values))})
        key, order = checkpoint_score
        best = (max if order == "max" else min)(history, key=lambda h: h[key])["epoch"]
        asked[name] = (checkpoint_score, loop_config.get("init_dir"))
        return FitResult(metrics=history[-1], history=history,
                         checkpoint_path=str(tmp_path / "ray_train" / name / f"checkpoint_epoch{len(history):03d}"),
                         best_checkpoint_path=str(tmp_path / "ray_train" / name / f"checkpoint_epoch{best:03d}"))

    monkeypatch.setattr(harness, "fit", fake_fit)
    return asked


def test_the_published_policy_is_the_best_validation_checkpoint_not_the_last(tmp_path, monkeypatch):
    """Selection across both phases: whichever epoch of meta or page training has the best
    validation NDCG@10 is what lands in <run>/sft, and metrics.json says which."""
    scores = {"sft_meta": {"val_ndcg@10": [0.10, 0.30, 0.20]}, "sft": {"val_ndcg@10": [0.25, 0.28, 0.27]}}
    asked = _fake_sft_fits(tmp_path, monkeypatch, scores)
    cfg = load_config(None, ["sft.meta_epochs=3", "sft.epochs=3"])
    assert cfg.sft.meta_select == "page"
    metrics = run_sft_stage(cfg, tmp_path, log=lambda *_: None)
    assert asked["sft_meta"][0] == asked["sft"][0] == ("val_ndcg@10", "max")
    # The page phase starts from the best meta epoch, and the best of all (meta epoch 2,
    # 0.30 > the page phase's best 0.28) is published, not the last checkpoint of either.
    assert asked["sft"][1].endswith("sft_meta/checkpoint_epoch002/hf")
    assert (tmp_path / "sft" / "which.txt").read_text() == "sft_meta epoch 2"
    assert metrics["published"]["phase"] == "meta" and metrics["published"]["epoch"] == 2

    scores["sft"]["val_ndcg@10"][1] = 0.35  # now page epoch 2 is the best of all
    run_sft_stage(cfg, tmp_path, log=lambda *_: None)
    assert (tmp_path / "sft" / "which.txt").read_text() == "sft epoch 2"


def test_the_meta_phase_is_selected_by_its_ranking_and_competes_by_its_page(tmp_path, monkeypatch):
    """sft.meta_select=ranking: the next-item phase keeps the epoch whose
    next-item ranking validates best, the page phase starts from it, and it is published
    only if its written page beats the page phase's."""
    scores = {"sft_meta": {"val_ndcg@10": [0.10, 0.30, 0.20], "val_full_ndcg@10": [0.20, 0.25, 0.40]},
              "sft": {"val_ndcg@10": [0.21, 0.24, 0.22], "val_full_ndcg@10": [0.5, 0.5, 0.5]}}
    asked = _fake_sft_fits(tmp_path, monkeypatch, scores)
    cfg = load_config(None, ["sft.meta_epochs=3", "sft.epochs=3", "sft.meta_select=ranking"])
    metrics = run_sft_stage(cfg, tmp_path, log=lambda *_: None)
    assert asked["sft_meta"][0] == ("val_full_ndcg@10", "max") and asked["sft"][0] == ("val_ndcg@10", "max")
    assert asked["sft"][1].endswith("sft_meta/checkpoint_epoch003/hf")
    # Meta epoch 3 writes pages scoring 0.20 < the page phase's best 0.24: the page phase
    # is published, although meta epoch 2 wrote better pages (it is not the kept checkpoint).
    assert (tmp_path / "sft" / "which.txt").read_text() == "sft epoch 2"
    assert metrics["published"]["phase"] == "sft" and metrics["published"]["val_ndcg@10"] == 0.24

    scores["sft"]["val_ndcg@10"] = [0.10, 0.15, 0.12]  # now the kept meta epoch writes the best page
    metrics = run_sft_stage(cfg, tmp_path, log=lambda *_: None)
    assert (tmp_path / "sft" / "which.txt").read_text() == "sft_meta epoch 3"
    assert metrics["published"]["phase"] == "meta" and metrics["published"]["epoch"] == 3


def test_own_prefix_rows_condition_on_the_greedy_page_and_target_the_golden_items_left():
    """sft.own_prefix: a row is rewritten on the page greedy decoding writes for its prompt
    (prompt items excluded), cut to the golden page's length; position t's targets are the
    golden items not among the written items 0..t-1, and it blocks the prompt and those."""
    from pagellm.models.decoding import generate_pages
    from pagellm.train.sft_rows import own_prefix_rows

    cfg = load_config(None, ["model.init.n_layer=1", "model.init.n_embd=32"]).model
    model, tok, layout = build_policy(cfg, Vocab.build(["u0"], [f"i{i}" for i in range(12)]), seed=0)
    model.eval()
    enc = PromptEncoder(tok, layout)
    written = generate_pages(model, layout, [enc.encode_prompt(0, [1, 2])], k=12, exclude=[[1, 2]]).items[0]
    # A golden page holding the greedy page's 2nd item and two items it never writes first.
    golden = [written[1]] + [i for i in range(12) if i not in (1, 2) and i not in written[:3]][:2]
    rows = page_rows(enc, [0, 0], [[1, 2], [1, 2]], [golden, golden[:2]], 0.0, 0, page_loss="set")
    out = own_prefix_rows(model, layout, enc, rows)
    for row, gold in zip(out, [golden, golden[:2]]):
        page = written[: len(gold)]
        assert row.ids == enc.encode_prompt(0, [1, 2]) + enc.encode_page(page)
        assert row.prompt_len == rows[0].prompt_len and row.labels[row.prompt_len:] == enc.encode_page(page)
        assert row.blocked == [[1, 2] + page[:t] for t in range(len(page) + 1)]
    # Position 0: all three golden items; 1: still all three (the first guess is not one);
    # 2: the two left once the golden written[1] is placed; <eos>: none.
    assert out[0].targets == [golden, golden, golden[1:], []]
    assert out[1].targets == [golden[:2], golden[:2], []]


def test_own_prefix_needs_set_targets():
    from pagellm.config import ConfigError

    with pytest.raises(ConfigError, match="own_prefix"):
        load_config(None, ["sft.own_prefix=0.5", "sft.page_loss=sequence"])
    assert load_config(None, ["sft.own_prefix=0.5", "sft.page_loss=set"]).sft.own_prefix == 0.5


def test_the_meta_phase_can_be_selected_by_its_held_out_loss(tmp_path, monkeypatch):
    """sft.meta_select=loss: the lowest validation loss of the next-item phase
    is kept and starts the page phase; publishing still compares written pages."""
    scores = {"sft_meta": {"val_ndcg@10": [0.30, 0.10, 0.20], "val_loss": [5.0, 4.0, 4.5]},
              "sft": {"val_ndcg@10": [0.15, 0.12, 0.11]}}
    asked = _fake_sft_fits(tmp_path, monkeypatch, scores)
    cfg = load_config(None, ["sft.meta_epochs=3", "sft.epochs=3", "sft.meta_select=loss"])
    metrics = run_sft_stage(cfg, tmp_path, log=lambda *_: None)
    assert asked["sft_meta"][0] == ("val_loss", "min")
    assert asked["sft"][1].endswith("sft_meta/checkpoint_epoch002/hf")
    assert metrics["published"]["phase"] == "sft" and metrics["published"]["epoch"] == 1


def test_validation_history_rows_score_only_the_held_out_items():
    """The meta phase's validation loss is the held-out items' cross-entropy alone: the
    training items of the same history are in the training rows already."""
    from pagellm.train.sft_rows import IGNORE, history_rows

    cfg = load_config(None, ["model.init.n_layer=1", "model.init.n_embd=32"]).model
    _, tok, layout = build_policy(cfg, Vocab.build(["u0", "u1"], [f"i{i}" for i in range(9)]), seed=0)
    enc = PromptEncoder(tok, layout)
    full = history_rows(enc, [0, 1], [[1, 2, 3, 4], [5, 6, 7]], 50)
    held = history_rows(enc, [0, 1], [[1, 2, 3, 4], [5, 6, 7]], 50, scored=[1, 2])
    assert [r.targets for r in full] == [[[2], [3], [4]], [[6], [7]]]
    assert [r.targets for r in held] == [[[4]], [[6], [7]]]
    assert held[0].ids == full[0].ids
    assert [t for t in held[0].labels if t != IGNORE] == [layout.item_token(4)]


def test_item_loss_with_ranking_adds_the_weighted_kl_to_the_item_loss():
    """sft.rank_distill's step: the item loss, plus weight × the ranking KL, which is zero at
    each row's first page position when the teacher is the student itself."""
    import copy

    from pagellm.models.positions import prompt_anchor
    from pagellm.train.rank_distill import ranking_kl, row_starts
    from pagellm.train.sft import (_labelled_hidden, constrained_log_softmax, item_logits, item_loss_terms,
                                   item_loss_with_ranking, item_token_loss)
    from pagellm.train.sft_rows import collate

    cfg = load_config(None, ["model.init.n_layer=1", "model.init.n_embd=32"]).model
    model, tok, layout = build_policy(cfg, Vocab.build(["u0", "u1"], [f"i{i}" for i in range(9)]), seed=0)
    model.eval()
    teacher = copy.deepcopy(model)
    rows = page_rows(PromptEncoder(tok, layout), [0, 1], [[1, 2, 3], [4]], [[5, 6], [7, 8, 0]], 0.0, 0, "set")
    batch = collate(rows, layout.pad_id, anchor=prompt_anchor(model))
    assert batch["label_rows"].tolist() == [0, 0, 0, 1, 1, 1, 1]  # two items + eos, three items + eos
    total, extra = item_loss_with_ranking(model, teacher, batch, layout, weight=2.0)
    hidden, _ = _labelled_hidden(model, batch)
    logits = item_logits(model, hidden, layout)
    _, positions = item_loss_terms(logits, batch["targets"], batch["blocked"])
    starts, row_of = row_starts(batch["label_rows"])
    logp = constrained_log_softmax(logits, batch["blocked"])
    kl = float(ranking_kl(logp, logits[starts], row_of, batch["blocked"], positions))
    assert float(total) == pytest.approx(float(item_token_loss(model, batch, layout)) + 2.0 * kl, rel=1e-5)
    assert extra["rank_kl"] == pytest.approx(kl, rel=1e-5) and kl > 0
    assert float(ranking_kl(logp, logits[starts], row_of, batch["blocked"], starts)) == pytest.approx(0.0, abs=1e-6)


def test_replayed_history_rows_are_distilled_at_their_own_positions():
    """sft.history_replay: in a batch of page and history rows, the item loss is the mean
    over every labelled position of both; page positions learn the teacher's ranking (as
    without history rows) and history positions the teacher's prediction at each position,
    which is zero when the teacher is the student."""
    import copy

    from pagellm.models.positions import prompt_anchor
    from pagellm.train.sft import item_loss_with_ranking, item_token_loss
    from pagellm.train.sft_rows import collate, replay_sample

    cfg = load_config(None, ["model.init.n_layer=1", "model.init.n_embd=32"]).model
    model, tok, layout = build_policy(cfg, Vocab.build(["u0", "u1"], [f"i{i}" for i in range(9)]), seed=0)
    model.eval()
    enc = PromptEncoder(tok, layout)
    pages = page_rows(enc, [0, 1], [[1, 2, 3], [4]], [[5, 6], [7, 8, 0]], 0.0, 0, "set")
    history = history_rows(enc, [0, 1], [[3, 1, 4, 1, 5], [2, 6, 5]], 50)
    assert [r.page for r in pages] == [True, True] and [r.page for r in history] == [False, False]
    anchor = prompt_anchor(model)
    mixed = collate([history[0]] + pages + [history[1]], layout.pad_id, anchor=anchor)
    only_pages, only_history = collate(pages, layout.pad_id, anchor=anchor), collate(history, layout.pad_id, anchor=anchor)
    assert mixed["page_rows"].tolist() == [False, True, True, False]

    same = copy.deepcopy(model)
    _, extra = item_loss_with_ranking(model, same, only_history, layout, weight=3.0, replayed=True)
    assert extra["replay_kl"] == pytest.approx(0.0, abs=1e-6)

    teacher = copy.deepcopy(model)
    teacher.transformer.wte.weight.data.normal_()  # a teacher unlike the student
    total, extra = item_loss_with_ranking(model, teacher, mixed, layout, weight=3.0, replayed=True)
    _, pages_alone = item_loss_with_ranking(model, teacher, only_pages, layout, 3.0)
    _, history_alone = item_loss_with_ranking(model, teacher, only_history, layout, 3.0, replayed=True)
    assert "replay_kl" not in pages_alone and history_alone["rank_kl"] == 0.0
    assert extra["rank_kl"] == pytest.approx(pages_alone["rank_kl"], rel=1e-5) and extra["rank_kl"] > 0
    assert extra["replay_kl"] == pytest.approx(history_alone["replay_kl"], rel=1e-5) and extra["replay_kl"] > 0
    expected = float(item_token_loss(model, mixed, layout).detach()) + 3.0 * (extra["rank_kl"] + extra["replay_kl"])
    assert float(total.detach()) == pytest.approx(expected, rel=1e-5)
    # The replayed share is a fixed sample: the same rows for the same seed, all at 1.0.
    many = history * 50
    assert replay_sample(many, 1.0, 0) == many
    half = replay_sample(many, 0.5, 0)
    assert half == replay_sample(many, 0.5, 0) and 30 < len(half) < 70


def test_own_prefix_rewrites_the_page_rows_of_its_share_and_leaves_history_rows_alone():
    from pagellm.config import ConfigError
    from pagellm.train.sft_rows import own_prefix_batch, own_prefix_rows

    cfg = load_config(None, ["model.init.n_layer=1", "model.init.n_embd=32"]).model
    model, tok, layout = build_policy(cfg, Vocab.build(["u0", "u1"], [f"i{i}" for i in range(12)]), seed=0)
    model.eval()
    enc = PromptEncoder(tok, layout)
    pages = page_rows(enc, [0, 1, 0], [[1, 2], [3], [4]], [[5, 6, 7], [8, 9, 10], [11, 0]], 0.0, 0, "set")
    history = history_rows(enc, [0], [[3, 1, 4, 1, 5]], 50)
    batch = [pages[0], history[0], pages[1], pages[2]]
    out = own_prefix_batch(model, layout, enc, batch, share=0.5)  # the first two rows: a page and a history
    written = own_prefix_rows(model, layout, enc, [pages[0]])
    assert out == written + [history[0], pages[1], pages[2]]
    assert own_prefix_batch(model, layout, enc, [history[0], pages[1]], share=0.5) == [history[0], pages[1]]
    # ZeRO-3 ranks must decode in step, which mixed batches cannot promise: refused at load.
    with pytest.raises(ConfigError, match="history_replay"):
        load_config(None, ["sft.own_prefix=0.5", "sft.page_loss=set", "sft.history_replay=0.5",
                           "sft.zero_stage=3", "sft.workers=2"])


def test_rank_distill_needs_a_next_item_phase_to_be_its_teacher():
    from pagellm.config import ConfigError

    with pytest.raises(ConfigError, match="rank_distill"):
        load_config(None, ["sft.rank_distill=1.0", "sft.meta_epochs=0"])
    with pytest.raises(ConfigError, match="rank_distill"):
        load_config(None, ["sft.rank_distill=1.0", "sft.meta_epochs=2", "sft.item_loss=false"])
    assert load_config(None, ["sft.rank_distill=1.0", "sft.meta_epochs=2"]).sft.rank_distill == 1.0


def test_with_ranking_prior_adds_the_rows_first_logits_to_later_page_positions_only():
    """By hand: a page row's later positions get w x its first position's logits; its first
    position, a replayed history row's positions and a policy without a prior are unchanged."""
    from types import SimpleNamespace

    from pagellm.train.sft import with_ranking_prior

    logits = torch.arange(10, dtype=torch.float32).reshape(5, 2)  # positions 0-2: a page; 3-4: a history
    batch = {"label_rows": torch.tensor([0, 0, 0, 1, 1]), "page_rows": torch.tensor([True, False])}
    mixed = with_ranking_prior(logits, batch, SimpleNamespace(ranking_prior=2.0))
    expected = torch.tensor([[0.0, 1.0], [2 + 0.0, 3 + 2.0], [4 + 0.0, 5 + 2.0], [6.0, 7.0], [8.0, 9.0]])
    assert torch.equal(mixed, expected)
    assert with_ranking_prior(logits, batch, SimpleNamespace(ranking_prior=0.0)) is logits


def test_metadata_item_init_on_a_table_without_metadata_fails_before_training(tmp_path, monkeypatch):
    """model.item_init=metadata needs titles, brands or categories: an items table without
    them stops the stage before any training run starts."""
    import pandas as pd

    asked = _fake_sft_fits(tmp_path, monkeypatch, {"sft_meta": {"val_ndcg@10": [0.1]}, "sft": {"val_ndcg@10": [0.2]}})
    n = 20
    pd.DataFrame({"index": range(n), "item_id": [f"i{k}" for k in range(n)], "title": [None] * n,
                  "brand": [None] * n, "categories": [[]] * n}).to_parquet(tmp_path / "data" / "items.parquet")
    cfg = load_config(None, ["sft.meta_epochs=1", "sft.epochs=1", "model.item_init=metadata"])
    with pytest.raises(ValueError, match="item_init=metadata needs titles"):
        run_sft_stage(cfg, tmp_path, log=lambda *_: None)
    assert asked == {}
