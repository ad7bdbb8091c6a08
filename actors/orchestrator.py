"""The asynchronous PPO driver: rollout → reward → learner actors with bounded staleness.

It lives with the actors it drives (the application side): the library under pagellm/
never imports actors/ or jobs/ (docs/ARCHITECTURE.md §1). `jobs/ppo.py` calls
`run_ppo_stage`.

The driver only wires a dataflow; no batch or weight tensor passes through it. For batch b
it queues, as ordered actor calls whose arguments are other calls' outputs:

    rollout.set_weights(<weights after learner.train(b - s - 1)>)   (s = max_staleness)
    rollout.generate(b) → reward.score(...) → learner.train(b, *scored shards)

so generation of b starts the moment the learner finishes b - s - 1, and Ray hands each
output straight to its consumer. While the learner trains on b, batches b+1 .. b+s are
already being sampled and scored with older weights: no batch is ever more than s
versions behind when trained. The learner still checks each batch's version and drops
(and counts) any that is: Ray keeps an actor's calls in order only until it retries one
(a killed rollout actor is restarted and its queued calls re-sent), and a restarted
rollout actor starts from whatever the broker holds. `max_staleness: 0` is synchronous
PPO: generate, score and train strictly in turn.

The driver keeps up to s + 2 batches queued, so the next generation and training calls
are already waiting when an update ends: the driver's own round trips are off the
critical path. It collects each step's statistics in order, logs them and stops at
`ppo.steps`; the learner writes checkpoints between updates.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections import deque
from pathlib import Path

import numpy as np

from pagellm.config import Config
from pagellm.names import RL_ALGORITHMS
from pagellm.rl.prompts import load_prompt_source

GET_TIMEOUT_S = 900  # a batch that takes longer than this means a stuck actor, not a slow one


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
        uses_reward_dir = cfg.ppo.model_reward_weight > 0 or cfg.ppo.prior_reward_weight > 0
        needed = [(self.sft_dir, "sft")] + ([(self.reward_dir, "reward")] if uses_reward_dir else [])
        for d, stage in needed:
            if not d.exists():
                raise FileNotFoundError(f"{d} not found: run `pagellm {stage} --run {run_dir}` first")
        self.out = run_dir / cfg.stage3.algorithm  # ppo or grpo
        self.ckpt_root = self.out / "checkpoints"
        self.metrics_path = self.out / "metrics.jsonl"
        self.out.mkdir(parents=True, exist_ok=True)
        tokenizer, layout = load_tokenizer(self.sft_dir)
        self.source = load_prompt_source(cfg, run_dir, PromptEncoder(tokenizer, layout))
        ppo = cfg.ppo
        n_mini = -(-ppo.batch_size // ppo.mini_batch_size)
        cfg_dict = cfg.model_dump(mode="json")
        # On GPU the learner takes a whole device and rollout and reward actors share one, by
        # default (ppo.learner_gpus, ppo.actor_gpus).
        gpu = {"learner": ppo.learner_gpus if ppo.use_gpu else 0.0, "worker": ppo.actor_gpus if ppo.use_gpu else 0.0}
        learner_env = {"env_vars": {"DS_ACCELERATOR": "cuda" if ppo.use_gpu else "cpu"}}
        broker_name = f"pagellm-weights-{uuid.uuid4().hex[:12]}"  # rollout actors look it up by name
        self.broker = WeightsBroker.options(name=broker_name).remote()
        self.learner = LearnerActor.options(num_gpus=gpu["learner"], runtime_env=learner_env).remote(
            str(self.sft_dir), cfg_dict, ppo.steps * ppo.epochs * n_mini, str(self.ckpt_root), str(run_dir / "data"))
        self.rollouts = [RolloutActor.options(num_gpus=gpu["worker"]).remote(str(self.sft_dir), cfg_dict, broker_name)
                         for _ in range(ppo.rollout_actors)]
        self.rewarders = [RewardActor.options(num_gpus=gpu["worker"]).remote(str(self.reward_dir), str(self.sft_dir),
                                                                             cfg_dict, str(run_dir / "data"))
                          for _ in range(ppo.reward_actors)]
        self.step, self.stale_dropped, self.next_batch, self.version = 0, 0, 0, 0

    # ------------------------------------------------------------------ actors
    def _send_weights(self, version_ref, weights_ref) -> None:
        """Queue new weights on every rollout actor (applied before any generate queued
        after this) and on the broker, for actors that restart later. Nothing is awaited."""
        self.broker.publish.remote(version_ref, [weights_ref])  # in a list: the broker keeps a ref
        for actor in self.rollouts:
            actor.set_weights.remote(version_ref, weights_ref)

    def _submit(self, batch_id: int):
        """Queue generate → score → train for one batch; returns the ref of the learner's
        (stats, version, weights) outputs."""
        rows = np.array(self.source.batch(batch_id))
        groups = np.arange(len(rows)) // self.cfg.ppo.samples_per_prompt  # batch-local prompt group
        # Shards are cut between groups: rloo/grpo compare the pages of one prompt, so a
        # group's pages must be scored into the same shard.
        shards = np.array_split(np.arange(groups[-1] + 1), len(self.rollouts))
        scored = []
        for j, shard_groups in enumerate(shards):
            if len(shard_groups) == 0:
                continue
            shard = np.flatnonzero(np.isin(groups, shard_groups))
            prompts = [self.source.prompts[i] for i in rows[shard]]
            exclude = [self.source.exclude[i] for i in rows[shard]]
            targets = [self.source.targets[i] for i in rows[shard]]
            seed = self.cfg.ppo.seed_offset + 7919 * batch_id + j
            rollout = self.rollouts[j].generate.remote(batch_id, prompts, exclude, targets, groups[shard].tolist(),
                                                       seed)
            scored.append(self.rewarders[j % len(self.rewarders)].score.remote(rollout))
        return self.learner.train.remote(batch_id, *scored)

    # ------------------------------------------------------------------ loop
    def resume(self) -> None:
        latest = latest_checkpoint(self.ckpt_root)
        if latest is None:
            _truncate_metrics(self.metrics_path, 0)
            return
        state = self.ray.get(self.learner.restore.remote(str(latest)), timeout=GET_TIMEOUT_S)
        self.step, self.stale_dropped, self.next_batch = state["step"], state["stale_dropped"], state["next_batch"]
        self.version = state["version"]
        _truncate_metrics(self.metrics_path, self.step)
        self.log(f"[ppo] resumed from {latest.name}: step {self.step}, next batch {self.next_batch}")

    def train(self, stop_after: int | None = None) -> dict:
        """Run until cfg.ppo.steps (or `stop_after` more steps, to simulate an interruption)."""
        ppo = self.cfg.ppo
        self.resume()
        target = ppo.steps if stop_after is None else min(ppo.steps, self.step + stop_after)
        version_ref, weights_ref = self.learner.publish.remote()
        self._send_weights(version_ref, weights_ref)
        # (version, weights) refs of the last s + 1 queued train calls: the oldest is what the
        # next batch to queue is sampled with (the first s + 1 batches use the weights above).
        after_train: deque = deque()
        queued: deque = deque()  # (batch_id, stats ref), in training order
        last = time.perf_counter()
        while self.step < target:
            # Keep s + 2 batches queued, but never queue more than the steps still to train
            # (a batch dropped as stale is made up for on a later pass of this loop).
            while len(queued) < ppo.max_staleness + 2 and self.step + len(queued) < target:
                if len(after_train) > ppo.max_staleness:
                    self._send_weights(*after_train.popleft())
                stats_ref, version_ref, weights_ref = self._submit(self.next_batch)
                after_train.append((version_ref, weights_ref))
                queued.append((self.next_batch, stats_ref))
                self.next_batch += 1
            batch_id, stats_ref = queued.popleft()
            stats = self.ray.get(stats_ref, timeout=GET_TIMEOUT_S)
            if stats.pop("dropped"):
                self.stale_dropped = stats["stale_dropped"]
                self.log(f"[ppo] dropped batch {batch_id}: sampled at version {stats['sampled_version']}, "
                         f"learner at {stats['policy_version']}")
                continue
            self.step, self.stale_dropped, self.version = stats["step"], stats["stale_dropped"], stats["policy_version"]
            now = time.perf_counter()
            row = {"step": self.step, "pages_per_s": ppo.batch_size / (now - last), **stats}
            last = now
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            self.log(f"[ppo] step {self.step}/{ppo.steps} reward {row['reward_mean']:+.4f} kl {row['kl']:.4f} "
                     f"beta {row['kl_beta']:.3f} "
                     f"policy_loss {row['policy_loss']:+.4f} value_loss {row['value_loss']:.4f} "
                     f"pages/s {row['pages_per_s']:.1f} staleness {row['staleness']} dropped {self.stale_dropped} "
                     f"learner idle {row['learner_idle_s']:.2f}s")
        return {"step": self.step, "stale_dropped": self.stale_dropped, "policy_version": self.version}

    def finish(self) -> dict:
        """Publish the chosen policy as <run>/<algorithm> (a save_policy directory): with
        stage3.publish=best_val the checkpoint with the best validation NDCG@10, which is the
        SFT policy itself (step 0) when no stage-3 checkpoint beat it; else the last one.
        Returns what was chosen, with the validation history."""
        from pagellm.eval.probe import best_record, val_metric
        from pagellm.models.policy import export_merged, reference_is_base

        latest = latest_checkpoint(self.ckpt_root)
        if latest is None:
            raise RuntimeError("PPO ended without a checkpoint")
        history = json.loads((latest / "learner_state.json").read_text())["val_history"]
        key = val_metric(self.cfg.data.page_len)
        last_step = int(latest.name.removeprefix("step_"))
        chosen = best_record(history, key)["step"] if self.cfg.stage3.publish == "best_val" else last_step
        source = self.sft_dir if chosen == 0 else (self.ckpt_root / f"step_{chosen:06d}" / "policy")
        if chosen != 0 and reference_is_base(self.sft_dir, self.cfg.model):
            # A LoRA checkpoint's base is the merged SFT policy, which lives nowhere on disk:
            # publish the whole policy merged, so serve and eval need no other checkpoint.
            export_merged(source, self.out, self.cfg.model.dtype)
        else:
            for item in source.iterdir():
                if item.name in ("metrics.json", "DONE"):  # the SFT stage's own records stay in sft/
                    continue
                dest = self.out / item.name
                if dest.is_dir():
                    shutil.rmtree(dest)
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, dest)
        selection = {"publish": self.cfg.stage3.publish, "published_step": chosen, "metric": key,
                     "published_" + key: next(r[key] for r in history if r["step"] == chosen),
                     "sft_" + key: history[0][key], "history": history}
        (self.out / "selection.json").write_text(json.dumps(selection, indent=1) + "\n")
        return selection

    def shutdown(self) -> None:
        """Kill every actor of the run (before publishing, and again on the way out: the
        second call finds none)."""
        actors = [self.learner, self.broker, *self.rollouts, *self.rewarders]
        self.learner, self.broker, self.rollouts, self.rewarders = None, None, [], []
        for actor in actors:
            if actor is not None:
                self.ray.kill(actor)


def run_ppo_stage(cfg: Config, run_dir: Path, log=print, stop_after: int | None = None) -> dict:
    """Train (or resume) PPO or GRPO; writes <run>/<algorithm>/ (policy, metrics.jsonl, DONE)."""
    if cfg.stage3.algorithm not in RL_ALGORITHMS:
        raise ValueError(f"the RL loop runs stage3.algorithm ppo or grpo, not {cfg.stage3.algorithm!r}")
    t0 = time.perf_counter()
    run = PPORun(cfg, run_dir, log)
    try:
        summary = run.train(stop_after)
        if summary["step"] >= cfg.ppo.steps:
            # Publishing reads checkpoints from disk, and merges a LoRA policy in this process:
            # free the actors first. At 1B on a 24 GiB box that merged copy next to the
            # learner, rollout and reward actors is one copy too many (Ray's memory monitor
            # killed the reward actor there, docs/BENCHMARKS.md "Llama-3.2-1B scale").
            run.shutdown()
            chosen = run.finish()
            summary["seconds"] = round(time.perf_counter() - t0, 1)
            summary["published_step"] = chosen["published_step"]
            # Every sampled batch is pages written, a stale one dropped too: the budget
            # bench/stage3_compare.py holds algorithms to.
            summary["pages_generated"] = (summary["step"] + summary["stale_dropped"]) * cfg.ppo.batch_size
            (run.out / "DONE").write_text(json.dumps(summary) + "\n")
            key = chosen["metric"]
            what = ("the SFT policy: no stage-3 checkpoint beat it on validation" if chosen["published_step"] == 0
                    else f"step {chosen['published_step']}")
            log(f"[ppo] done: {summary['step']} steps, {summary['stale_dropped']} stale batches dropped; "
                f"published {what} ({key} {chosen['published_' + key]:.4f}, SFT {chosen['sft_' + key]:.4f}) "
                f"-> {run.out}")
        return summary
    finally:
        run.shutdown()
