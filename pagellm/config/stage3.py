"""The stage-3 sections (`stage3`, `ppo`, `dpo`, `degre`) and how configs saved before a
stage-3 key moved are read."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from pagellm.config.base import Strict, one_of
from pagellm.config.sections import ProbedTraining
from pagellm.names import (ADVANTAGE_ESTIMATORS, GROUP_ESTIMATORS, KL_ESTIMATORS, PAIR_FAMILIES, POLICY_LOSSES,
                           REWARD_HEADS, RL_ALGORITHMS, STAGE3_ALGORITHMS)


class PPOConfig(Strict):
    """The actor-based RL loop of stage 3 (stage3.algorithm ppo or grpo)."""

    steps: int = Field(50, ge=0)
    batch_size: int = Field(64, ge=1)
    mini_batch_size: int = Field(32, ge=1)
    epochs: int = Field(5, ge=1)  # optimisation epochs per batch
    lr: float = 1e-5
    clip: float = 0.2
    value_clip: float = 0.2
    kl_beta: float = Field(0.1, ge=0.0)  # the initial beta when kl_target is set
    kl_estimator: Annotated[str, one_of("KL estimator", KL_ESTIMATORS)] = "k1"  # pagellm/rl/advantages.py
    # Adaptive KL control (Ziegler et al. 2019): beta moves so the mean KL per page tends to
    # this many nats; None keeps beta fixed. kl_horizon (pages) sets how fast it moves.
    kl_target: float | None = Field(None, gt=0.0)
    kl_horizon: int = Field(10_000, ge=1)
    gamma: float = 1.0
    lam: float = 0.95
    vf_coef: float = 0.5
    entropy_coef: float = 0.0
    normalize_reward: bool = True
    temperature: float = 1.0
    # What PPO optimises: R_c + R_f ("sum") or one head; the heads must exist in the reward
    # model (`reward.heads`), which Config checks.
    reward: Annotated[str, one_of("reward", tuple(REWARD_HEADS))] = "sum"
    # The page reward is model_reward_weight x (the learned reward above) + hits_reward_weight
    # x (the verifiable reward: NDCG of the page against the user's later *training*
    # positives, pagellm/rl/verifiable.py); each part is normalised by its own running
    # statistics first when normalize_reward is on, so the weights are relative importance.
    model_reward_weight: float = Field(1.0, ge=0.0)
    hits_reward_weight: float = Field(0.0, ge=0.0)
    # ... + prior_reward_weight x the page prior fitted in the reward stage (reward.page_prior).
    prior_reward_weight: float = Field(0.0, ge=0.0)
    # Training prompts: "latest" = each user's most recent training positives (the prompt
    # evaluation uses, with nothing later to verify against); "cuts" = the SFT rows' earlier
    # cut points, whose later training positives the verifiable reward checks.
    prompts: Literal["latest", "cuts"] = "latest"
    # Pages sampled per prompt in a batch (batch_size counts pages): rloo and grpo compare
    # the pages of one prompt, so they need >= 2.
    samples_per_prompt: int = Field(1, ge=1)
    max_staleness: int = Field(1, ge=0)
    rollout_actors: int = Field(1, ge=1)
    reward_actors: int = Field(1, ge=1)
    checkpoint_every: int = Field(10, ge=1)  # also how often validation scores the policy
    grad_clip: float = 1.0
    zero_stage: int = Field(0, ge=0, le=3)  # the learner's DeepSpeed ZeRO stage
    use_gpu: bool = False
    # GPU share per actor with use_gpu: the learner a whole device, rollout and reward actors
    # half of one; smaller shares put them all on one GPU (bench/gpu_check.sh: 0.25 each).
    learner_gpus: float = Field(1.0, gt=0.0, le=1.0)
    actor_gpus: float = Field(0.5, gt=0.0, le=1.0)
    seed_offset: int = 1000  # rollout sampling seeds start here (kept apart from training seeds)
    advantage: Annotated[str, one_of("advantage estimator", ADVANTAGE_ESTIMATORS)] = "gae"  # pagellm/rl/advantages.py
    policy_loss: Annotated[str, one_of("policy loss", POLICY_LOSSES)] = "clipped"  # pagellm/rl/losses.py

    @model_validator(mode="after")
    def _check(self) -> "PPOConfig":
        if self.model_reward_weight == 0 and self.hits_reward_weight == 0 and self.prior_reward_weight == 0:
            raise ValueError("ppo.model_reward_weight, ppo.hits_reward_weight and ppo.prior_reward_weight are all 0: "
                             "nothing to optimise")
        if self.hits_reward_weight > 0 and self.prompts != "cuts":
            raise ValueError("ppo.hits_reward_weight > 0 needs ppo.prompts=cuts: the latest prompts have no later "
                             "training positives to check a page against")
        if self.advantage in GROUP_ESTIMATORS and self.samples_per_prompt < 2:
            raise ValueError(f"ppo.advantage={self.advantage!r} compares pages of one prompt: "
                             f"set ppo.samples_per_prompt >= 2 (got {self.samples_per_prompt})")
        if self.batch_size % self.samples_per_prompt:
            raise ValueError(f"ppo.batch_size ({self.batch_size}) must be a multiple of ppo.samples_per_prompt "
                             f"({self.samples_per_prompt}): a batch holds whole groups")
        return self


class DPOConfig(ProbedTraining):
    """Direct preference optimisation (Rafailov et al. 2023) of the SFT policy on page pairs,
    with the SFT policy as the frozen reference (pagellm/train/dpo.py)."""

    epochs: int = 3
    lr: float = 5e-6
    batch_size: int = 32  # pairs per optimiser step
    patience: int = 2
    beta: float = Field(0.1, gt=0.0)
    # Pair families from the data stage to train on; None = every family it built.
    families: list[Annotated[str, one_of("pair family", PAIR_FAMILIES)]] | None = None
    # On-policy: pairs come from the SFT policy instead of the data. With ranker "reward" (the
    # stage-2 R) or "prior" (the page prior) they are the best and worst of samples_per_prompt
    # pages it samples per training prompt. With "next_item" the chosen page is the top of the
    # policy's own next-item ranking (its first-position item scores) and the rejected one the
    # page it writes greedily: no sampling and no reward model (pagellm/train/dpo_pairs.py).
    on_policy: bool = False
    samples_per_prompt: int = Field(4, ge=2)
    ranker: Literal["reward", "prior", "next_item"] = "reward"
    # + sft_coef x the chosen page's NLL per item (RPO, Pang et al. 2024): keeps DPO from
    # lowering the chosen page's likelihood along with the rejected one's.
    sft_coef: float = Field(0.0, ge=0.0)


class EvaluatorConfig(Strict):
    """DeGRe's lookahead evaluator: a small causal transformer over (prompt, page prefix)
    that predicts the page's cumulative value after every item (pagellm/models/lookahead.py)."""

    n_layer: int = Field(2, ge=1)
    n_embd: int = Field(64, ge=8)
    n_head: int = Field(2, ge=1)
    epochs: int = Field(20, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    batch_size: int = Field(64, ge=1)
    patience: int = Field(3, ge=1)
    # Weight of the page-level Bradley-Terry term on the data's pairs next to the dense
    # cumulative regression: the pairs carry what per-item labels cannot (order, diversity).
    bt_weight: float = Field(1.0, ge=0.0)
    negatives: int = Field(2, ge=0)  # random unseen-item pages per prompt, every item valued 0
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)


