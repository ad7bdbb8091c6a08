"""Config errors surface when the config loads, naming the field and what it allows."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pagellm import names
from pagellm.config import ConfigError, load_config, save_config
from pagellm.eval.baselines.params import BASELINE_PARAMS, BASELINES

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "overrides, field, allowed",
    [
        (["ppo.advantage=nope"], "ppo.advantage", names.ADVANTAGE_ESTIMATORS),
        (["ppo.policy_loss=ppo2"], "ppo.policy_loss", names.POLICY_LOSSES),
        (["eval.baselines=[popularity, bpr]"], "eval.baselines.1", BASELINES),
        (["ppo.reward=best"], "ppo.reward", tuple(names.REWARD_HEADS)),
        (["eval.sasrec={hiden: 32}"], "eval.sasrec", tuple(BASELINE_PARAMS["sasrec"])),
        (["eval.ease={lambda: 32}"], "eval.ease", tuple(BASELINE_PARAMS["ease"])),
    ],
)
def test_unknown_names_fail_at_load_with_one_line_naming_field_and_choices(overrides, field, allowed):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert "\n" not in message
    assert f"{field}: unknown" in message
    assert message.endswith("allowed: " + ", ".join(allowed))


def test_every_declared_name_loads():
    for name in names.ADVANTAGE_ESTIMATORS:
        group = ["ppo.samples_per_prompt=4"] if name in names.GROUP_ESTIMATORS else []
        assert load_config(None, [f"ppo.advantage={name}", *group]).ppo.advantage == name
    for name in names.KL_ESTIMATORS:
        assert load_config(None, [f"ppo.kl_estimator={name}"]).ppo.kl_estimator == name
    for name in names.POLICY_LOSSES:
        assert load_config(None, [f"ppo.policy_loss={name}"]).ppo.policy_loss == name
    assert load_config(None, ["eval.baselines=[sasrec]", "guided.evaluator=[sasrec]",
                              "eval.sasrec={hidden: 16, epochs: 1}"]).eval.sasrec == {
        "hidden": 16, "epochs": 1}
    assert load_config(None, ["eval.ease={lambdas: [10, 20]}"]).eval.baseline_params("ease") == {"lambdas": [10, 20]}


def test_guided_evaluator_reads_its_older_forms_and_needs_its_models_in_the_evaluation():
    assert load_config(None, []).guided.evaluator == ["sasrec", "ease"]
    # Saved configs from before the evaluator took several models: one name, or none.
    assert load_config(None, ["guided.evaluator=sasrec"]).guided.evaluator == ["sasrec"]
    assert load_config(None, ["guided.evaluator=none"]).guided.evaluator == []
    with pytest.raises(ConfigError, match="more than once"):
        load_config(None, ["guided.evaluator=[ease,ease]"])
    # The published policy adds EASE's scores: the table must show EASE alone.
    with pytest.raises(ConfigError, match="eval.baselines leaves it out"):
        load_config(None, ["stage3.algorithm=guided", "eval.baselines=[popularity,sasrec]"])
    assert load_config(None, ["stage3.algorithm=guided", "eval.baselines=[sasrec]", "guided.evaluator=[sasrec]"])
    assert load_config(None, ["stage3.algorithm=ppo", "eval.baselines=[popularity]"])  # not guided: nothing to show


@pytest.mark.parametrize(
    "overrides, says",
    [
        (["ppo.advantage=grpo"], "set ppo.samples_per_prompt >= 2"),
        (["ppo.advantage=rloo", "ppo.samples_per_prompt=1"], "set ppo.samples_per_prompt >= 2"),
        (["ppo.samples_per_prompt=3"], "must be a multiple of ppo.samples_per_prompt"),  # batch 64
        (["ppo.hits_reward_weight=1.0"], "needs ppo.prompts=cuts"),
        (["ppo.model_reward_weight=0"], "all 0: nothing to optimise"),
        # reward.onpolicy_samples=0: the tiny default's on-policy pairs would need the prior first
        (["stage3.algorithm=ppo", "ppo.prior_reward_weight=1", "reward.page_prior=false",
          "reward.onpolicy_samples=0"], "needs the page prior"),
        (["stage3.algorithm=degre", "degre.value_model=page_prior", "reward.page_prior=false",
          "reward.onpolicy_samples=0"], "needs the page prior"),
        (["degre.policy_weight=-1"], "greater than or equal to 0"),
        (["ppo.kl_estimator=k4"], "allowed: k1, k2, k3"),
        (["eval.fidelity_samples=1"], "at least 2 samples per user"),
        (["eval.hr_pct_pages=99"], "HR@1% needs at least 100 random pages"),
        (["eval.hr_pct_pages=-1"], "greater than or equal to 0"),
        (["stage3.algorithm=guided", "reward.page_prior=false", "reward.onpolicy_samples=0"],
         "guided follows the page prior"),
        (["guided.guard=[ndcg10]"], "expected ndcg@K or hr@K"),
        (["guided.guard=[mrr@10]"], "expected ndcg@K or hr@K"),
        (["guided.penalties=[0.5, 0]"], "must all be > 0"),
        (["guided.margin=1.5"], "less than 1"),
    ],
)
def test_stage3_settings_that_cannot_work_fail_at_load(overrides, says):
    with pytest.raises(ConfigError, match=says) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)


def test_hr_pct_pages_zero_turns_it_off_and_100_is_enough():
    assert load_config(None, ["eval.hr_pct_pages=0"]).eval.hr_pct_pages == 0
    assert load_config(None, ["eval.hr_pct_pages=100"]).eval.hr_pct_pages == 100


def test_a_hits_only_reward_trains_no_reward_model():
    from jobs.pipeline import wanted

    cfg = load_config(None, ["stage3.algorithm=ppo", "ppo.model_reward_weight=0", "ppo.hits_reward_weight=1",
                             "ppo.prompts=cuts", "ppo.reward=sum"])
    assert not wanted(cfg, "reward") and wanted(cfg, "stage3")
    assert wanted(load_config(None), "reward")


@pytest.mark.parametrize(
    "overrides, module, folder, reward",
    [([], "jobs.guided", "guided", True),  # the embedded default (configs/tiny.yaml)
     (["stage3.algorithm=ppo"], "jobs.ppo", "ppo", True),
     (["stage3.algorithm=grpo"], "jobs.ppo", "grpo", True),
     (["stage3.algorithm=dpo"], "jobs.dpo", "dpo", False),  # offline pairs: no reward model
     (["stage3.algorithm=dpo", "dpo.on_policy=true"], "jobs.dpo", "dpo", True),
     (["stage3.algorithm=dpo", "dpo.on_policy=true", "dpo.ranker=next_item"], "jobs.dpo", "dpo", False),
     (["stage3.algorithm=degre"], "jobs.degre", "degre", False),
     (["stage3.algorithm=degre", "degre.value_model=page_prior"], "jobs.degre", "degre", True),  # the prior's fit
     (["stage3.algorithm=guided"], "jobs.guided", "guided", True)],
)
def test_stage3_algorithm_picks_the_module_the_folder_and_whether_a_reward_model_is_trained(
        overrides, module, folder, reward, tmp_path):
    from jobs.pipeline import stage_dir, stage_module, wanted
    from pagellm.runfolder import RunFolder

    cfg = load_config(None, overrides)
    assert stage_module(cfg, "stage3") == module and stage_module(cfg, "sft") == "jobs.sft"
    assert stage_dir(RunFolder(tmp_path), cfg, "stage3") == tmp_path / folder
    assert wanted(cfg, "stage3") and wanted(cfg, "reward") == reward
    off = load_config(None, ["stage3.algorithm=none"])
    assert not wanted(off, "stage3") and not wanted(off, "reward")


def test_grpo_is_the_rl_loop_with_group_presets_that_an_explicit_setting_overrides():
    cfg = load_config(None, ["stage3.algorithm=grpo"])
    assert (cfg.ppo.advantage, cfg.ppo.samples_per_prompt) == ("grpo", 4)
    cfg = load_config(None, ["stage3.algorithm=grpo", "ppo.advantage=rloo", "ppo.samples_per_prompt=8"])
    assert (cfg.ppo.advantage, cfg.ppo.samples_per_prompt) == ("rloo", 8)
    with pytest.raises(ConfigError, match="stage3.algorithm=grpo compares the pages of one prompt"):
        load_config(None, ["stage3.algorithm=grpo", "ppo.advantage=reinforce"])


def test_a_saved_run_config_switched_to_grpo_gets_the_group_presets(tmp_path):
    save_config(load_config(None, ["stage3.algorithm=none"]), tmp_path / "config.yaml")  # every field written
    cfg = load_config(tmp_path / "config.yaml", ["stage3.algorithm=grpo"])
    assert (cfg.ppo.advantage, cfg.ppo.samples_per_prompt) == ("grpo", 4)


def test_retired_ppo_enabled_and_publish_read_as_the_stage3_keys(tmp_path):
    old = tmp_path / "old.yaml"  # a config from before the stage3 section: no stage3 keys of its own
    old.write_text("seed: 0\n")
    assert load_config(old, ["ppo.enabled=false"]).stage3.algorithm == "none"
    assert load_config(old, ["ppo.enabled=true"]).stage3.algorithm == "ppo"
    assert load_config(old, ["ppo.publish=last"]).stage3.publish == "last"
    for conflict in (["ppo.enabled=false", "stage3.algorithm=dpo"], ["ppo.enabled=true", "stage3.algorithm=none"],
                     ["ppo.publish=last", "stage3.publish=best_val"]):
        with pytest.raises(ConfigError, match="removed") as err:
            load_config(old, conflict)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="removed"):  # the embedded default says guided
        load_config(None, ["ppo.enabled=true"])
    with pytest.raises(ConfigError, match="unknown pair family 'clicks'"):
        load_config(None, ["stage3.algorithm=dpo", "dpo.families=[ranking, clicks]"])


def test_baselines_listed_twice_fail():
    with pytest.raises(ConfigError, match="eval.baselines: baselines listed more than once: sasrec"):
        load_config(None, ["eval.baselines=[sasrec, popularity, sasrec]"])


@pytest.mark.parametrize(
    "ppo_reward, reward_heads, ok",
    [("sum", "sum", True), ("coarse", "sum", True), ("fine", "sum", True),
     ("coarse", "coarse", True), ("fine", "fine", True),
     ("fine", "coarse", False), ("coarse", "fine", False), ("sum", "coarse", False), ("sum", "fine", False)],
)
def test_ppo_reward_needs_heads_the_reward_model_trains(ppo_reward, reward_heads, ok):
    overrides = ["stage3.algorithm=ppo", f"ppo.reward={ppo_reward}", f"reward.heads={reward_heads}"]
    if ok:
        assert load_config(None, overrides).ppo.reward == ppo_reward
        return
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert "\n" not in message and "ppo.reward:" in message and f"reward.heads={reward_heads!r}" in message
    assert message.endswith(f"allowed with it: {reward_heads}")
    # Without PPO nothing reads ppo.reward.
    assert load_config(None, overrides + ["stage3.algorithm=none"]).reward.heads == reward_heads


def test_page_length_has_one_source(tmp_path):
    cfg = load_config(None, ["data.page_len=7"])
    assert "page_len" not in cfg.model_dump()["eval"]
    assert not hasattr(cfg.eval, "page_len")
    # A run config saved before eval.page_len was retired still loads when the two agree ...
    old = tmp_path / "config.yaml"
    save_config(cfg, old)
    old.write_text(old.read_text().replace("eval:\n", "eval:\n  page_len: 7\n"))
    assert load_config(old).data.page_len == 7
    # ... and names the field to set when they do not.
    with pytest.raises(ConfigError, match=r"eval.page_len: removed; the page length is data.page_len"):
        load_config(None, ["eval.page_len=5"])


def test_registries_are_built_from_the_declared_names():
    from pagellm.rl.registry import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, POLICY_LOSSES, register_policy_loss

    assert tuple(sorted(ADVANTAGE_ESTIMATORS)) == tuple(sorted(names.ADVANTAGE_ESTIMATORS))
    assert tuple(sorted(POLICY_LOSSES)) == tuple(sorted(names.POLICY_LOSSES))
    assert tuple(sorted(KL_ESTIMATORS)) == tuple(sorted(names.KL_ESTIMATORS))
    with pytest.raises(ValueError, match="not declared in pagellm/names.py"):
        register_policy_loss("my_loss")
    assert "my_loss" not in POLICY_LOSSES


def test_baseline_table_is_what_the_baselines_use():
    from pagellm.eval.baselines import make_baseline
    from pagellm.eval.baselines.sasrec import DEFAULTS, SASRec
    from pagellm.models.reward import HEAD_CHOICES

    assert DEFAULTS is BASELINE_PARAMS["sasrec"] and HEAD_CHOICES is names.REWARD_HEADS
    assert SASRec({"hidden": 8}).params == {**DEFAULTS, "hidden": 8}
    for name in BASELINES:
        assert make_baseline(name).name == name
    with pytest.raises(ValueError, match=r"unknown popularity parameters \['hidden'\]; known: none"):
        make_baseline("popularity", {"hidden": 8})


def test_loading_a_config_imports_no_torch():
    code = "import sys, pagellm.config; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


@pytest.mark.parametrize(
    "settings, field",
    [(["ppo.advantage=nope"], "ppo.advantage"), (["ppo.policy_loss=nope"], "ppo.policy_loss"),
     (["eval.baselines=[nope]"], "eval.baselines.0"), (["stage3.algorithm=ppo", "reward.heads=coarse"], "ppo.reward")],
)
def test_pagellm_run_rejects_a_bad_config_at_once(settings, field):
    """`pagellm run --set ...` (even without --out): exit 2 in well under 10 s, one line on stderr."""
    t0 = time.perf_counter()
    args = [arg for s in settings for arg in ("--set", s)]
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "run", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and time.perf_counter() - t0 < 10
    (line,) = proc.stderr.splitlines()
    assert line.startswith("error: invalid config") and f"{field}: " in line and "allowed" in line
    assert proc.stdout == ""


def test_a_catalogue_too_large_for_ease_fails_once_the_data_stage_knows_it(tmp_path):
    """Before any training: the evaluation's EASE would need an n_items^2 inverse."""
    from types import SimpleNamespace

    from jobs.pipeline import check_catalogue

    (tmp_path / "stats.json").write_text(json.dumps({"items": 300}))
    folder = SimpleNamespace(data=tmp_path)
    check_catalogue(folder, load_config(None, []))  # 300 items: fine
    with pytest.raises(ValueError, match="remove ease from eval.baselines"):
        check_catalogue(folder, load_config(None, ["eval.ease={max_items: 299}"]))
    check_catalogue(folder, load_config(None, ["eval.ease={max_items: 299}", "eval.baselines=[popularity,sasrec]",
                                               "guided.evaluator=[sasrec]"]))
