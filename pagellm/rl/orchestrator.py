"""The asynchronous PPO driver: rollout → reward → learner actors with bounded staleness.

Batches flow through Ray object refs (a rollout's result goes straight to a reward
actor, never through the driver). While the learner trains on batch n, up to
`max_staleness` further batches are already being sampled with older weights; a batch
whose weights are more than `max_staleness` versions behind the learner when its turn
comes is dropped and counted. `max_staleness: 0` is synchronous PPO.

Weights reach rollout actors as ordered actor calls: a set_weights sent before a
generate is applied before it, so each batch is tagged with the version it really used.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pagellm.config import Config
from pagellm.rl.ppo_update import ScoredBatch

GET_TIMEOUT_S = 900  # a batch that takes longer than this means a stuck actor, not a slow one


@dataclass
class PromptSource:
    """Training prompts, visited in a seeded order that is a pure function of the batch id,
    so a resumed run samples exactly the prompts the interrupted one would have."""

    prompts: list[list[int]]
    exclude: list[list[int]]
    batch_size: int
    seed: int

    def batch(self, batch_id: int) -> list[int]:
        n = len(self.prompts)
        out: list[int] = []
        start = batch_id * self.batch_size
        while len(out) < self.batch_size:
            epoch, offset = divmod(start + len(out), n)
            perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            out.extend(perm[offset : offset + self.batch_size - len(out)].tolist())
        return out


def load_prompt_source(cfg: Config, run_dir: Path, encoder) -> PromptSource:
    """Every user's recent training positives as the prompt; everything they trained on is
    excluded from the page, as at evaluation time. No val/test item is ever used."""
    evals = pd.read_parquet(run_dir / "data" / "eval.parquet")
    prompts = [encoder.encode_prompt(int(u), list(p)) for u, p in zip(evals["user_index"], evals["prompt_val"])]
    exclude = [sorted(set(t)) for t in evals["train_items"]]
    return PromptSource(prompts, exclude, cfg.ppo.batch_size, cfg.seed)


def merge_shards(shards: list[ScoredBatch]) -> ScoredBatch:
    """One batch from per-actor shards; its version is the oldest shard's (staleness is
    judged by the stalest pages in it)."""
    width = max(s.response_ids.shape[1] for s in shards)

    def cat(attr: str, pad: float) -> torch.Tensor:
        parts = [torch.nn.functional.pad(getattr(s, attr), (0, width - getattr(s, attr).shape[1]), value=pad)
                 for s in shards]
        return torch.cat(parts)

    n = sum(len(s) for s in shards)
    return ScoredBatch(
        batch_id=shards[0].batch_id,
        policy_version=min(s.policy_version for s in shards),
        prompts=[p for s in shards for p in s.prompts],
        exclude=[e for s in shards for e in s.exclude],
        response_ids=cat("response_ids", 0),  # anything after a page's eos is masked out
        logprobs=cat("logprobs", 0.0),
        ref_logprobs=cat("ref_logprobs", 0.0),
        reward=torch.cat([s.reward for s in shards]),
        reward_parts={k: sum(s.reward_parts[k] * len(s) for s in shards) / n for k in shards[0].reward_parts},
    )


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    done = sorted(p for p in ckpt_root.glob("step_*") if (p / "learner_state.json").exists())
    return done[-1] if done else None


def _truncate_metrics(path: Path, upto_step: int) -> None:
    """Drop metric lines after the checkpoint we resume from: they will be redone."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= upto_step]
    path.write_text("".join(line + "\n" for line in keep))