class DeGReConfig(ProbedTraining):
    """Dense-supervised generative reranking (pagellm/train/degre.py): mine pages by beam
    search under the lookahead evaluator, distill them into the generator."""

    epochs: int = 3
    lr: float = 2e-5
    patience: int = 2
    beam: int = Field(8, ge=2)  # B: pages mined per prompt
    expand: int = Field(16, ge=1)  # items each beam extends by at each step: the policy's top ones
    alpha: float = Field(0.01, ge=0.0)  # weight of the soft-label KL next to hard-label cross-entropy
    tau_w: float = Field(1.0, gt=0.0)  # temperature of the mined pages' value weights
    soft_temperature: float = Field(1.0, gt=0.0)  # of the evaluator's step values as soft labels
    prompts: Literal["latest", "cuts"] = "latest"  # as ppo.prompts
    # What scores the beams: "lookahead" = DeGRe's evaluator (fitted here, `evaluator` below);
    # "page_prior" = the page prior the reward stage fits (pagellm/models/page_prior.py), which
    # ranks sampled pages by true utility far better on the simulator (docs/BENCHMARKS.md).
    value_model: Literal["lookahead", "page_prior"] = "lookahead"
    # Beams rank by value + policy_weight x the page's log-probability under the SFT policy:
    # 0 = the value model alone chooses among the proposals (DeGRe); larger keeps the mined
    # pages nearer what the policy writes (a KL-regularised search).
    policy_weight: float = Field(0.0, ge=0.0)
    evaluator: EvaluatorConfig = Field(default_factory=EvaluatorConfig)


