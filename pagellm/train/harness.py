"""Ray Train side of training: launch a TorchTrainer, checkpoint, resume, report progress.

Driver side (a job calls this after ray.init(); the library never starts Ray):

    result = fit(loop_fn, loop_config, train_cfg, run_dir, name="sft")
    result.metrics          last metrics rank 0 reported (epoch, step, train_loss, val_*, lr)
    result.hf_path          "<checkpoint>/hf": the HF model directory of the last checkpoint
    result.history          one metrics dict per finished epoch

`fit` runs `loop_fn(config)` on `train_cfg.workers` workers. `config` is `loop_config` plus
`config["train_cfg"]` (the `train_cfg` as a dict: validate it with the stage's own class,
e.g. `SFTConfig.model_validate(config["train_cfg"])`) and `config["run_name"]`.
Runs live under `run_dir/ray_train/<name>`; calling `fit` again with the same `run_dir` and
`name` resumes from that run's latest checkpoint (Ray Train V2 restores its checkpoint
manager from the run's storage folder; `ray.train.get_checkpoint()` then returns it), so
an interrupted stage continues, and a finished one asked for more epochs trains only
the new ones. `fresh=True` starts over.

Worker side (inside `loop_fn`; a stage's loop is about ten lines):

    def sft_loop(config):
        train_cfg = SFTConfig.model_validate(config["train_cfg"])
        setup_distributed_for_deepspeed()
        torch.manual_seed(seed)                        # same initial weights on every rank
        model = build_policy(...)
        loader = distributed_loader(dataset, micro_batch_size(train_cfg.batch_size, world),
                                    shuffle=True, seed=seed, collate_fn=collate)
        engine = build_engine(model, None, train_cfg, len(loader) * train_cfg.epochs, train_cfg.use_gpu)
        run_epochs(engine, loader, sft_step, epochs=train_cfg.epochs, name="sft",
                   log_every=train_cfg.log_every, save_fn=save_policy_and_vocab)

`step_fn(engine, batch)` returns the loss tensor, or `(loss, {"name": value, ...})`;
`run_epochs` does backward/step, logs, evaluates, checkpoints and resumes. A checkpoint
directory holds `hf/` (written by `save_fn`, rank 0), `deepspeed/` (model, optimizer,
scheduler shards and each rank's RNG) and `trainer_state.json` (epoch, step, position in
the epoch, history). Resuming mid-epoch skips the batches already trained on; this is
exact when the loader's order depends only on (seed, epoch), as `distributed_loader`'s does.
"""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from pagellm.config import TrainCommon
from pagellm.train.weight_average import WeightAverage
from pagellm.train.engine import (
    Progress,
    SaveFn,
    is_rank_zero,
    load_training_state,
    mean_across_ranks,
    save_hf_checkpoint,
    save_pretrained,
    save_training_state,
)

HF_SUBDIR = "hf"
DS_SUBDIR = "deepspeed"
STATE_FILE = "trainer_state.json"

StepFn = Callable[[Any, Any], "torch.Tensor | tuple[torch.Tensor, dict[str, Any]]"]


# ----------------------------------------------------------------------------- driver side


@dataclass(frozen=True)
class FitResult:
    metrics: dict[str, Any]
    checkpoint_path: str | None  # latest checkpoint (a local directory unless run_dir is a URI)
    best_checkpoint_path: str | None  # by `checkpoint_score`; the latest when none was given
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def hf_path(self) -> str | None:
        return f"{self.checkpoint_path}/{HF_SUBDIR}" if self.checkpoint_path else None


def in_worker(fn: Callable[..., Any], *args, gpus: float = 0) -> Any:
    """fn(*args) in a Ray worker process that exits when it returns (driver side).

    For a model a stage loads only to score something after training: in the driver its
    memory would outlive the call, because the allocator keeps a freed heap. A 1B reward
    model's held-out scores left ~6.5 GB in the driver that way, enough to push PPO's three
    1B actors past 24 GiB (docs/BENCHMARKS.md, "Llama-3.2-1B scale")."""
    import ray

    task = ray.remote(num_cpus=1, num_gpus=gpus, max_calls=1)(fn)
    return ray.get(task.remote(*args))


def _storage_path(run_dir: str | Path) -> str:
    text = str(run_dir)
    if "://" in text:  # a URI (s3://, gs://): Ray Train writes there through pyarrow
        return text.rstrip("/") + "/ray_train"
    return str((Path(text) / "ray_train").resolve())


