"""Worker side of training: one DeepSpeed engine per Ray Train worker.

Everything here runs INSIDE a training worker, after Ray Train has created the
torch.distributed process group (gloo on CPU, nccl on GPU). Nothing here imports Ray, so
the PPO learner actor, which sets up its own process group, can use it too.

API (in call order):

    setup_distributed_for_deepspeed()          make DeepSpeed reuse the existing process group
    micro_batch_size(batch_size, world_size)   per-worker batch for a global batch size
    engine = build_engine(model, None, train_cfg, total_steps, use_gpu)
    save_hf_checkpoint(engine, out_dir, save_fn)   full weights -> HF directory (rank 0 writes)
    save_training_state(engine, dir) / load_training_state(engine, dir)   exact resume
    report_progress(...)                       "[sft] epoch 2/10 step 140/700 loss 2.314 ..."

Decisions, and why:

- Model construction: the caller builds the full model on every rank (same seed), and
  `deepspeed.initialize` partitions it under ZeRO-3. That costs one full host-memory copy
  per worker for a moment, which is fine up to the ~1B models this project trains; a
  bigger model would be built under `deepspeed.zero.Init` (or transformers'
  `HfDeepSpeedConfig`) instead, and nothing else here would change.
- Full weights under ZeRO-3 are gathered one parameter at a time (`GatheredParameters`),
  so peak memory is the model on rank 0's CPU plus one parameter, never all of it twice.
- Resume uses DeepSpeed's own `save_checkpoint` / `load_checkpoint`, which know how to
  re-shard every ZeRO stage's optimizer and scheduler state. DeepSpeed loads those files
  with `torch.load(weights_only=False)`, i.e. it would unpickle arbitrary objects; the
  house rule is that optimizer state loads with `weights_only=True`. So every engine gets
  `WeightsOnlyCheckpointEngine`, which loads with `weights_only=True` and allows exactly
  the few DeepSpeed classes its ZeRO checkpoints contain (`DEEPSPEED_SAFE_GLOBALS`).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from pagellm.config import TrainCommon
from pagellm.train.deepspeed_config import train_ds_config

# Plain data holders that DeepSpeed pickles into its ZeRO checkpoints (found with
# torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO 0-3 checkpoints).
DEEPSPEED_SAFE_GLOBALS = [fragment_address, LossScaler, DynamicLossScaler, ZeroStageEnum]
DS_TAG = "state"  # one DeepSpeed tag per checkpoint directory

SaveFn = Callable[[torch.nn.Module, dict[str, torch.Tensor], Path], None]


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with `weights_only=True`."""

    def load(self, path: str, map_location=None):
        try:
            with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
                return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # name the classes to review instead of a bare unpickling error
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            raise RuntimeError(
                f"{path}: cannot load with weights_only=True ({exc}). Globals outside the "
                f"allow-list: {unsafe}. Review them and add them to DEEPSPEED_SAFE_GLOBALS."
            ) from exc


def is_rank_zero() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def setup_distributed_for_deepspeed() -> None:
    """Make DeepSpeed's communication layer wrap the process group Ray Train created.

    Call once per worker before building engines. On GPU, Ray Train has already pinned
    this worker's device; DeepSpeed picks its device from LOCAL_RANK, so LOCAL_RANK is
    aligned with that device. Outside Ray Train (a hand-made process group), LOCAL_RANK,
    RANK and WORLD_SIZE default to this process's values, which DeepSpeed requires. The first call on a CPU machine compiles DeepSpeed's small
    shared-memory communication op (about a minute, cached in ~/.cache/torch_extensions).
    """
    if not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call this inside a Ray Train TorchTrainer "
            "worker (or after torch.distributed.init_process_group)"
        )
    if dist.get_backend() == "nccl" and torch.cuda.is_available():
        os.environ["LOCAL_RANK"] = str(torch.cuda.current_device())
    # Ray Train sets these; a process group made by hand (the PPO learner, tests) may not.
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("RANK", str(dist.get_rank()))
    os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)