class GuidedConfig(Strict):
    """Reward terms in the policy's decoding (pagellm/train/guided.py): an independent
    evaluator's item scores at the weight with a validation gain, then the page prior's
    category and quality terms, the pair the prior values most among those validation
    accuracy allows. Its own rules publish (the SFT decoding when no term passes);
    `stage3.publish` does not apply to it."""

    # Candidate penalties (logit units per earlier page item of the same category). Empty: no
    # category term.
    penalties: list[float] = Field(default_factory=lambda: [0.25, 0.5, 1.0, 1.5, 2.0, 3.0])
    # Accuracy metrics that must hold (ndcg@K / hr@K of the written list on validation users).
    guard: list[str] = Field(default_factory=lambda: ["ndcg@10"], min_length=1)
    # How far below the SFT decoding's mean a guarded metric may fall, relative (0.01 = 1 %),
    # judged on the mean paired change less `standard_errors` of its standard error: with 1,
    # a change the validation users cannot tell from a loss beyond the margin is refused (on
    # MovieLens seed 0 the point estimate alone let through -0.7 % that was -3.6 % on test).
    margin: float = Field(0.01, ge=0.0, lt=1.0)
    standard_errors: float = Field(1.0, ge=0.0)
    val_users: int = Field(2000, ge=2)  # validation users scored, evenly spread
    # The item term (pagellm/models/evaluator.py): independently trained recommenders (the
    # evaluation's baselines, fitted as it fits them: `eval.sasrec`, `eval.ease`) whose
    # standardised scores join every page position's logits at a weight in
    # `evaluator_weights` (units of the policy's own ranking). Each listed model alone and
    # (with several) their average is tried at every weight; unlike the penalty the term is
    # kept only when it raises validation accuracy: the (models, weight) whose guarded change,
    # less `standard_errors` standard errors, is largest and above 0 on every guarded metric.
    # The penalty is then chosen with it. SASRec and EASE averaged: on Musical Instruments,
    # 3 seeds, test ndcg@10 +8 to +10 % per seed where SASRec alone gave 0 to +1.7 %
    # (docs/BENCHMARKS.md). [] (or "none"): no item term.
    evaluator: list[Literal["sasrec", "ease"]] = Field(default_factory=lambda: ["sasrec", "ease"])
    evaluator_weights: list[float] = Field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0], min_length=1)
    # The page prior's quality term: its standardised item quality (mean training rating) added
    # to the page positions' logits at a weight in units of the policy's own ranking, tried
    # (when the prior's fitted quality weight is above 0) on a grid with the penalties: every
    # pair is decoded, and of those inside the margin (and whose smaller neighbours on both
    # axes are too) the one the page prior values most is published. Off by default (empty):
    # on the simulator, whose utility counts item quality, [0.1, 0.25, 0.5, 1] added +5 points
    # of true utility; on the leave-one-out tables it moved hr@10 +3.1 % on MovieLens and
    # -2.1 % on Musical Instruments, neither beyond noise (docs/BENCHMARKS.md).
    qualities: list[float] = Field(default_factory=list)

    @field_validator("evaluator", mode="before")
    @classmethod
    def _evaluator_list(cls, value):
        """`none` and a single name (what the field held before it took several) read as lists."""
        if value == "none":
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("evaluator")
    @classmethod
    def _distinct(cls, kinds: list[str]) -> list[str]:
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"guided.evaluator lists a model more than once: {kinds}")
        return kinds

    @model_validator(mode="after")
    def _check(self) -> "GuidedConfig":
        if any(p <= 0 for p in self.penalties):
            raise ValueError(f"guided.penalties must all be > 0, got {self.penalties}")
        if not self.penalties and not self.qualities and not self.evaluator:
            raise ValueError("guided: no term to choose (guided.penalties and guided.qualities are empty and "
                             "guided.evaluator is none)")
        if any(q <= 0 for q in self.qualities):
            raise ValueError(f"guided.qualities must all be > 0, got {self.qualities}")
        if any(w <= 0 for w in self.evaluator_weights):
            raise ValueError(f"guided.evaluator_weights must all be > 0, got {self.evaluator_weights}")
        for name in self.guard:
            parse_guard(name)
        return self