def fit(
    loop_fn: Callable[[dict], None],
    loop_config: dict[str, Any],
    train_cfg: TrainCommon,
    run_dir: str | Path,
    name: str,
    *,
    max_failures: int = 1,
    checkpoint_score: tuple[str, str] | None = None,
    fresh: bool = False,
) -> FitResult:
    """Run `loop_fn` as a Ray Train job on `train_cfg.workers` workers; see the module doc.

    `max_failures`: worker-group restarts (each resumes from the latest checkpoint).
    `checkpoint_score`: `(metric, "min" | "max")` keeps the best checkpoint besides the latest.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    reserved = {"train_cfg", "run_name"} & set(loop_config)
    if reserved:
        raise ValueError(f"loop_config keys {sorted(reserved)} are reserved for fit()")
    storage = _storage_path(run_dir)
    if fresh:
        _delete_run(storage, name)
    score_attr, score_order = checkpoint_score or (None, "max")
    trainer = TorchTrainer(
        loop_fn,
        train_loop_config={**loop_config, "train_cfg": train_cfg.model_dump(), "run_name": name},
        scaling_config=ScalingConfig(
            num_workers=train_cfg.workers, use_gpu=train_cfg.use_gpu, resources_per_worker={"CPU": 1}
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=score_attr, checkpoint_score_order=score_order
            ),
            failure_config=FailureConfig(max_failures=max_failures),
            # DeepSpeed picks its accelerator when first imported; without this a CPU run on
            # a GPU node would try CUDA. env_vars merge with the job's own runtime_env.
            worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cuda" if train_cfg.use_gpu else "cpu"}},
        ),
    )
    result = trainer.fit()
    latest = result.checkpoint
    best = latest
    scored = [(ckpt, m[score_attr]) for ckpt, m in (result.best_checkpoints or []) if score_attr in m]
    if scored:  # mid-epoch checkpoints carry no epoch metrics and are never "best"
        pick = min if score_order == "min" else max
        best = pick(scored, key=lambda pair: pair[1])[0]
    history: list[dict[str, Any]] = []
    if latest is not None:  # read one small file, not the whole (possibly remote) checkpoint
        with latest.filesystem.open_input_stream(f"{latest.path}/{STATE_FILE}") as stream:
            history = json.loads(stream.read())["history"]
    return FitResult(
        metrics=dict(result.metrics or {}),
        checkpoint_path=latest.path if latest else None,
        best_checkpoint_path=best.path if best else None,
        history=history,
    )


def _delete_run(storage: str, name: str) -> None:
    if "://" in storage:
        import pyarrow.fs

        fs, root = pyarrow.fs.FileSystem.from_uri(storage)
        if fs.get_file_info(f"{root}/{name}").type != pyarrow.fs.FileType.NotFound:
            fs.delete_dir(f"{root}/{name}")
    else:
        shutil.rmtree(Path(storage) / name, ignore_errors=True)


# ----------------------------------------------------------------------------- worker side


def distributed_loader(
    dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0,
    collate_fn: Callable | None = None, drop_last: bool = False,
) -> DataLoader:
    """This rank's shard of `dataset`, `batch_size` rows per batch, in an order fixed by (seed, epoch).

    Every rank gets the same number of batches (the sampler pads by repeating rows), which
    DeepSpeed needs: a rank with an extra batch would wait forever in its all-reduce.

    Why not `ray.train.torch.prepare_data_loader` (Ray 2.60), which also adds a
    DistributedSampler: it builds that sampler with its default seed 0, so `seed` would not
    change the data order; with one worker it adds no sampler at all and keeps the
    loader's RandomSampler, whose order follows the global torch RNG, so resuming
    mid-epoch (`run_epochs` skips the batches already trained on) would not be exact; and
    it needs a Ray Train session, where this needs only a process group (tests make one by
    hand). Moving batches to the device, its other job, is one `.to(engine.device)` in
    each step function.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn, drop_last=drop_last)


@dataclass
class LoopState:
    """What a checkpoint restores besides the engine: where training stands."""

    epoch: int = 0  # epochs finished
    step: int = 0  # micro-batches trained, all epochs
    batch_in_epoch: int = 0  # micro-batches of the current epoch already trained
    epoch_sums: dict[str, float] = field(default_factory=dict)  # running sums of this epoch
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per finished epoch
    stopped: bool = False  # should_stop ended the run; a resumed run trains no further


def _split_step_output(out) -> tuple[torch.Tensor, dict[str, Any]]:
    if isinstance(out, tuple):
        loss, extra = out
        return loss, dict(extra)
    return out, {}


def _averaged(average: WeightAverage | None, engine):
    """The weights a stage validates and publishes: the average's when there is one."""
    return average.applied(engine.module) if average is not None else nullcontext()


def _save_and_report(engine, state: LoopState, metrics: dict[str, Any], save_fn: SaveFn,
                     average: WeightAverage | None = None) -> None:
    """Write a checkpoint from every rank (each its own files) and hand it to Ray Train.

    `hf/` holds the weights that were validated (the average's, with one); the DeepSpeed
    state the raw weights training resumes from, and the average beside them."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="pagellm_ckpt_") as tmp:
        tmp_dir = Path(tmp)
        with _averaged(average, engine):
            save_hf_checkpoint(engine, tmp_dir / HF_SUBDIR, save_fn)
        save_training_state(engine, tmp_dir / DS_SUBDIR)
        if is_rank_zero():
            (tmp_dir / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
            if average is not None:
                average.save(tmp_dir / DS_SUBDIR)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint_epoch{state.epoch:03d}_step{state.step:08d}",
        )


def restore_loop_state(engine, average: WeightAverage | None = None) -> LoopState:
    """Load the run's latest Ray Train checkpoint into `engine` (and `average`); a fresh
    state when there is none."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return LoopState()
    with checkpoint.as_directory() as local:
        load_training_state(engine, Path(local) / DS_SUBDIR)
        if average is not None:
            average.load(Path(local) / DS_SUBDIR, engine.device)
        return LoopState(**json.loads((Path(local) / STATE_FILE).read_text()))


