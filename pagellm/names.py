"""The names a config field may select, in one module that imports nothing heavy.

`pagellm.config` checks `ppo.advantage`, `ppo.policy_loss` and `ppo.reward` against these
tables when a config loads (before Ray or torch start); the registries of
`pagellm.rl.registry` and the reward model (`pagellm.models.reward`) are built from the
same tables, so a name is selectable if and only if its code exists. A new advantage
estimator or policy loss is its name here plus one decorated function.
"""

from __future__ import annotations

# pagellm/rl/advantages.py registers one function per name (`@register_advantage`).
ADVANTAGE_ESTIMATORS: tuple[str, ...] = ("gae", "reinforce", "rloo", "grpo")
# Estimators that compare the pages of one prompt: they need `ppo.samples_per_prompt` >= 2.
GROUP_ESTIMATORS: tuple[str, ...] = ("rloo", "grpo")
# pagellm/rl/losses.py (`@register_policy_loss`).
POLICY_LOSSES: tuple[str, ...] = ("clipped", "dual_clip")
# pagellm/rl/advantages.py (`@register_kl`).
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")

# `stage3.algorithm`: what turns the SFT policy into the published one. Each writes its
# policy to <run>/<algorithm>/ (pagellm.names.stage3_dir); "none" publishes SFT as final.
# ppo and grpo are the actor-based RL loop (actors/), grpo with group-relative advantages
# and no critic; dpo and degre train on Ray Train like SFT (pagellm/train/); guided writes
# the page prior's category term into the SFT policy's decoding (pagellm/train/guided.py).
STAGE3_ALGORITHMS: tuple[str, ...] = ("ppo", "grpo", "dpo", "degre", "guided")
RL_ALGORITHMS: tuple[str, ...] = ("ppo", "grpo")  # run by actors/orchestrator.py

# The data stage's pair families (pagellm/data/user_rows.py builds them).
PAIR_FAMILIES: tuple[str, ...] = ("preference", "ranking", "diversity", "redundancy", "rating")


# A `reward.heads` / `ppo.reward` value -> the reward-model heads it is made of:
# "sum" is R_c + R_f (the method), "coarse" and "fine" one head alone (ablations).
REWARD_HEADS: dict[str, tuple[str, ...]] = {"sum": ("coarse", "fine"), "coarse": ("coarse",), "fine": ("fine",)}
