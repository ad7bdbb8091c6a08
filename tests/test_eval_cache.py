"""Evaluation's output cache (pagellm/eval/output_cache.py): keys follow the inputs, stored
lists and weights round-trip, and a run that reuses them scores exactly what a fresh one does."""

import json
import shutil

import numpy as np
import pytest
import torch

from pagellm.config import load_config
from pagellm.data.pipeline import run_data_stage
from pagellm.eval.baselines import make_baseline
from pagellm.eval.output_cache import CACHE_DIR, OutputCache, files_key, input_key
from pagellm.models.policy import build_policy, save_policy
from pagellm.vocab import Vocab

SMALL = ["data.simulator.users=40", "data.simulator.items=40", "data.simulator.categories=4",
         "data.simulator.interactions_per_user=20", "model.init.n_layer=1", "model.init.n_embd=32",
         "eval.sasrec.epochs=2", "eval.sasrec.verbose=false", "eval.fidelity_samples=0", "eval.hr_pct_pages=100",
         "eval.list_len=20"]


def test_keys_follow_the_inputs_not_their_order_or_container(tmp_path):
    assert input_key({"a": 1, "b": [2, 3]}, [[1, 2]]) == input_key({"b": [2, 3], "a": 1}, [[1, 2]])
    assert input_key([{3, 1, 2}]) == input_key([[1, 2, 3]])  # a set keys as its sorted items
    assert input_key({"a": 1}, [[1, 2]]) != input_key({"a": 1}, [[2, 1]])  # order inside a list matters
    assert input_key([1], [2]) != input_key([1, 2])  # parts are delimited
    (tmp_path / "w.bin").write_bytes(b"abc")
    first = files_key(tmp_path)
    (tmp_path / "w.bin").write_bytes(b"abd")
    assert files_key(tmp_path) != first
    second = files_key(tmp_path)
    (tmp_path / "checkpoints" / "step_1").mkdir(parents=True)  # an RL run's checkpoints: not the policy
    (tmp_path / "checkpoints" / "step_1" / "w.bin").write_bytes(b"x")
    assert files_key(tmp_path) == second
    (tmp_path / "evaluator").mkdir()  # a guided policy's evaluator: its pages depend on it
    (tmp_path / "evaluator" / "model.safetensors").write_bytes(b"y")
    assert files_key(tmp_path) != second


def test_lists_and_weights_round_trip(tmp_path):
    cache = OutputCache(tmp_path / "c")
    assert cache.lists("policy", "k") is None and cache.state("sasrec", "k") is None
    cache.put_lists("policy", "k", [[3, 1, 2], [], [7]])  # a list may be shorter, or empty
    assert cache.lists("policy", "k") == [[3, 1, 2], [], [7]]
    cache.put_state("sasrec", "k", {"w": torch.arange(6.0).reshape(2, 3)})
    assert torch.equal(cache.state("sasrec", "k")["w"], torch.arange(6.0).reshape(2, 3))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["policy-k.parquet", "sasrec-k.safetensors"]