def patience_exhausted(history: list[dict[str, Any]], key: str, patience: int, order: str = "max") -> bool:
    """Early stopping for `run_epochs(should_stop=...)`: True once `patience` epochs have
    passed since the best `key` (higher is better, or lower with order="min"); never
    without a `key` value."""
    values = [record[key] for record in history if key in record]
    if not values:
        return False
    pick = max if order == "max" else min
    best = pick(range(len(values)), key=values.__getitem__)  # the first of equals
    return len(values) - 1 - best >= patience


def _broadcast_flag(flag: bool) -> bool:
    """Rank 0's decision, on every rank (floating-point ties must not split the ranks)."""
    if not dist.is_initialized():
        return flag
    tensor = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def run_epochs(
    engine,
    loader: DataLoader,
    step_fn: StepFn,
    *,
    epochs: int,
    name: str,
    save_fn: SaveFn = save_pretrained,
    eval_fn: Callable[[Any], dict[str, float]] | None = None,
    should_stop: Callable[[list[dict[str, Any]]], bool] | None = None,
    log_every: int = 20,
    checkpoint_every: int = 0,
    average: WeightAverage | None = None,
) -> LoopState:
    """Train `epochs` epochs (continuing from the run's latest checkpoint) and report each.

    Per epoch: a progress line every `log_every` steps (rank 0, its running means), then
    `eval_fn(engine)` under no_grad in eval mode (per-rank means, averaged here and
    prefixed `val_`), a checkpoint + `ray.train.report` of `{epoch, step, lr, train_*, val_*}`,
    and `should_stop(history)` (rank 0 decides, e.g. early stopping on `val_loss`).
    `checkpoint_every > 0` adds a checkpoint every that many steps inside an epoch.
    `average` (a `WeightAverage`) is updated after every step and is what `eval_fn` sees
    and what the checkpoint's `hf/` holds; training continues on the raw weights.
    Every rank must run the same number of forward passes in `step_fn` and `eval_fn`
    (ZeRO-3 gathers weights collectively); `distributed_loader` shards guarantee that.
    Returns the final `LoopState` (its `history` is what `FitResult.history` holds).
    """
    state = restore_loop_state(engine, average)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"[{name}] the data loader is empty: nothing to train on")
    total = steps_per_epoch * epochs
    if state.step and is_rank_zero():
        print(f"[{name}] resumed at epoch {state.epoch + 1} step {state.step}", flush=True)
    progress = Progress(name, epochs, total, start_step=state.step)
    sampler = getattr(loader, "sampler", None)
    device = engine.device

    while state.epoch < epochs and not state.stopped:
        epoch = state.epoch
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        engine.train()
        sums: dict[str, float] = defaultdict(float, state.epoch_sums)
        for batch in itertools.islice(loader, state.batch_in_epoch, None):
            loss, extra = _split_step_output(step_fn(engine, batch))
            engine.backward(loss)
            engine.step()
            if average is not None:
                average.update(engine.module)
            state.step += 1
            state.batch_in_epoch += 1
            for key, value in {"loss": loss, **extra}.items():
                sums[key] += float(value.detach()) if torch.is_tensor(value) else float(value)
            state.epoch_sums = dict(sums)
            if state.step % log_every == 0 and state.batch_in_epoch < steps_per_epoch:  # epoch line follows
                means = {k: v / state.batch_in_epoch for k, v in sums.items()}
                progress.report(epoch + 1, state.step, means)
            if checkpoint_every and state.step % checkpoint_every == 0 and state.batch_in_epoch < steps_per_epoch:
                _save_and_report(engine, state, {"epoch": epoch, "step": state.step}, save_fn, average)

        train = mean_across_ranks({f"train_{k}": v / state.batch_in_epoch for k, v in sums.items()}, device)
        val: dict[str, float] = {}
        if eval_fn is not None:
            engine.eval()
            with torch.no_grad(), _averaged(average, engine):
                val = mean_across_ranks({f"val_{k}": v for k, v in eval_fn(engine).items()}, device)
            engine.train()
        record = {"epoch": epoch + 1, "step": state.step, "lr": float(engine.get_lr()[0]), **train, **val}
        state.history.append(record)
        state.epoch, state.batch_in_epoch, state.epoch_sums = epoch + 1, 0, {}
        progress.report(epoch + 1, state.step, {k: v for k, v in record.items() if k not in ("epoch", "step")})
        state.stopped = _broadcast_flag(bool(should_stop and should_stop(state.history)))
        if state.stopped and is_rank_zero():
            print(f"[{name}] stopping early after epoch {epoch + 1}", flush=True)
        _save_and_report(engine, state, record, save_fn, average)
    return state
