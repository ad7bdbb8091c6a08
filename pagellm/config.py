"""Typed configuration: YAML files plus dotted overrides (`--set ppo.lr=1e-5`).

Every model forbids unknown keys, so a typo in a config file or an override fails
before any work starts instead of being silently ignored.
"""

from __future__ import annotations

import re
from pathlib import Path
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pagellm.eval.baselines.params import BASELINE_PARAMS, BASELINES
from pagellm.names import (ADVANTAGE_ESTIMATORS, GROUP_ESTIMATORS, KL_ESTIMATORS, PAIR_FAMILIES, POLICY_LOSSES,
                           REWARD_HEADS, RL_ALGORITHMS, STAGE3_ALGORITHMS)

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def one_of(kind: str, names: Sequence[str]) -> AfterValidator:
    """A string field that must name one of `names` (a registry's declared names)."""
    def check(value: str) -> str:
        if value not in names:
            raise ValueError(f"unknown {kind} {value!r}; allowed: {', '.join(names)}")
        return value

    return AfterValidator(check)


class SimulatorConfig(Strict):
    users: int = Field(400, ge=2)
    items: int = Field(300, ge=10)
    categories: int = Field(12, ge=1)
    latent_dim: int = Field(8, ge=1)
    interactions_per_user: int = Field(40, ge=5)
    taste_drift: float = Field(0.05, ge=0.0)
    rating_noise: float = Field(0.5, ge=0.0)
    popularity_exponent: float = Field(1.0, ge=0.0)
    satiation: float = Field(0.5, ge=0.0, le=1.0)


class DataConfig(Strict):
    source: Literal["simulator", "amazon", "movielens", "sequence", "csv", "parquet"] = "simulator"
    path: str | None = None
    items_path: str | None = None
    # Generic CSV/Parquet: canonical name -> column name in the file.
    columns: dict[str, str] = Field(default_factory=dict)
    # Valid rating range; None takes the reader's own (MovieLens 0.5-5, Amazon 1-5).
    rating_scale: tuple[float, float] | None = None
    positive_threshold: float = 3.0  # positive: rating > this
    negative_threshold: float = 3.0  # non-preferred: rating < this
    kcore: int = Field(0, ge=0)  # min interactions per user and per item; 0 = off
    split: Literal["chrono", "random", "leave_one_out"] = "chrono"
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    history_len: int = Field(20, ge=1)
    page_len: int = Field(10, ge=2)
    category_cap: float = Field(0.4, gt=0.0, le=1.0)
    # Order of the golden page: "rating" (the paper: rating, then item mean rating) or
    # "time" (the order the user went on to interact in; what next-item protocols such as
    # leave-one-out reward on implicit feedback, where ratings are all alike).
    page_order: Literal["rating", "time"] = "rating"
    # Which label of an item's category path feeds diversity: "leaf", "top" or an index.
    category_level: str = "leaf"
    ranking_swaps: int = Field(2, ge=1)
    # Rating-graded reward pairs (family "rating", pagellm/data/pages.py::rating_pair): the
    # higher- vs lower-rated half of a window of the user's own positives, when their mean
    # ratings differ by at least rating_gap. Needs explicit ratings.
    rating_pairs: bool = False
    rating_gap: float = Field(1.0, gt=0.0)
    sft_windows: int = Field(1, ge=1)  # SFT rows per user (earlier cut points of the history)
    max_users: int | None = None
    simulator: SimulatorConfig = Field(default_factory=SimulatorConfig)

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if abs(sum(self.split_ratios) - 1.0) > 1e-6:
            raise ValueError(f"data.split_ratios must sum to 1, got {self.split_ratios}")
        if self.source != "simulator" and not self.path:
            raise ValueError(f"data.path is required for data.source={self.source!r}")
        return self


class LoraConfig(Strict):
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"


class ModelConfig(Strict):
    # A hub name, a local directory, or "config" for random init from `arch` + `init`.
    name: str = "config"
    arch: Literal["gpt2", "llama"] = "gpt2"
    # Config fields for random init (e.g. n_layer, n_embd); merged over the arch defaults.
    init: dict[str, Any] = Field(default_factory=dict)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Put the user's own token in the prompt. Off, the prompt is the history alone: on
    # sparse (5-core) data most user tokens are seen in a handful of rows and learn noise.
    # The token rows stay in the vocabulary either way (the loss never scores them).
    user_tokens: bool = True
    # Where position ids start (pagellm/models/positions.py): "prompt_end" anchors the end of
    # the prompt at half the context, so a learned position means "how recent".
    positions: Literal["start", "prompt_end"] = "start"


class TrainCommon(Strict):
    epochs: int = Field(1, ge=0)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(32, ge=1)
    weight_decay: float = 0.0
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    grad_clip: float = 1.0
    workers: int = Field(1, ge=1)
    use_gpu: bool = False
    zero_stage: int = Field(0, ge=0, le=3)
    log_every: int = Field(20, ge=1)