class PPORun:
    """Owns the actors of one PPO run and the loop that drives them."""

    def __init__(self, cfg: Config, run_dir: Path, log=print):
        import ray

        from actors.learner import LearnerActor
        from actors.reward import RewardActor
        from actors.rollout import RolloutActor
        from actors.weights import WeightsBroker
        from pagellm.vocab import PromptEncoder, load_tokenizer

        self.ray, self.cfg, self.log = ray, cfg, log
        self.sft_dir, self.reward_dir = run_dir / "sft", run_dir / "reward"
        for d, stage in ((self.sft_dir, "sft"), (self.reward_dir, "reward")):
            if not d.exists():
                raise FileNotFoundError(f"{d} not found: run `pagellm {stage} --run {run_dir}` first")
        self.out = run_dir / "ppo"
        self.ckpt_root = self.out / "checkpoints"
        self.metrics_path = self.out / "metrics.jsonl"
        self.out.mkdir(parents=True, exist_ok=True)
        tokenizer, layout = load_tokenizer(self.sft_dir)
        self.source = load_prompt_source(cfg, run_dir, PromptEncoder(tokenizer, layout))
        ppo = cfg.ppo
        n_mini = -(-ppo.batch_size // ppo.mini_batch_size)
        cfg_dict = cfg.model_dump(mode="json")
        # On GPU the learner takes a whole device; rollout and reward actors share one.
        gpu = {"learner": 1.0 if ppo.use_gpu else 0.0, "worker": 0.5 if ppo.use_gpu else 0.0}
        learner_env = {"env_vars": {"DS_ACCELERATOR": "cuda" if ppo.use_gpu else "cpu"}}
        self.broker = WeightsBroker.remote()
        self.learner = LearnerActor.options(num_gpus=gpu["learner"], runtime_env=learner_env).remote(
            str(self.sft_dir), cfg_dict, ppo.steps * ppo.epochs * n_mini)
        self.rollouts = [RolloutActor.options(num_gpus=gpu["worker"]).remote(str(self.sft_dir), cfg_dict, self.broker)
                         for _ in range(ppo.rollout_actors)]
        self.rewarders = [RewardActor.options(num_gpus=gpu["worker"]).remote(str(self.reward_dir), str(self.sft_dir),
                                                                             cfg_dict)
                          for _ in range(ppo.reward_actors)]
        self.step, self.version, self.stale_dropped, self.next_batch = 0, 0, 0, 0
        self.trained_ids: list[int] = []

    # ------------------------------------------------------------------ actors
    def _publish(self) -> None:
        self.version, refs = self.ray.get(self.learner.publish.remote(), timeout=GET_TIMEOUT_S)
        # The broker first (and waited on), so an actor restarted from now on starts current.
        self.ray.get(self.broker.publish.remote(self.version, refs))
        for actor in self.rollouts:
            actor.set_weights.remote(self.version, refs[0])

    def _submit(self, pending: deque) -> None:
        batch_id = self.next_batch
        self.next_batch += 1
        rows = self.source.batch(batch_id)
        shards = np.array_split(np.array(rows), len(self.rollouts))
        refs = []
        for j, shard in enumerate(shards):
            if len(shard) == 0:
                continue
            prompts = [self.source.prompts[i] for i in shard]
            exclude = [self.source.exclude[i] for i in shard]
            seed = self.cfg.ppo.seed_offset + 7919 * batch_id + j
            rollout = self.rollouts[j].generate.remote(batch_id, prompts, exclude, seed)
            refs.append(self.rewarders[j % len(self.rewarders)].score.remote(rollout))
        pending.append((batch_id, refs))

    # ------------------------------------------------------------------ loop
    def resume(self) -> None:
        latest = latest_checkpoint(self.ckpt_root)
        if latest is None:
            _truncate_metrics(self.metrics_path, 0)
            return
        state = self.ray.get(self.learner.restore.remote(str(latest)), timeout=GET_TIMEOUT_S)
        self.step, self.stale_dropped = state["step"], state["stale_dropped"]
        self.next_batch, self.trained_ids = state["next_batch"], state["trained_ids"]
        _truncate_metrics(self.metrics_path, self.step)
        self.log(f"[ppo] resumed from {latest.name}: step {self.step}, next batch {self.next_batch}")

    def _checkpoint(self, pending: deque) -> None:
        # Batches still in flight are not trained yet: a resumed run regenerates them.
        next_batch = pending[0][0] if pending else self.next_batch
        state = {"step": self.step, "stale_dropped": self.stale_dropped, "next_batch": next_batch,
                 "trained_ids": self.trained_ids}
        path = self.ckpt_root / f"step_{self.step:06d}"
        self.ray.get(self.learner.save.remote(str(path), state), timeout=GET_TIMEOUT_S)
        for old in sorted(self.ckpt_root.glob("step_*"))[:-2]:  # keep the last two
            shutil.rmtree(old, ignore_errors=True)

    def train(self, stop_after: int | None = None) -> dict:
        """Run until cfg.ppo.steps (or `stop_after` more steps, to simulate an interruption)."""
        ppo = self.cfg.ppo
        self.resume()
        self._publish()
        lookahead = ppo.max_staleness  # batches sampled ahead while the learner trains
        pending: deque = deque()
        last = time.perf_counter()
        target = ppo.steps if stop_after is None else min(ppo.steps, self.step + stop_after)
        while self.step < target:
            while len(pending) < 1 + lookahead:
                self._submit(pending)
            batch_id, refs = pending.popleft()
            batch = merge_shards(self.ray.get(refs, timeout=GET_TIMEOUT_S))
            staleness = self.version - batch.policy_version
            if staleness > ppo.max_staleness:
                self.stale_dropped += 1
                self.log(f"[ppo] dropped batch {batch_id}: sampled at version {batch.policy_version}, "
                         f"learner at {self.version}")
                continue
            if batch_id in self.trained_ids:
                raise RuntimeError(f"batch {batch_id} would be trained twice")
            stats = self.ray.get(self.learner.train.remote(batch), timeout=GET_TIMEOUT_S)
            self.step += 1
            self.trained_ids.append(batch_id)
            self._publish()
            now = time.perf_counter()
            row = {"step": self.step, "batch_id": batch_id, "staleness": staleness,
                   "stale_dropped": self.stale_dropped, "pages_per_s": len(batch) / (now - last), **stats,
                   "policy_version": self.version}
            last = now
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            self.log(f"[ppo] step {self.step}/{ppo.steps} reward {row['reward_mean']:+.4f} kl {row['kl']:.4f} "
                     f"policy_loss {row['policy_loss']:+.4f} value_loss {row['value_loss']:.4f} "
                     f"pages/s {row['pages_per_s']:.1f} staleness {staleness} dropped {self.stale_dropped}")
            if self.step % ppo.checkpoint_every == 0 or self.step == ppo.steps:
                self._checkpoint(pending)
        return {"step": self.step, "stale_dropped": self.stale_dropped, "policy_version": self.version}

    def finish(self) -> Path:
        """Publish the last checkpoint's policy as <run>/ppo (a save_policy directory)."""
        latest = latest_checkpoint(self.ckpt_root)
        if latest is None:
            raise RuntimeError("PPO ended without a checkpoint")
        for item in (latest / "policy").iterdir():
            dest = self.out / item.name
            if dest.is_dir():
                shutil.rmtree(dest)
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, dest)
        return self.out

    def shutdown(self) -> None:
        for actor in [self.learner, self.broker, *self.rollouts, *self.rewarders]:
            self.ray.kill(actor)


def run_ppo_stage(cfg: Config, run_dir: Path, log=print, stop_after: int | None = None) -> dict:
    """Train (or resume) PPO; writes <run>/ppo/ (policy, metrics.jsonl, DONE)."""
    if not cfg.ppo.enabled:
        log("[ppo] ppo.enabled=false: the SFT policy is the final policy")
        return {"step": 0}
    t0 = time.perf_counter()
    run = PPORun(cfg, run_dir, log)
    try:
        summary = run.train(stop_after)
        if summary["step"] >= cfg.ppo.steps:
            run.finish()
            summary["seconds"] = round(time.perf_counter() - t0, 1)
            (run.out / "DONE").write_text(json.dumps(summary) + "\n")
            log(f"[ppo] done: {summary['step']} steps, {summary['stale_dropped']} stale batches dropped, "
                f"policy -> {run.out}")
        return summary
    finally:
        run.shutdown()
