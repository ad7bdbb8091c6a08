"""Baseline PPO pages/s: TRL's PPOTrainer on our tiny SFT policy, for comparison with ppo_throughput.py.

TRL lives in its own virtualenv outside the repo (it pins its own transformers/accelerate and
must not touch .venv). Create it once (torch first: the local CPU wheel; a bare `torch` would
pull a multi-GB CUDA build):

    python3.11 -m venv /work/trl-venv
    /work/trl-venv/bin/pip install torch==2.13.0
    /work/trl-venv/bin/pip install trl==1.12.0 torch==2.13.0

Run (needs a run folder with sft/ and data/eval.parquet, e.g. after `pagellm run`):

    /work/trl-venv/bin/python bench/trl_ppo_baseline.py --run runs/tune_a [--steps 12]

Same shape as our PPO (configs/tiny.yaml): 64 pages per PPO batch, mini-batches of 32, 2 PPO
epochs, pages of exactly 11 response tokens (10 items + eos), temperature 1.0, kl_coef 0.2,
lr 5e-5, the real prompts (every user's validation prompt, encoded by pagellm.vocab.PromptEncoder,
which only needs torch/transformers/pandas and so imports fine in the TRL env; `--prompts FILE`
takes a JSON list of token-id lists instead). pages/s = pages trained / wall time from the end of
PPO batch 1 to the end of the last one (batch 1 is warm-up, as in ppo_throughput.py).

Known differences from our PPO (they pull in opposite directions; keep them in mind when comparing):
- TRL samples unconstrained (it has no constrained decoding, cf. pagellm/models/decoding.py):
  no item-only masking, no distinct-item / excluded-training-item masks, no forced eos, so its
  per-page sampling work is slightly lighter than ours. eos is disabled as a stop token so every
  page is 11 tokens (checked: the run reports pages that are not, e.g. if pad were sampled).
- TRL's value model is a separate GPT-2 (AutoModelForSequenceClassification) with its own
  backbone forward/backward; ours is a value head on the policy. Reward and value models here
  are the SFT backbone with a fresh score head (throughput only; the scores are meaningless).
- TRL is one process and uses both cores (torch.set_num_threads(2)); ours splits them
  between Ray actors (rollout/reward 1 thread each, learner 1).
- TRL's PPO step has no gradient clipping and no reward normalisation (ours: grad_clip 1.0,
  normalize_reward); both are negligible next to the forward/backward passes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PAGE_TOKENS = 11  # page_len 10 items + 1 eos, as our rollout produces


def load_prompts(run_dir: Path, prompts_file: str | None) -> list[list[int]]:
    if prompts_file:
        return json.loads(Path(prompts_file).read_text())
    import pandas as pd

    from pagellm.vocab import PromptEncoder, load_tokenizer

    # Same prompts as pagellm/rl/prompts.py::load_prompt_source.
    tokenizer, layout = load_tokenizer(run_dir / "sft")
    enc = PromptEncoder(tokenizer, layout)
    evals = pd.read_parquet(run_dir / "data" / "eval.parquet")
    return [enc.encode_prompt(int(u), list(p)) for u, p in zip(evals["user_index"], evals["prompt_val"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--steps", type=int, default=12, help="PPO batches (the first is warm-up)")
    ap.add_argument("--prompts", help="JSON list of prompt token-id lists (default: from --run)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # PPOTrainer only exists under trl.experimental
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    run_dir = Path(args.run)
    sft = str(run_dir / "sft")
    tokenizer = AutoTokenizer.from_pretrained(sft)  # padding_side="left", pad=0, eos=2 (saved so)
    policy = AutoModelForCausalLM.from_pretrained(sft)
    ref_policy = AutoModelForCausalLM.from_pretrained(sft)
    # Backbone from the SFT weights, score head freshly initialised: same cost as a trained RM.
    reward_model = AutoModelForSequenceClassification.from_pretrained(sft, num_labels=1)
    value_model = AutoModelForSequenceClassification.from_pretrained(sft, num_labels=1)
    for m in (reward_model, value_model):
        m.config.pad_token_id = tokenizer.pad_token_id

    prompts = load_prompts(run_dir, args.prompts)
    dataset = Dataset.from_dict({"input_ids": prompts})

    batch = 64
    out_dir = tempfile.mkdtemp(prefix="trl_ppo_bench_")  # required by TrainingArguments; nothing is saved
    config = PPOConfig(
        output_dir=out_dir,
        # TRL: batch = per_device_train_batch_size * grad_accum; a mini-batch = batch / num_mini_batches,
        # stepped in micro-batches of per_device_train_batch_size. With grad_accum=1 the micro-batch is
        # the whole 32-page mini-batch and the optimizer steps once per mini-batch, as ours does
        # (grad_accum=2 would make accelerate skip every other step, i.e. 64-page updates).
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_mini_batches=2,
        local_rollout_forward_batch_size=batch,  # generate/score the whole batch at once
        num_ppo_epochs=2,
        total_episodes=batch * args.steps,
        response_length=PAGE_TOKENS,
        stop_token=None, stop_token_id=None,  # TRL then clears eos in generation_config: fixed 11 tokens
        missing_eos_penalty=None,
        temperature=1.0,
        kl_coef=0.2,
        learning_rate=5e-5,
        lr_scheduler_type="constant",
        cliprange=0.2, cliprange_value=0.2, vf_coef=0.5, gamma=1.0, lam=0.95,
        # PPOConfig defaults bf16=True and gradient_checkpointing=True (GPU settings): both off,
        # ours runs fp32 without checkpointing on CPU.
        bf16=False, fp16=False, gradient_checkpointing=False,
        use_cpu=True,
        num_sample_generations=0, eval_strategy="no", save_strategy="no", report_to="none",
        logging_steps=1, disable_tqdm=True, seed=0,
    )

    class StepTimer(TrainerCallback):
        """Timestamps the end of every PPO batch (TRL calls on_step_end once per batch)."""

        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())
            dt = self.ends[-1] - (self.ends[-2] if len(self.ends) > 1 else t_start)
            print(f"    batch {len(self.ends)}/{config.total_episodes // batch}: {dt:.2f}s "
                  f"({batch / dt:.1f} pages/s)", flush=True)

    # Count sampled pages that are not a full 11 tokens: TRL ends a page at its first pad token
    # (sequence_length = first pad - 1), and unconstrained sampling could emit pad (id 0).
    import trl.experimental.ppo.ppo_trainer as ppo_mod

    pages_seen, pages_short, orig_generation = [0], [0], ppo_mod.batch_generation

    def checked_generation(model, queries, *a, **kw):
        query_responses, logits = orig_generation(model, queries, *a, **kw)
        resp = query_responses[:, queries.shape[1]:]
        pages_seen[0] += resp.shape[0]
        full = (resp != tokenizer.pad_token_id).all(1) & (resp.shape[1] == PAGE_TOKENS)
        pages_short[0] += int((~full).sum())
        return query_responses, logits

    ppo_mod.batch_generation = checked_generation

    timer = StepTimer()
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref_policy,
                         reward_model=reward_model, value_model=value_model, train_dataset=dataset,
                         callbacks=[timer])
    # Quiet the per-step metric dicts; our own callback prints one line per batch.
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)

    t_start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t_start
    shutil.rmtree(out_dir, ignore_errors=True)

    ends = timer.ends
    if len(ends) < 2:
        sys.exit("need at least 2 PPO batches (the first is warm-up)")
    pages = batch * (len(ends) - 1)
    pages_per_s = pages / (ends[-1] - ends[0])
    print(f"TRL PPOTrainer: {pages_per_s:.1f} pages/s over {len(ends) - 1} steady-state batches "
          f"({batch} pages each; 1 process, {torch.get_num_threads()} threads; train wall {total:.0f}s; "
          f"{pages_short[0]}/{pages_seen[0]} pages not 11 tokens)")
    print(json.dumps({
        "machine": f"{platform.machine()} cpus={os.cpu_count()}",
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__, "python": platform.python_version()},
        "pages_per_s": pages_per_s, "steps": len(ends), "steady_state_steps": len(ends) - 1,
        "pages_sampled": pages_seen[0], "pages_not_11_tokens": pages_short[0],
        "warmup_batch_s": ends[0] - t_start, "train_wall_s": total, "threads": torch.get_num_threads(),
        "config": {"batch_size": batch, "mini_batch_size": batch // config.num_mini_batches,
                   "num_ppo_epochs": config.num_ppo_epochs, "response_tokens": config.response_length,
                   "temperature": config.temperature, "kl_coef": config.kl_coef, "lr": config.learning_rate,
                   "prompts": len(prompts), "policy": sft, "constrained_decoding": False},
    }, indent=2))


if __name__ == "__main__":
    main()