class ProbedTraining(TrainCommon):
    """A Ray Train stage whose epochs are scored by writing pages for validation users
    (pagellm/eval/probe.py: greedy, constrained, as eval does); their NDCG@10 picks the
    published checkpoint and stops training early."""

    # Users per probe half: SFT and stage 3 each score on their own half of the validation
    # users (pagellm/eval/probe.py), so a half holds all of them only up to 2 × val_users.
    val_users: int = Field(2000, ge=1)
    patience: int = Field(3, ge=1)  # epochs without a better validation NDCG@10 before stopping


class SFTConfig(ProbedTraining):
    epochs: int = 10
    lr: float = 2e-5
    meta_epochs: int = Field(0, ge=0)  # next-item pre-training on whole training histories
    meta_lr: float = 5e-5
    meta_history: int = Field(50, ge=2)  # the last this-many training positives per meta row
    user_dropout: float = Field(0.1, ge=0.0, le=1.0)  # share of rows repeated without the user token
    # Softmax over item tokens only at item positions (SASRec's cross-entropy over items),
    # with the page's constraints (items already on the page or in the prompt masked) in the
    # page phase; false = cross-entropy over the whole vocabulary, the plain LM loss.
    item_loss: bool = True
    # Page-phase target at each position: "sequence" = the golden page's next item (teacher
    # forcing), "set" = any golden item not yet placed (log of their summed probability),
    # so the order of the page is the model's own confidence.
    page_loss: Literal["sequence", "set"] = "sequence"


class RewardConfig(TrainCommon):
    epochs: int = 5
    lr: float = 1e-5
    batch_size: int = 64
    heads: Literal["sum", "coarse", "fine"] = "sum"
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    patience: int = Field(2, ge=1)
    # The heads start from scratch on a trained backbone: they learn at lr x this.
    head_lr_mult: float = Field(10.0, gt=0.0)
    # The fine head's r_k adds the backbone's own logit for item k (pagellm/models/reward.py);
    # false leaves it out, so R cannot reward "what the SFT policy would write" as such.
    logit_term: bool = True
    # Also fit the page prior (pagellm/models/page_prior.py: SFT preference, item quality and
    # a category discount, three parameters, Bradley-Terry on the same pairs); cheap.
    page_prior: bool = True


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
    # On-policy: pairs are the best and worst of samples_per_prompt pages the SFT policy
    # samples per training prompt, as ranked by `ranker` (the stage-2 reward R, or the page
    # prior), instead of the data's pairs.
    on_policy: bool = False
    samples_per_prompt: int = Field(4, ge=2)
    ranker: Literal["reward", "prior"] = "reward"
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
    evaluator: EvaluatorConfig = Field(default_factory=EvaluatorConfig)


class Stage3Config(Strict):
    # What stage 3 runs (pagellm/names.py STAGE3_ALGORITHMS); "none" = the SFT policy is final.
    algorithm: Annotated[str, one_of("stage-3 algorithm", (*STAGE3_ALGORITHMS, "none"))] = "ppo"
    # What <run>/<algorithm> holds at the end: the checkpoint with the best validation
    # NDCG@10 (the SFT policy itself when none beat it, reported as such) or the last one.
    publish: Literal["best_val", "last"] = "best_val"


class EvalConfig(Strict):
    """The page a model is judged on is `data.page_len` items long (the first items of its
    `list_len`-item list); there is no separate evaluation page length."""

    list_len: int = Field(100, ge=10)
    exclude_history: bool = True
    max_users: int | None = None
    batch_size: int = 64
    baselines: list[Annotated[str, one_of("baseline", BASELINES)]] = Field(
        default_factory=lambda: ["popularity", "sasrec"])
    sasrec: dict[str, Any] = Field(default_factory=dict)  # overrides of SASRec's defaults
    # On the simulator: pages sampled per user from the SFT policy to measure how well the
    # reward tracks true utility (the `reward_fidelity` block, pagellm/eval/fidelity.py); 0 = off.
    fidelity_samples: int = Field(8, ge=0)
    # Pages sampled per user (of the first kl_users) from each stage-3 policy to measure its
    # KL to the SFT policy (pagellm/eval/divergence.py), the same way for every algorithm; 0 = off.
    kl_samples: int = Field(4, ge=0)
    kl_users: int = Field(500, ge=1)
    # HR@k% (docs METRICS.md): random pages per user each model's page is ranked against.
    # METRICS.md's definition uses 10,000; the default trades that for evaluation time (the
    # judge values users x N pages). 0 = off.
    hr_pct_pages: int = Field(1000, ge=0)

    @field_validator("hr_pct_pages")
    @classmethod
    def _enough_for_one_percent(cls, n: int) -> int:
        if 0 < n < 100:
            raise ValueError(f"HR@1% needs at least 100 random pages per user, got {n}; use 0 to turn it off")
        return n

    @field_validator("fidelity_samples")
    @classmethod
    def _two_or_none(cls, n: int) -> int:
        if n == 1:
            raise ValueError("a within-user correlation needs at least 2 samples per user; use 0 to turn it off")
        return n

    @field_validator("baselines")
    @classmethod
    def _distinct(cls, names: list[str]) -> list[str]:
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"baselines listed more than once: {', '.join(twice)}")
        return names

    @field_validator("sasrec")
    @classmethod
    def _known_sasrec_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(params) - set(BASELINE_PARAMS["sasrec"]))
        if unknown:
            raise ValueError(f"unknown SASRec parameter(s) {', '.join(unknown)}; "
                             f"allowed: {', '.join(BASELINE_PARAMS['sasrec'])}")
        return params


