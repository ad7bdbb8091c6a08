"""The Ray Train + DeepSpeed harness: ZeRO-2/3 training on 2 CPU workers, HF checkpoints, resume.

A 1-layer GPT-2 (n_embd=16) learns "next token = this token + 1 (mod V)". Three Ray Train
runs in all (each costs ~20 s of Ray start-up on a 2-core box), plus single-process
checks of the engine's save/load round trip for every ZeRO stage.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from pagellm.config import TrainCommon
from pagellm.train.deepspeed_config import train_ds_config
from pagellm.train.engine import format_progress, micro_batch_size

VOCAB, SEQ, ROWS = 32, 8, 64


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)  # same initial weights on every rank
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=1, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def counting_data() -> torch.Tensor:
    starts = torch.arange(ROWS) % VOCAB
    return (starts[:, None] + torch.arange(SEQ)[None, :]) % VOCAB


def lm_step(engine, batch):
    (ids,) = batch
    ids = ids.to(engine.device)
    out = engine(input_ids=ids, labels=ids)
    return out.loss, {"tokens": float(ids.numel())}


def train_loop(config: dict) -> None:
    """A stage's loop as the harness expects it (what SFT/reward will look like)."""
    import torch.distributed as dist
    from torch.utils.data import TensorDataset

    from pagellm.train.engine import build_engine, micro_batch_size, setup_distributed_for_deepspeed
    from pagellm.train.harness import distributed_loader, run_epochs

    train_cfg = TrainCommon.model_validate(config["train_cfg"])
    setup_distributed_for_deepspeed()
    model = tiny_gpt2()
    micro = micro_batch_size(train_cfg.batch_size, dist.get_world_size())
    loader = distributed_loader(TensorDataset(counting_data()), micro, shuffle=True, seed=0)
    engine = build_engine(model, None, train_cfg, len(loader) * train_cfg.epochs, train_cfg.use_gpu)
    trained = []

    def counted_step(engine, batch):
        trained.append(1)
        return lm_step(engine, batch)

    run_epochs(engine, loader, counted_step, epochs=train_cfg.epochs, name=config["run_name"],
               log_every=train_cfg.log_every)
    marker = Path(config["out"]) / f"{config['run_name']}_rank{dist.get_rank()}.json"
    marker.write_text(json.dumps({"trained_steps": len(trained)}))


def _cfg(**over) -> TrainCommon:
    base = dict(epochs=3, lr=3e-2, batch_size=8, warmup_ratio=0.1, workers=2, zero_stage=2, log_every=4)
    return TrainCommon(**{**base, **over})


@pytest.fixture(scope="module")
def ray_train(ray_local):
    # Workers cannot import this test module by name; ship its functions by value.
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray_local
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def zero2_run(ray_train, tmp_path_factory):
    from pagellm.train.harness import fit

    run_dir = tmp_path_factory.mktemp("zero2")
    result = fit(train_loop, {"out": str(run_dir)}, _cfg(epochs=2), run_dir, name="zero2")
    return run_dir, result


# --------------------------------------------------------------------------- Ray Train runs


def test_zero2_two_workers_learn_and_write_hf_checkpoint(zero2_run):
    from transformers import GPT2LMHeadModel

    run_dir, result = zero2_run
    losses = [record["train_loss"] for record in result.history]
    assert len(losses) == 2 and losses[1] < 0.8 * losses[0], losses
    steps_per_epoch = ROWS // 8  # 64 rows, global batch 8 over 2 workers
    assert result.metrics["step"] == 2 * steps_per_epoch and result.metrics["epoch"] == 2
    hf = Path(result.hf_path)
    assert (hf / "model.safetensors").exists() and (hf / "config.json").exists()
    assert Path(result.checkpoint_path).is_relative_to(run_dir.resolve() / "ray_train" / "zero2")
    # Both ranks' optimizer shards and RNG states were merged into the one checkpoint.
    ds_files = {p.name for p in (Path(result.checkpoint_path) / "deepspeed").rglob("*.pt")}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "rng_rank_0.pt", "rng_rank_1.pt"} <= ds_files
    reloaded = GPT2LMHeadModel.from_pretrained(hf)
    ids = counting_data()[:4]
    with torch.no_grad():
        assert reloaded(input_ids=ids, labels=ids).loss.item() < losses[0]


