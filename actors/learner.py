"""Learner actor: PPO updates of policy + value head in a DeepSpeed engine, weight publishing
and checkpoints. One process with a world-size-1 process group (one GPU at most); the engine
comes from pagellm/train/engine.py, as for the SFT and reward workers.

The learner is the source of truth for the run's position (step, policy version, batches
trained and dropped): it judges staleness and writes checkpoints itself, between two
updates, so the driver can queue work ahead without ever racing it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import ray
import torch

from pagellm.config import Config, TrainCommon
from pagellm.eval.probe import RankingProbe, best_record, val_metric
from pagellm.models.policy import adapter_weights, save_policy, stage3_policy
from pagellm.rl.ppo_update import (
    PolicyWithValue,
    ScoredBatch,
    admit_batch,
    merge_shards,
    minibatches,
    prepare_batch,
)
from pagellm.rl.kl_control import adaptive_kl_beta
from pagellm.rl.stats import RunningMoments
from pagellm.rl.value_head import ValueHead
from pagellm.vocab import PromptEncoder


def _init_process_group() -> None:
    """A one-process gloo group: DeepSpeed needs torch.distributed even for world size 1."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


@ray.remote(num_cpus=1, max_restarts=0)
class LearnerActor:
    def __init__(self, policy_dir: str, cfg: dict, total_updates: int, checkpoint_root: str, data_dir: str) -> None:
        from pagellm.train.engine import build_engine, setup_distributed_for_deepspeed

        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
        self.cfg = Config.model_validate(cfg)
        ppo = self.cfg.ppo
        torch.manual_seed(self.cfg.seed)
        _init_process_group()
        setup_distributed_for_deepspeed()
        # Under LoRA: the merged SFT policy with a fresh adapter; the reference is its
        # adapter disabled, computed by the rollout actors (pagellm/rl/reference.py).
        policy, self.tokenizer, self.layout = stage3_policy(policy_dir, self.cfg.model, trainable=True,
                                                            seed=self.cfg.seed)
        policy.eval()  # no dropout: the learner's logprobs must match the rollout's
        value_head = ValueHead(policy.config.hidden_size if hasattr(policy, "config") else policy.base_model.config.hidden_size)
        self.module = PolicyWithValue(policy, self.layout, value_head, ppo)
        train_cfg = TrainCommon(epochs=1, lr=ppo.lr, batch_size=ppo.mini_batch_size, grad_clip=ppo.grad_clip,
                                warmup_ratio=0.0, zero_stage=ppo.zero_stage, use_gpu=ppo.use_gpu)
        self.engine = build_engine(self.module, None, train_cfg, max(1, total_updates), ppo.use_gpu)
        self.moments: dict[str, RunningMoments] = {}  # per reward part (ppo_update.combine_parts)
        self.kl_beta = ppo.kl_beta  # moves toward ppo.kl_target when one is set
        self.generator = torch.Generator().manual_seed(self.cfg.seed)
        self.checkpoint_root = Path(checkpoint_root)
        self.step = 0  # PPO steps (batches) trained
        self.version = 0  # bumps once per step: the weights rollouts are tagged with
        self.next_batch = 0  # the first batch id not yet consumed (trained or dropped)
        self.stale_dropped = 0
        self.trained_ids: list[int] = []
        # Validation picks what is published (stage3.publish=best_val): the SFT policy's own
        # score is the bar (step 0), so stage 3 never publishes a policy worse on validation.
        # Scored on the stage-3 half of the validation users: SFT picked its epoch on the other
        # half, so its score here is not inflated by that pick (pagellm/eval/probe.py).
        self.probe = RankingProbe.from_data(Path(data_dir), PromptEncoder(self.tokenizer, self.layout),
                                            self.cfg.data.page_len, self.cfg.sft.val_users, part="stage3")
        # Step 0 (the SFT weights) is scored before the first update, not here: a resumed
        # learner restores the history instead and would throw this probe away.
        self.val_history: list[dict] = []
        self.idle_since = time.perf_counter()

    def _validate(self) -> dict[str, float]:
        """Validation NDCG/HR of the current policy's greedy pages (pagellm/eval/probe.py)."""
        policy = self.module.policy
        with torch.inference_mode():
            scores = self.probe(policy, self.layout)
        return {f"val_{k}": v for k, v in scores.items()}

    def best_val(self) -> dict:
        return best_record(self.val_history, val_metric(self.cfg.data.page_len))

    def trainable_weights(self) -> dict[str, torch.Tensor]:
        """What rollout actors need (only the adapter and the new token rows under LoRA)."""
        return adapter_weights(self.module.policy)

    @ray.method(num_returns=2)
    def publish(self) -> tuple[int, dict[str, torch.Tensor]]:
        """(version, weights) of the current policy: two objects, so a reader of the version
        (the broker) never has to fetch the tensors."""
        self.idle_since = time.perf_counter()
        return self.version, self.trainable_weights()

    @ray.method(num_returns=3)
    def train(self, batch_id: int, *shards: ScoredBatch) -> tuple[dict, int, dict[str, torch.Tensor]]:
        """Train on one scored batch, or drop it if its weights are more than
        `ppo.max_staleness` versions old; returns (stats, version, weights) after it.

        Shards arrive as top-level arguments, so Ray hands them over straight from the
        reward actors' outputs: the batch never passes through the driver."""
        t0 = time.perf_counter()
        batch = merge_shards(list(shards))
        admitted, staleness = admit_batch(batch_id, batch.policy_version, learner_version=self.version,
                                          next_batch=self.next_batch, trained_ids=self.trained_ids,
                                          max_staleness=self.cfg.ppo.max_staleness)
        self.next_batch = batch_id + 1
        common = {"batch_id": batch_id, "staleness": staleness, "learner_idle_s": t0 - self.idle_since,
                  **batch.timings}
        if not admitted:
            self.stale_dropped += 1
            stats = {"dropped": True, "stale_dropped": self.stale_dropped, "policy_version": self.version,
                     "sampled_version": batch.policy_version, **common}
        else:
            if not self.val_history:  # still the SFT weights: the bar every checkpoint must beat
                self.val_history.append({"step": 0, **self._validate()})
            stats = {**self._update(batch), "dropped": False, "stale_dropped": self.stale_dropped, **common}
            self.trained_ids.append(batch_id)
            stats["learner_seconds"] = time.perf_counter() - t0
            if self.step % self.cfg.ppo.checkpoint_every == 0 or self.step == self.cfg.ppo.steps:
                stats.update(self._checkpoint_validation())
                self.save(str(self.checkpoint_root / f"step_{self.step:06d}"))
                keep = f"step_{self.best_val()['step']:06d}"  # what stage3.publish=best_val publishes
                for old in sorted(self.checkpoint_root.glob("step_*"))[:-2]:  # and the last two
                    if old.name != keep:
                        shutil.rmtree(old, ignore_errors=True)
        weights = self.trainable_weights()
        self.idle_since = time.perf_counter()
        return stats, self.version, weights

    def _update(self, batch: ScoredBatch) -> dict:
        ppo = self.cfg.ppo
        device = self.engine.device  # rollouts arrive as CPU tensors
        for name in ("response_ids", "logprobs", "ref_logprobs", "reward"):
            setattr(batch, name, getattr(batch, name).to(device))
        prepared = prepare_batch(self.module, batch, self.moments, ppo, self.kl_beta)
        sums: dict[str, float] = {}
        updates = 0
        for _ in range(ppo.epochs):
            for mb in minibatches(prepared, ppo.mini_batch_size, self.generator):
                loss, stats = self.engine(mb)
                self.engine.backward(loss)
                self.engine.step()
                updates += 1
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
        self.step += 1
        self.version += 1
        out = {k: v / updates for k, v in sums.items()}
        out["kl_beta"] = self.kl_beta  # the beta this batch's rewards were penalised with
        if ppo.kl_target is not None:
            self.kl_beta = adaptive_kl_beta(self.kl_beta, prepared["kl"], ppo.kl_target, len(batch), ppo.kl_horizon)
        out.update(kl=prepared["kl"], reward_mean=float(batch.reward.mean()), reward_std=float(batch.reward.std()),
                   policy_version=self.version, step=self.step, **batch.reward_parts)
        return out

    def _checkpoint_validation(self) -> dict:
        """Score the policy on validation at a checkpoint; the history goes into the
        checkpoint, and the best step's checkpoint is kept until a better one appears."""
        row = {"step": self.step, **self._validate()}
        self.val_history.append(row)
        key, best = val_metric(self.cfg.data.page_len), self.best_val()
        return {key: row[key], "best_step": best["step"], f"best_{key}": best[key]}

    def _save_policy(self, directory: Path) -> None:
        from pagellm.train.engine import save_hf_checkpoint

        def save_fn(module, state_dict, path):
            prefix = "policy."
            weights = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            save_policy(module.policy, self.tokenizer, self.layout, path, state_dict=weights)

        save_hf_checkpoint(self.engine, directory, save_fn)

    def save(self, directory: str) -> str:
        """Model, optimizer (DeepSpeed state), value head, RNG and the run's position."""
        from pagellm.train.engine import save_training_state  # also saves RNG

        out = Path(directory)
        tmp = out.with_name(out.name + ".tmp")
        self._save_policy(tmp / "policy")
        self.module.value_head.save(tmp)
        save_training_state(self.engine, tmp / "deepspeed")
        state = {"step": self.step, "version": self.version, "next_batch": self.next_batch,
                 "stale_dropped": self.stale_dropped, "trained_ids": self.trained_ids,
                 "moments": {k: m.state_dict() for k, m in self.moments.items()}, "kl_beta": self.kl_beta,
                 "val_history": self.val_history,
                 "generator": self.generator.get_state().tolist()}
        (tmp / "learner_state.json").write_text(json.dumps(state))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)  # a checkpoint directory is complete or absent, never half-written
        return str(out)

    def restore(self, directory: str) -> dict:
        """Load a checkpoint written by save(); returns the run's position (step, next_batch, ...)."""
        from pagellm.train.engine import load_training_state  # also restores RNG

        path = Path(directory)
        load_training_state(self.engine, path / "deepspeed")
        state = json.loads((path / "learner_state.json").read_text())
        self.step, self.version, self.next_batch = state["step"], state["version"], state["next_batch"]
        self.stale_dropped, self.trained_ids = state["stale_dropped"], state["trained_ids"]
        self.moments = {}
        for name, saved in state["moments"].items():
            self.moments[name] = RunningMoments()
            self.moments[name].load_state_dict(saved)
        self.kl_beta = state["kl_beta"]
        self.val_history = state["val_history"]
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        return {k: state[k] for k in ("step", "version", "next_batch", "stale_dropped")}
