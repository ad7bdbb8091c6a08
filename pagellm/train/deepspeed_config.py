"""DeepSpeed configs as plain dicts, built by functions (after OpenRLHF's deepspeed_utils).

One builder, `train_ds_config(...)`, for a model that is trained (SFT policy, reward model,
PPO learner): ZeRO stage 0-3, AdamW with weight decay, linear warmup then linear decay
(`WarmupDecayLR`), gradient clipping, bf16 on GPU / fp32 on CPU, optional CPU offload.
Frozen models (the PPO reference, the reward model while scoring) are plain modules in
the reward actor and the serve replicas, not DeepSpeed engines, so they need no config.

Optimizer choice (why not DeepSpeed's default FusedAdam): FusedAdam and DeepSpeedCPUAdam
are C++/CUDA ops that DeepSpeed compiles on first use, which needs a toolchain on every
node and takes minutes on a small CPU box. `torch_adam: true` makes DeepSpeed build
`torch.optim.AdamW` itself from this config, which runs under every ZeRO stage (0-3) on
CPU and GPU with no compilation and keeps the optimizer a DeepSpeed-supported one (no
`zero_allow_untested_optimizer`). Only `offload=True` switches to DeepSpeedCPUAdam,
because ZeRO-Offload requires it.

`train_batch_size` is left out on purpose: DeepSpeed derives it as
micro_batch_size x grad_accum x world size, so one config serves any worker count.
"""

from __future__ import annotations

from typing import Any

# Keep DeepSpeed's own periodic logging out of our progress lines.
_NEVER = 10**9


def _zero_section(zero_stage: int, offload: bool) -> dict[str, Any]:
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    zero: dict[str, Any] = {"stage": zero_stage}
    if offload:
        if zero_stage == 0:
            raise ValueError("offload needs ZeRO stage 1, 2 or 3 (stage 0 has nothing to offload)")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return zero


def train_ds_config(
    *,
    zero_stage: int,
    micro_batch_size: int,
    grad_accum: int = 1,
    grad_clip: float = 1.0,
    bf16: bool = False,
    offload: bool = False,
    lr: float,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    total_steps: int,
    betas: tuple[float, float],
    eps: float = 1e-8,
) -> dict[str, Any]:
    """DeepSpeed config for a trained model.

    `total_steps` and `warmup_steps` count optimizer steps (micro-batches / grad_accum).
    `grad_clip <= 0` turns clipping off. `betas` has no default: the training config's
    `adam_beta2` (pagellm/config/sections.py) is its one definition.
    """
    if micro_batch_size < 1 or grad_accum < 1:
        raise ValueError(f"micro_batch_size and grad_accum must be >= 1, got {micro_batch_size}, {grad_accum}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in 0..total_steps ({total_steps}), got {warmup_steps}")
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": float(grad_clip) if grad_clip > 0 else 0.0,
        "zero_optimization": _zero_section(zero_stage, offload),
        "bf16": {"enabled": bool(bf16)},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": lr,
                "betas": list(betas),
                "eps": eps,
                "weight_decay": weight_decay,
                "torch_adam": not offload,
            },
        },
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": lr,
                # DeepSpeed rejects 0 warmup steps; 1 is the closest to "no warmup".
                "warmup_num_steps": max(1, warmup_steps),
                "total_num_steps": total_steps,
                "warmup_type": "linear",
            },
        },
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
    }