def test_fit_again_with_more_epochs_continues_from_checkpoint(zero2_run):
    from pagellm.train.harness import fit

    run_dir, first = zero2_run
    result = fit(train_loop, {"out": str(run_dir)}, _cfg(epochs=3), run_dir, name="zero2")
    steps_per_epoch = ROWS // 8
    # Only the new epoch was trained, on each worker ...
    for rank in (0, 1):
        marker = json.loads((run_dir / f"zero2_rank{rank}.json").read_text())
        assert marker["trained_steps"] == steps_per_epoch
    # ... on top of the restored history, and the step count carried on.
    assert result.history[:2] == first.history
    assert len(result.history) == 3 and result.metrics["step"] == 3 * steps_per_epoch
    assert result.history[2]["train_loss"] < first.history[1]["train_loss"]


def test_zero3_saves_full_weights_not_partitions(ray_train, tmp_path):
    from safetensors.torch import load_file

    from pagellm.train.harness import fit

    result = fit(train_loop, {"out": str(tmp_path)}, _cfg(epochs=1, zero_stage=3), tmp_path, name="zero3")
    saved = load_file(Path(result.hf_path) / "model.safetensors")
    expected = {k: tuple(v.shape) for k, v in tiny_gpt2().state_dict().items() if k in saved}
    assert set(expected) == set(saved) and "transformer.wte.weight" in saved
    assert {k: tuple(v.shape) for k, v in saved.items()} == expected
    assert all(v.numel() > 0 for v in saved.values())


# --------------------------------------------------------------------------- one rank, no Trainer


def _train_steps(engine, ids, steps):
    losses = []
    for _ in range(steps):
        loss, _ = lm_step(engine, (ids,))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _round_trip_every_stage(workdir: Path) -> dict:
    """Per ZeRO stage: train 3 steps, save, train 2 more; rebuild, load, train 2: same losses?"""
    from pagellm.train.engine import build_engine, load_training_state, save_training_state

    ids = counting_data()[:8]
    results = {}
    for stage in (0, 1, 2, 3):
        cfg = _cfg(workers=1, zero_stage=stage)
        engine = build_engine(tiny_gpt2(), None, cfg, total_steps=10, use_gpu=False)
        _train_steps(engine, ids, 3)
        save_training_state(engine, workdir / f"stage{stage}", client_state={"note": f"stage{stage}"})
        torch.manual_seed(123)  # the restored RNG must win over whatever ran in between
        expected = _train_steps(engine, ids, 2)
        fresh = build_engine(tiny_gpt2(), None, cfg, total_steps=10, use_gpu=False)
        note = load_training_state(fresh, workdir / f"stage{stage}")["note"]
        results[stage] = (expected, _train_steps(fresh, ids, 2), note)
    return results


def _run_epochs_with_fake_ray(workdir: Path, resume_from: Path | None, average_decay: float | None = None,
                              **kwargs):
    """run_epochs with ray.train.report/get_checkpoint replaced by a folder of copies;
    returns (state, reports, steps trained, the raw weights at the end)."""
    import shutil
    from unittest import mock

    import ray.train
    from torch.utils.data import TensorDataset

    from pagellm.train.engine import build_engine
    from pagellm.train.harness import distributed_loader, run_epochs
    from pagellm.train.weight_average import WeightAverage

    reports = []

    def fake_report(metrics, checkpoint=None, checkpoint_dir_name=None):
        dest = workdir / "reports" / checkpoint_dir_name
        shutil.copytree(checkpoint.path, dest)
        reports.append((dict(metrics), dest))

    restored = ray.train.Checkpoint.from_directory(str(resume_from)) if resume_from else None
    trained = []

    def counted_step(engine, batch):
        trained.append(1)
        return lm_step(engine, batch)

    with mock.patch("ray.train.report", fake_report), mock.patch("ray.train.get_checkpoint", lambda: restored):
        cfg = _cfg(workers=1, epochs=2)
        loader = distributed_loader(TensorDataset(counting_data()), 8, shuffle=True, seed=0)
        engine = build_engine(tiny_gpt2(), None, cfg, len(loader) * 2, use_gpu=False)
        if average_decay is not None:
            kwargs["average"] = WeightAverage(engine.module, average_decay)
        state = run_epochs(engine, loader, counted_step, epochs=2, name="t", log_every=100, **kwargs)
    raw = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    return state, reports, len(trained), raw