def micro_batch_size(batch_size: int, world_size: int, grad_accum: int = 1) -> int:
    """Per-worker batch so that micro x grad_accum x world_size == batch_size (global)."""
    per_step = world_size * grad_accum
    if batch_size % per_step:
        raise ValueError(
            f"batch_size {batch_size} is not divisible by workers x grad_accum = "
            f"{world_size} x {grad_accum}; pick a batch size that is"
        )
    return batch_size // per_step


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: matrices decay, biases and norm gains do not."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            shape = getattr(param, "ds_shape", param.shape)  # full shape even if partitioned
            (decay if len(shape) >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def disable_dropout(model: torch.nn.Module) -> None:
    """Every dropout layer of `model` to p = 0 (as TRL's disable_dropout_in_model)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def build_engine(
    model: torch.nn.Module,
    params: Iterable[Any] | None,
    train_cfg: TrainCommon,
    total_steps: int,
    use_gpu: bool,
    *,
    grad_accum: int = 1,
    offload: bool = False,
) -> deepspeed.DeepSpeedEngine:
    """Wrap `model` in a DeepSpeed engine configured from `train_cfg`.

    `params`: parameters or param groups to optimise; None = all trainable parameters,
    with weight decay on matrices only. `total_steps`: optimizer steps of the whole run
    (sets the warmup and decay of the learning rate). bf16 on GPU, fp32 on CPU.
    """
    world_size = dist.get_world_size()
    optimizer_steps = max(1, total_steps // grad_accum)
    ds_config = train_ds_config(
        zero_stage=train_cfg.zero_stage,
        micro_batch_size=micro_batch_size(train_cfg.batch_size, world_size, grad_accum),
        grad_accum=grad_accum,
        grad_clip=train_cfg.grad_clip,
        bf16=use_gpu,
        offload=offload,
        lr=train_cfg.lr,
        weight_decay=train_cfg.weight_decay,
        warmup_steps=round(train_cfg.warmup_ratio * optimizer_steps),
        total_steps=optimizer_steps,
        betas=(0.9, train_cfg.adam_beta2),
    )
    if params is None:
        params = weight_decay_groups(model, train_cfg.weight_decay)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config, dist_init_required=False)
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine()
    return engine


def full_state_dict(engine: deepspeed.DeepSpeedEngine) -> dict[str, torch.Tensor] | None:
    """The model's full, unpartitioned weights as CPU tensors on rank 0; None elsewhere.

    Collective under ZeRO-3: every rank must call it.
    """
    module = engine.module
    zero3 = engine.zero_optimization_stage() == 3
    rank0 = is_rank_zero()
    out: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], enabled=zero3):
            if rank0:
                # A copy: on CPU `.cpu()` would alias the live (ZeRO-3: soon freed) storage.
                out[name] = param.data.detach().to("cpu", copy=True)
    if not rank0:
        return None
    persistent = set(module.state_dict().keys())
    for name, buf in module.named_buffers():
        if name in persistent:
            out[name] = buf.detach().to("cpu", copy=True)
    return out


def save_pretrained(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
    """Default `save_fn`: a transformers model's `save_pretrained` (config + model.safetensors)."""
    if not hasattr(module, "save_pretrained"):
        raise TypeError(
            f"{type(module).__name__} has no save_pretrained; pass a save_fn(module, state_dict, out_dir)"
        )
    module.save_pretrained(out_dir, state_dict=state_dict)


def save_hf_checkpoint(engine: deepspeed.DeepSpeedEngine, out_dir: str | Path, save_fn: SaveFn = save_pretrained) -> None:
    """Gather the full weights and let rank 0 write them with `save_fn(module, state_dict, out_dir)`.

    Collective: every rank must call it. `save_fn` is where a stage adds what else its
    directory holds (vocab, tokenizer, a reward model's heads).
    """
    state_dict = full_state_dict(engine)
    if state_dict is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_fn(engine.module, state_dict, out_dir)
    dist.barrier()


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states, as types `torch.load(weights_only=True)` accepts."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(engine: deepspeed.DeepSpeedEngine, out_dir: str | Path, client_state: dict | None = None) -> None:
    """Model, optimizer, scheduler (DeepSpeed checkpoint) and this rank's RNG into `out_dir`.

    Collective. Each rank writes only its own files (`*rank_<r>*`), so per-rank directories
    can be merged into one, which is what Ray Train does with the workers' checkpoints.
    """
    out_dir = Path(out_dir)
    engine.save_checkpoint(str(out_dir), tag=DS_TAG, client_state=client_state or {})
    torch.save(rng_state(), out_dir / f"rng_rank_{dist.get_rank()}.pt")


def load_training_state(engine: deepspeed.DeepSpeedEngine, in_dir: str | Path) -> dict[str, Any]:
    """Restore what `save_training_state` wrote; returns its `client_state`.

    Needs the same world size and ZeRO stage as the run that saved it (DeepSpeed does
    not re-partition optimizer state); the RNG is restored only when this rank saved one.
    """
    in_dir = Path(in_dir)
    if not isinstance(engine.checkpoint_engine, WeightsOnlyCheckpointEngine):
        engine.checkpoint_engine = WeightsOnlyCheckpointEngine()
    path, client_state = engine.load_checkpoint(str(in_dir), tag=DS_TAG)
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint (tag {DS_TAG!r}) under {in_dir}")
    rng_file = in_dir / f"rng_rank_{dist.get_rank()}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return client_state or {}


def mean_across_ranks(values: dict[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """Average each value over all ranks (collective; same keys on every rank)."""
    if not values or not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    tensor /= dist.get_world_size()
    return dict(zip(keys, tensor.tolist()))


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def format_progress(
    name: str, epoch: int, epochs: int, step: int, total: int,
    metrics: dict[str, float], rate: float | None = None,
) -> str:
    """`[sft] epoch 2/10 step 140/700 loss 2.314 12.3 it/s eta 0:45` (epoch is 1-based)."""
    parts = [f"[{name}] epoch {epoch}/{epochs} step {step}/{total}"]
    parts += [f"{key} {value:.4g}" for key, value in metrics.items()]
    if rate:
        parts.append(f"{rate:.3g} it/s eta {_clock((total - step) / rate)}")
    return " ".join(parts)


class Progress:
    """Steps per second since this process started (so a resumed run's rate is honest)."""

    def __init__(self, name: str, epochs: int, total_steps: int, start_step: int = 0):
        self.name, self.epochs, self.total = name, epochs, total_steps
        self._start_step, self._start_time = start_step, time.perf_counter()

    def rate(self, step: int) -> float | None:
        elapsed = time.perf_counter() - self._start_time
        done = step - self._start_step
        return done / elapsed if done > 0 and elapsed > 0 else None

    def report(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        report_progress(self.name, epoch, self.epochs, step, self.total, metrics, self.rate(step))


def report_progress(
    name: str, epoch: int, epochs: int, step: int, total: int,
    metrics: dict[str, float], rate: float | None = None,
) -> None:
    """Print one progress line, on rank 0 only."""
    if is_rank_zero():
        print(format_progress(name, epoch, epochs, step, total, metrics, rate), flush=True)