def parse_guard(name: str) -> tuple[str, int]:
    """'ndcg@10' -> ('ndcg', 10): a `guided.guard` entry."""
    metric, _, k = name.partition("@")
    if metric not in ("ndcg", "hr") or not k.isdigit() or int(k) < 1:
        raise ValueError(f"guided.guard entry {name!r}: expected ndcg@K or hr@K with K >= 1")
    return metric, int(k)


class Stage3Config(Strict):
    # What stage 3 runs (pagellm/names.py STAGE3_ALGORITHMS); "none" = the SFT policy is final.
    algorithm: Annotated[str, one_of("stage-3 algorithm", (*STAGE3_ALGORITHMS, "none"))] = "ppo"
    # What <run>/<algorithm> holds at the end: the checkpoint with the best validation
    # NDCG@10 (the SFT policy itself when none beat it, reported as such) or the last one.
    publish: Literal["best_val", "last"] = "best_val"


def stage3_keys(tree: dict) -> dict:
    """`ppo.enabled` and `ppo.publish` became `stage3.algorithm` and `stage3.publish` when
    stage 3 got more than one algorithm: `ppo.enabled: false` reads as algorithm none."""
    ppo = tree.get("ppo")
    if not isinstance(ppo, dict) or not ({"enabled", "publish"} & set(ppo)):
        return tree
    stage3 = dict(tree.get("stage3") or {})
    if "enabled" in ppo:
        wanted = "ppo" if ppo["enabled"] else "none"
        if stage3.setdefault("algorithm", wanted) not in ((wanted,) if wanted == "none" else RL_ALGORITHMS):
            raise ValueError(f"ppo.enabled: removed; it says {'no stage 3' if wanted == 'none' else 'PPO'} but "
                             f"stage3.algorithm is {stage3['algorithm']!r}: set stage3.algorithm alone")
    if "publish" in ppo:
        if stage3.setdefault("publish", ppo["publish"]) != ppo["publish"]:
            raise ValueError("ppo.publish: removed; set stage3.publish")
    return {**tree, "stage3": stage3, "ppo": {k: v for k, v in ppo.items() if k not in ("enabled", "publish")}}


GRPO_GROUP = 4  # stage3.algorithm=grpo's pages per prompt when ppo.samples_per_prompt leaves one


def grpo_presets(tree: dict) -> dict:
    """stage3.algorithm=grpo is the RL loop with group-relative advantages: the per-token
    default ppo.advantage=gae becomes grpo (rloo is kept), one page per prompt becomes
    GRPO_GROUP, and `reinforce` beside it fails. A saved run config holds every field, so
    the defaults are read as unset rather than as a choice."""
    if not isinstance(tree.get("stage3"), dict) or tree["stage3"].get("algorithm") != "grpo":
        return tree
    ppo = dict(tree.get("ppo") or {})
    if ppo.get("advantage", "gae") == "gae":
        ppo["advantage"] = "grpo"
    elif ppo["advantage"] not in GROUP_ESTIMATORS:
        raise ValueError(f"stage3.algorithm=grpo compares the pages of one prompt; ppo.advantage="
                         f"{ppo['advantage']!r} does not (use one of {', '.join(GROUP_ESTIMATORS)})")
    if ppo.get("samples_per_prompt", 1) < 2:
        ppo["samples_per_prompt"] = GRPO_GROUP
    return {**tree, "ppo": ppo}