def loop_checks(workdir: str) -> dict:
    """Engine and run_epochs checks in one throw-away process with a one-rank gloo group.

    A separate process because DeepSpeed caches process groups in module globals.
    """
    import torch.distributed as dist

    from pagellm.train.engine import setup_distributed_for_deepspeed

    workdir = Path(workdir)
    dist.init_process_group("gloo", init_method=f"file://{workdir}/pg", rank=0, world_size=1)
    setup_distributed_for_deepspeed()
    out = {"round_trip": _round_trip_every_stage(workdir / "round_trip")}
    from pagellm.train.engine import build_engine

    engines = [build_engine(tiny_gpt2(), None, _cfg(workers=1, **over), 4, use_gpu=False)
               for over in ({}, {"adam_beta2": 0.98})]
    out["betas"] = [engine.optimizer.param_groups[0]["betas"] for engine in engines]

    # Interrupted after step 3 of 8 (mid-epoch) and resumed: same history as uninterrupted.
    full, reports, _, _ = _run_epochs_with_fake_ray(workdir / "full", None, checkpoint_every=3)
    mid = next(path for metrics, path in reports if metrics["step"] == 3)
    resumed, _, trained, _ = _run_epochs_with_fake_ray(workdir / "resumed", mid, checkpoint_every=3)
    out["mid_epoch"] = (full.history, resumed.history, trained, [m["step"] for m, _ in reports])

    # Early stop after the first epoch, with eval metrics; resuming it trains nothing more.
    val_ids = counting_data()[:4]
    stop_kwargs = dict(eval_fn=lambda engine: {"loss": lm_step(engine, (val_ids,))[0].item()},
                       should_stop=lambda history: history[-1]["val_loss"] < 100)
    stopped, reports, _, _ = _run_epochs_with_fake_ray(workdir / "stop", None, **stop_kwargs)
    again, _, trained_again, _ = _run_epochs_with_fake_ray(workdir / "stop2", reports[-1][1], **stop_kwargs)
    out["early_stop"] = (stopped.history, stopped.stopped, again.history, trained_again)

    # With a weight average: validated on and written to hf/ (the raw weights train on),
    # and a run resumed mid-epoch continues the same average.
    from safetensors.torch import load_file

    eval_kwargs = dict(eval_fn=stop_kwargs["eval_fn"], checkpoint_every=3)
    averaged, reports, _, raw = _run_epochs_with_fake_ray(workdir / "avg", None, average_decay=0.5, **eval_kwargs)
    last = reports[-1][1]
    hf = load_file(last / "hf" / "model.safetensors")
    shadow = load_file(last / "deepspeed" / "weight_average.safetensors")
    name = "transformer.h.0.mlp.c_fc.weight"
    mid = next(path for metrics, path in reports if metrics["step"] == 3)
    avg_resumed, _, _, _ = _run_epochs_with_fake_ray(workdir / "avg2", mid, average_decay=0.5, **eval_kwargs)
    unaveraged, _, _, _ = _run_epochs_with_fake_ray(workdir / "raw_eval", None, **eval_kwargs)  # the same run without it
    out["average"] = (torch.equal(hf[name], shadow[name]), torch.equal(hf[name], raw[name]),
                      [r["val_loss"] for r in averaged.history], [r["val_loss"] for r in unaveraged.history],
                      avg_resumed.history == averaged.history)

    dist.destroy_process_group()
    return out