@pytest.fixture(scope="module")
def run_template(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_cache") / "run"
    cfg = load_config(None, SMALL)
    run_data_stage(cfg, root / "data", log=lambda *_: None)
    model, tok, layout = build_policy(cfg.model, Vocab.from_parquet(root / "data" / "vocab.parquet"), seed=0)
    save_policy(model, tok, layout, root / "sft")
    return root


def _models(metrics: dict) -> dict:
    return {name: {k: v for k, v in m.items() if k != "seconds"} for name, m in metrics["models"].items()}


def test_a_run_that_reuses_the_cache_scores_what_a_fresh_run_does(run_template, tmp_path):
    from pagellm.eval.runner import run_eval_stage

    cfg = load_config(None, SMALL)
    fresh, variant = tmp_path / "fresh", tmp_path / "variant"
    shutil.copytree(run_template, fresh)
    lines: list[str] = []
    first = run_eval_stage(cfg, fresh, log=lines.append)
    assert not any("reusing" in line for line in lines)
    assert {p.name.split("-")[0] for p in (fresh / CACHE_DIR).iterdir()} == {"sasrec", "ease", "lightgcn", "policy"}

    # A variant of the run (bench/quality.py run_variant): the same data and SFT policy, the
    # seed's cache copied beside them. Nothing is fitted or written again, and every metric
    # but the timing is what the fresh evaluation computed.
    shutil.copytree(run_template, variant)
    shutil.copytree(fresh / CACHE_DIR, variant / CACHE_DIR)
    lines.clear()
    again = run_eval_stage(cfg, variant, log=lines.append)
    assert sum("reusing" in line for line in lines) == 4  # SASRec's, EASE's and LightGCN's fits and the SFT lists
    assert _models(again) == _models(first)
    assert json.loads((variant / "eval" / "metrics.json").read_text())["models"]["sft"]["hr@10"] == \
        first["models"]["sft"]["hr@10"]

    # Other SASRec settings or other policy weights are other keys: computed, not read.
    lines.clear()
    with torch.no_grad():
        from safetensors.torch import load_file, save_file

        weights = load_file(variant / "sft" / "model.safetensors")
        weights = {k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()}
        save_file(weights, str(variant / "sft" / "model.safetensors"), metadata={"format": "pt"})
    run_eval_stage(load_config(None, SMALL + ["eval.sasrec.epochs=1"]), variant, log=lines.append)
    reused = [line for line in lines if "reusing" in line]
    assert len(reused) == 2 and any("ease: reusing" in x for x in reused) and any("lightgcn: reusing" in x for x in reused)
    assert len(list((variant / CACHE_DIR).iterdir())) == 6  # EASE and LightGCN once; SASRec and the lists twice


def test_sasrec_selects_its_epoch_on_the_validation_step_only_in_a_test_evaluation(run_template, capsys):
    """As the policy does, SASRec keeps its best epoch on validation (not a fixed count) when
    test is evaluated; evaluating the validation split itself leaves nothing to select on."""
    import pandas as pd

    from pagellm.eval.runner import baseline_output, load_eval_set

    test, val = load_eval_set(run_template / "data", "test", None), load_eval_set(run_template / "data", "val", None)
    evals = pd.read_parquet(run_template / "data" / "eval.parquet")
    assert val.val_targets is None and val.val_histories is None
    assert test.val_targets == [list(v) for v in evals["val_items"] if len(v)]  # validation items, never test
    assert test.val_histories == [list(h) for h, v in zip(evals["train_positives"], evals["val_items"]) if len(v)]
    params = {"epochs": 3, "fixed_epochs": 2, "patience": 100, "verbose": True}
    capsys.readouterr()
    baseline_output("sasrec", params, test, 10, seed=0)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("sasrec epoch")]
    assert len(lines) == 3 and all("/3" in ln and "val ndcg@10" in ln for ln in lines)
    baseline_output("sasrec", params, val, 10, seed=0)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("sasrec epoch")]
    assert len(lines) == 2 and not any("val ndcg@10" in ln for ln in lines)


def test_lightgcn_gets_each_rows_user_and_its_cached_fit_scores_the_same(run_template, tmp_path):
    """LightGCN scores users (graph nodes): the evaluation hands it the user index of every
    training sequence, validation history and evaluated user, and its fit is cached like SASRec's."""
    import pandas as pd

    from pagellm.eval.output_cache import OutputCache
    from pagellm.eval.runner import baseline_output, load_eval_set

    evals = pd.read_parquet(run_template / "data" / "eval.parquet")
    test = load_eval_set(run_template / "data", "test", None)
    assert test.train_users == [int(u) for u, s in zip(evals["user_index"], evals["train_positives"]) if len(s)]
    assert test.val_users == [int(u) for u, v in zip(evals["user_index"], evals["val_items"]) if len(v)]
    assert len(test.train_users) == len(test.train_sequences) and len(test.val_users) == len(test.val_histories)
    params = {"dim": 8, "epochs": 4, "eval_every": 2, "verbose": False, "threads": 1}
    cache, lines = OutputCache(tmp_path / "cache"), []
    fitted = baseline_output("lightgcn", params, test, 10, seed=0, cache=cache, log=lines.append)
    assert all(not set(page) & seen for page, seen in zip(fitted.lists, test.exclude))
    again = baseline_output("lightgcn", params, test, 10, seed=0, cache=cache, log=lines.append)
    assert any("lightgcn: reusing its fit" in line for line in lines)
    assert again.lists == fitted.lists and np.array_equal(again.scores(0, 5), fitted.scores(0, 5))
    # A user's scores are its node's: the same history under another user's index scores differently.
    model = make_baseline("lightgcn", params)
    (saved,) = cache.directory.glob("lightgcn-*.safetensors")
    model.restore(cache.state("lightgcn", saved.stem.split("-", 1)[1]), test.n_items)
    h = test.histories[0]
    assert not np.allclose(model.score([h], users=[test.train_users[0]]), model.score([h], users=[test.train_users[1]]))