class ServeConfig(Strict):
    host: str = "127.0.0.1"
    port: int = 8000
    max_k: int = Field(50, ge=1)
    max_history: int = Field(200, ge=1)
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.005
    num_replicas: int | Literal["auto"] = 1
    autoscaling: dict[str, Any] = Field(default_factory=dict)
    # The HTTP front end (pagellm/serve/ingress.py): Serve's Python proxy, or Serve's HAProxy
    # ingress (replicas answer HTTP themselves behind HAProxy; on 2 cores the ingress itself
    # costs 0.7 instead of ~7 ms per request, docs/BENCHMARKS.md).
    ingress: Literal["proxy", "haproxy"] = "proxy"
    access_log: bool = True  # one log line per request (replica logs; streamed to the driver)


class Config(Strict):
    seed: int = 0
    run_dir: str | None = None  # set by the CLI from --out/--run; may be a URI
    # Where a relative --run folder is placed: on a cluster, a filesystem every node mounts
    # (NFS, EFS, Filestore, a FUSE-mounted bucket). None: $PAGELLM_STORAGE, else the cwd.
    storage: str | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    stage3: Stage3Config = Field(default_factory=Stage3Config)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    degre: DeGReConfig = Field(default_factory=DeGReConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @model_validator(mode="before")
    @classmethod
    def _retired_keys(cls, tree: Any) -> Any:
        """Keys that moved, read from configs saved before they did; `grpo`'s presets."""
        if not isinstance(tree, dict):
            return tree
        return _grpo_presets(_stage3_keys(_eval_page_len(tree)))

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        rl = self.stage3.algorithm in RL_ALGORITHMS
        if rl and self.ppo.model_reward_weight > 0:
            needs, has = REWARD_HEADS[self.ppo.reward], REWARD_HEADS[self.reward.heads]
            if not set(needs) <= set(has):
                fits = [name for name, heads in REWARD_HEADS.items() if set(heads) <= set(has)]
                raise ValueError(
                    f"ppo.reward: {self.ppo.reward!r} needs the reward model's {' and '.join(needs)} head(s), "
                    f"but reward.heads={self.reward.heads!r} trains only {' and '.join(has)}; "
                    f"allowed with it: {', '.join(fits)}")
        if rl and self.ppo.prior_reward_weight > 0 and not self.reward.page_prior:
            raise ValueError("ppo.prior_reward_weight > 0 needs the page prior: set reward.page_prior=true")
        if (self.stage3.algorithm == "dpo" and self.dpo.on_policy and self.dpo.ranker == "prior"
                and not self.reward.page_prior):
            raise ValueError("dpo.ranker=prior needs the page prior: set reward.page_prior=true")
        return self

    def uses_reward_model(self) -> bool:
        """Whether stage 3 reads the reward stage's output (so the pipeline trains it)."""
        algo = self.stage3.algorithm
        if algo in RL_ALGORITHMS:
            return self.ppo.model_reward_weight > 0 or self.ppo.prior_reward_weight > 0
        return algo == "dpo" and self.dpo.on_policy


def _eval_page_len(tree: dict) -> dict:
    """`eval.page_len` used to repeat `data.page_len`. A saved run config that still holds
    it loads when the two agree; a different value fails, naming the field to set."""
    if not isinstance(tree.get("eval"), dict) or "page_len" not in tree["eval"]:
        return tree
    data = tree.get("data") if isinstance(tree.get("data"), dict) else {}
    data_len = data.get("page_len", DataConfig.model_fields["page_len"].default)
    if tree["eval"]["page_len"] != data_len:
        raise ValueError(f"eval.page_len: removed; the page length is data.page_len "
                         f"(got eval.page_len={tree['eval']['page_len']!r}, data.page_len={data_len!r})")
    return {**tree, "eval": {k: v for k, v in tree["eval"].items() if k != "page_len"}}


def _stage3_keys(tree: dict) -> dict:
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


def _grpo_presets(tree: dict) -> dict:
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


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A config file or override is wrong; raised before any work starts."""


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=v` -> ("a.b", v) with v parsed as YAML (so 1e-5, true, [1,2] work)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads "1e-5" as a string; a number written that way is meant as a float.
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (default: configs/tiny.yaml), apply overrides, validate."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        source = f"{path}{' + overrides' if overrides else ''}"
        problems = [_describe(err) for err in exc.errors()]
        if len(problems) == 1:  # the usual case: one line, naming the field
            raise ConfigError(f"invalid config ({source}): {problems[0]}") from None
        raise ConfigError("\n".join([f"invalid config ({source}):", *(f"  {p}" for p in problems)])) from None


def _describe(err: dict) -> str:
    """`field.path: message` for one pydantic error (a Config-level check names its fields
    in its message)."""
    msg = err["msg"].removeprefix("Value error, ")
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {msg}" if where else msg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