@pytest.fixture(scope="module")
def loop_results(ray_train, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("loop")
    task = ray_train.remote(num_cpus=1, max_calls=1)(loop_checks)  # max_calls: a fresh process
    return workdir, ray_train.get(task.remote(str(workdir)))


def test_training_state_round_trip_is_exact_for_every_zero_stage(loop_results):
    from pagellm.train.engine import DEEPSPEED_SAFE_GLOBALS

    workdir, results = loop_results
    for stage, (expected, resumed, note) in results["round_trip"].items():
        assert note == f"stage{stage}"
        assert resumed == expected, f"ZeRO-{stage}: {resumed} != {expected}"
    # The files load with weights_only=True (what WeightsOnlyCheckpointEngine relies on).
    optim = next((workdir / "round_trip" / "stage2").rglob("*optim_states.pt"))
    with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
        assert torch.load(optim, weights_only=True)["ds_version"]


def test_the_engines_adamw_takes_the_configured_second_moment_decay(loop_results):
    assert [tuple(b) for b in loop_results[1]["betas"]] == [(0.9, 0.95), (0.9, 0.98)]


def test_mid_epoch_resume_matches_an_uninterrupted_run(loop_results):
    full, resumed, trained, report_steps = loop_results[1]["mid_epoch"]
    assert report_steps == [3, 6, 8, 9, 12, 15, 16]  # every 3 steps inside epochs, plus epoch ends
    assert trained == 16 - 3
    assert resumed == full and len(full) == 2


def test_early_stop_records_eval_and_stays_stopped(loop_results):
    history, stopped, history_again, trained_again = loop_results[1]["early_stop"]
    assert stopped and len(history) == 1 and "val_loss" in history[0] and "train_loss" in history[0]
    assert history_again == history and trained_again == 0


def test_a_weight_average_is_what_is_validated_and_published_and_resumes(loop_results):
    hf_is_average, hf_is_raw, averaged_val, raw_val, resumed_same = loop_results[1]["average"]
    assert hf_is_average and not hf_is_raw
    # Validation saw the averaged weights, not the raw ones (the same run without it).
    assert len(averaged_val) == len(raw_val) == 2 and averaged_val != raw_val
    assert resumed_same  # the restored average gives the same validation, epoch for epoch


# --------------------------------------------------------------------------- plain functions


def test_train_config_and_batch_split():
    cfg = train_ds_config(zero_stage=3, micro_batch_size=4, grad_accum=2, lr=1e-4, total_steps=100, warmup_steps=5,
                          betas=(0.9, 0.98))
    assert cfg["zero_optimization"] == {"stage": 3}
    assert cfg["optimizer"]["params"]["torch_adam"] is True and "train_batch_size" not in cfg
    assert cfg["scheduler"]["params"]["total_num_steps"] == 100 and cfg["optimizer"]["params"]["betas"] == [0.9, 0.98]
    offload = train_ds_config(zero_stage=3, micro_batch_size=4, lr=1e-4, total_steps=10, bf16=True, offload=True,
                              betas=(0.9, 0.95))
    assert offload["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert offload["optimizer"]["params"]["torch_adam"] is False and offload["bf16"]["enabled"]
    with pytest.raises(ValueError, match="stage"):
        train_ds_config(zero_stage=4, micro_batch_size=1, lr=1e-4, total_steps=1, betas=(0.9, 0.95))
    with pytest.raises(ValueError, match="offload"):
        train_ds_config(zero_stage=0, micro_batch_size=1, lr=1e-4, total_steps=1, offload=True, betas=(0.9, 0.95))
    assert micro_batch_size(32, 2) == 16 and micro_batch_size(32, 2, grad_accum=4) == 4
    with pytest.raises(ValueError, match="not divisible"):
        micro_batch_size(30, 4)


def test_progress_line():
    line = format_progress("sft", 2, 10, 140, 700, {"loss": 2.3141}, rate=12.3)
    assert line == "[sft] epoch 2/10 step 140/700 loss 2.314 12.3 it/s eta 0:45"
    assert format_progress("rm", 1, 1, 0, 5, {}) == "[rm] epoch 1/1 step 0/5"


def test_in_worker_runs_in_a_process_that_exits_after(ray_local):
    """A model loaded for one scoring call must not stay in the driver or in a reused worker."""
    import os
    import time

    import psutil

    from pagellm.train.harness import in_worker

    # A lambda travels by value: this test module is not importable in a worker.
    pid = lambda: __import__("os").getpid()  # noqa: E731
    first, second = in_worker(pid), in_worker(pid)
    assert os.getpid() not in (first, second)
    assert first != second  # not a reused worker
    deadline = time.time() + 30
    while psutil.pid_exists(first) and psutil.Process(first).status() != psutil.STATUS_ZOMBIE and time.time() < deadline:
        time.sleep(0.2)
    assert not psutil.pid_exists(first) or psutil.Process(first).status() == psutil.STATUS_ZOMBIE
