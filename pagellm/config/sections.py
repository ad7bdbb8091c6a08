"""The data, model, SFT, reward, evaluation and serving sections of the config tree."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from pagellm.config.base import Strict, one_of
from pagellm.eval.baselines.params import BASELINE_PARAMS, BASELINES


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
    # Visits satiate as pages do: each item of a history visit is drawn with weight x
    # (1 - satiation)^(earlier items of its category in the visit), so the logs carry the
    # discount the utility applies (docs/BENCHMARKS.md, "A world whose logs carry its
    # satiation"). Off: histories ignore satiation, the world every tiny number before
    # 2026-12-07 was measured in.
    visit_satiation: bool = False


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
    # End the prompt with the template's closing words ("The user will interact with :"), as
    # the paper does. Off, the page follows the history's last item directly, so its first
    # item is read out where next-item training scores every history item (SASRec's
    # read-out); the closing words' position is otherwise trained once per user.
    prompt_tail: bool = True
    # Decoding adds this weight x the page's first-position item logits (the policy's own
    # next-item ranking) to every later position's: a product of experts of the page model
    # and its ranking (pagellm/models/decoding.py). Written greedily, later positions
    # condition on placed items that are mostly misses; the ranking does not. Every reader
    # of page probabilities (eval, serve, stage 3, the probe) decodes the same policy.
    # Fixed when the policy is built and saved with it (TokenLayout), like prompt_tail.
    ranking_prior: float = Field(0.0, ge=0.0)
    # Where the item token rows start when the policy is built (not loaded): "random" keeps
    # the architecture's init; "metadata" starts them from the items' title words, brand and
    # category path (pagellm/models/item_init.py), so an item the log shows a handful of
    # times begins beside items like it. Its rows are scaled to item_init_scale x the
    # standard deviation of the random rows they replace.
    item_init: Literal["random", "metadata"] = "random"
    item_init_scale: float = Field(1.0, gt=0.0)


class TrainCommon(Strict):
    epochs: int = Field(1, ge=0)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(32, ge=1)
    weight_decay: float = 0.0
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    grad_clip: float = 1.0
    # AdamW's second-moment decay. An item row gets a large gradient only in the few steps
    # its item is in the batch; a longer memory (0.98, SASRec's) keeps those steps' updates
    # larger against the small dense gradient it gets as a negative everywhere else. On Beauty
    # 0.98 doubled the recall of rare items' training transitions (docs/BENCHMARKS.md).
    adam_beta2: float = Field(0.95, gt=0.0, lt=1.0)
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
    # Next-item rows mask, at each position, the items the user took before it (what decoding
    # and the evaluation mask): the softmax is trained over the items it will rank. False
    # = SASRec's unmasked softmax, which ranked 5 % better on Beauty's validation
    # (docs/BENCHMARKS.md). The page rows always mask the prompt.
    meta_block_seen: bool = False
    # The next-item phase validates and publishes an exponential moving average of its
    # weights over about this many epochs of steps (pagellm/train/weight_average.py; decay
    # 1 - 1 / (epochs x steps per epoch)); training continues on the raw weights. 0 = off.
    meta_average_epochs: float = Field(0.0, ge=0.0)
    # What early-stops the next-item phase and picks the checkpoint the page phase starts
    # from: "page" = validation NDCG@10 of the page it writes greedily, "ranking" = of the
    # top 10 of its next-item scores (its own task, as SASRec is validated), "loss" = the
    # held-out validation items' cross-entropy. Either way the published checkpoint is the
    # best written page of either phase. On Musical Instruments (~700 probe users) "ranking"
    # and "loss" stopped at epochs 3-4 in two seeds of three and lost to "page"
    # (docs/BENCHMARKS.md).
    meta_select: Literal["page", "ranking", "loss"] = "page"
    user_dropout: float = Field(0.1, ge=0.0, le=1.0)  # share of rows repeated without the user token
    # Softmax over item tokens only at item positions (SASRec's cross-entropy over items),
    # with the page's constraints (items already on the page or in the prompt masked) in the
    # page phase; false = cross-entropy over the whole vocabulary, the plain LM loss.
    item_loss: bool = True
    # Page-phase target at each position: "sequence" = the golden page's next item (teacher
    # forcing), "set" = any golden item not yet placed (log of their summed probability),
    # so the order of the page is the model's own confidence.
    page_loss: Literal["sequence", "set"] = "sequence"
    # Share of each page-phase batch written on the policy's own greedy page instead of the
    # golden one, the targets at each position being the golden items not yet on it
    # (pagellm/train/sft_rows.py own_prefix_rows): training conditions on what decoding does.
    # Needs page_loss=set (a teacher-forced target has no meaning after a wrong guess).
    own_prefix: float = Field(0.0, ge=0.0, le=1.0)
    # Weight of the KL that pulls every page position toward the next-item ranking of the
    # model the page phase starts from (frozen), over the items still allowed there
    # (pagellm/train/rank_distill.py): the written page keeps what the next-item phase
    # learned. Needs item_loss and a next-item phase to be the teacher.
    rank_distill: float = Field(0.0, ge=0.0)
    # Logit adjustment (pagellm/train/logit_adjust.py): both phases' item softmax trains on
    # the logits plus logit_adjust x log(1 + the item's training count), and pages are
    # ranked on the logits alone, so rare items are not ranked down for being rare. 0 = off.
    logit_adjust: float = Field(0.0, ge=0.0)
    # Share of the next-item phase's rows (each user's training history, a fixed seeded
    # sample) mixed into every page-phase epoch. They take the item loss, and with
    # rank_distill each of their positions is pulled toward the teacher's prediction at that
    # position: the next-item model the page reads from is kept while positions 2-10 learn
    # the page (without it, Beauty's validation ranking fell 15 % in the page phase's first
    # epoch; docs/BENCHMARKS.md). own_prefix rewrites page rows only.
    history_replay: float = Field(0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _page_options_fit(self):
        if self.own_prefix > 0 and self.page_loss != "set":
            raise ValueError(f"sft.own_prefix={self.own_prefix} needs sft.page_loss=set, got {self.page_loss!r}")
        if self.own_prefix > 0 and self.history_replay > 0 and self.zero_stage == 3 and self.workers > 1:
            # Under ZeRO-3 every forward gathers weights collectively, so the ranks must decode
            # in step; with history rows mixed in, their batches hold different numbers of pages.
            raise ValueError("sft.own_prefix with sft.history_replay is not supported under sft.zero_stage=3 on "
                             "several workers (the ranks would write different numbers of pages)")
        if self.meta_average_epochs > 0 and self.zero_stage == 3:
            # ZeRO-3 partitions the parameters: no rank holds the whole weights to average.
            raise ValueError("sft.meta_average_epochs needs sft.zero_stage < 3 (ZeRO-3 partitions the weights)")
        if self.rank_distill > 0 and not (self.item_loss and self.meta_epochs > 0):
            raise ValueError(f"sft.rank_distill={self.rank_distill} needs sft.item_loss=true and sft.meta_epochs > 0 "
                             "(the next-item phase's checkpoint is the teacher)")
        if self.logit_adjust > 0 and not self.item_loss:
            raise ValueError(f"sft.logit_adjust={self.logit_adjust} needs sft.item_loss=true (it offsets the item softmax)")
        return self


class RewardConfig(TrainCommon):
    epochs: int = 5
    lr: float = 1e-5
    batch_size: int = 64
    # "none" trains no head, only the page prior (needs reward.page_prior): for a stage 3 that
    # reads the prior alone (guided; DeGRe's or DPO's prior; PPO with prior_reward_weight only),
    # where the heads cost a reward-model training nobody reads (~17 min of Beauty's pipeline
    # on the 2-core box; a backbone's worth on Llama). The simulator's fidelity block then
    # measures the prior and the policy's own signals, not R.
    heads: Literal["sum", "coarse", "fine", "none"] = "sum"
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
    # Where the prior's category discount c comes from: "pairs" fits it with the quality
    # weight on the pairs (whose one-category corruptions drive it to ~1); "logs" reads it
    # off the training logs: how much less often the next item repeats the previous one's
    # category than a reordering of the user's own items would (page_prior.py). Measured
    # alike on the simulator; real logs cluster, so there "logs" gives c = 0.
    prior_satiation: Literal["logs", "pairs"] = "pairs"
    # Where the prior's quality weight b comes from: "next_item" fits it to the training users'
    # last training positives, each as the next item after the positives before it (how much
    # item quality adds to the SFT policy's preference in predicting what users take next);
    # "pairs" fits it with c on the pairs, whose golden pages are ranked by the same item mean
    # rating, so they overstate it (tiny: b 1.1-3.0 vs 0.5-0.75; the prior's fidelity 0.58 vs
    # 0.64, docs/BENCHMARKS.md).
    prior_quality: Literal["next_item", "pairs"] = "next_item"
    # On-policy pairs (pagellm/train/onpolicy_pairs.py): the SFT policy writes this many pages
    # for every user's latest prompt and training cut points, the page prior scores them, and
    # they are paired at random, each pair with the prior's score difference as the margin the
    # heads regress; the heads train on these beside the data stage's pairs. 0 = the data
    # stage's pairs only. The pairs the data stage builds (golden page vs a corruption of it)
    # are pages the policy never writes, and on them the heads learn "looks like the SFT
    # policy's page": on the tiny world R ranked the policy's own samples at within-user
    # Spearman 0.26 with the true utility; with 128, ~0.6 (the prior it learns from 0.68;
    # docs/BENCHMARKS.md, "On-policy pairs"), at ~10x the stage's time. Needs reward.page_prior.
    onpolicy_samples: int = Field(0, ge=0)
    # Train the reward model with its backbone's dropout off (TRL's RewardConfig default):
    # the two pages of a pair get different dropout masks, and at the tiny model's 0.3 that
    # noise swamps the small score differences between pages the policy writes.
    disable_dropout: bool = True

    @model_validator(mode="after")
    def _onpolicy(self) -> "RewardConfig":
        if self.onpolicy_samples == 1:
            raise ValueError("reward.onpolicy_samples=1 makes no pair (a better and a worse page): use 0 or >= 2")
        if self.onpolicy_samples and not self.page_prior:
            raise ValueError("reward.onpolicy_samples ranks the policy's pages by the page prior: "
                             "set reward.page_prior=true")
        if self.onpolicy_samples and self.heads == "none":
            raise ValueError("reward.onpolicy_samples builds pairs for the heads, but reward.heads=none trains none")
        return self


class EvalConfig(Strict):
    """The page a model is judged on is `data.page_len` items long (the first items of its
    `list_len`-item list); there is no separate evaluation page length."""

    list_len: int = Field(100, ge=10)
    exclude_history: bool = True
    max_users: int | None = None
    batch_size: int = 64
    baselines: list[Annotated[str, one_of("baseline", BASELINES)]] = Field(
        default_factory=lambda: ["popularity", "sasrec", "ease", "lightgcn"])
    sasrec: dict[str, Any] = Field(default_factory=dict)  # overrides of SASRec's defaults
    ease: dict[str, Any] = Field(default_factory=dict)  # overrides of EASE's defaults
    lightgcn: dict[str, Any] = Field(default_factory=dict)  # overrides of LightGCN's defaults
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

    @field_validator("sasrec", "ease", "lightgcn")
    @classmethod
    def _known_params(cls, params: dict[str, Any], info) -> dict[str, Any]:
        unknown = sorted(set(params) - set(BASELINE_PARAMS[info.field_name]))
        if unknown:
            raise ValueError(f"unknown {info.field_name} parameter(s) {', '.join(unknown)}; "
                             f"allowed: {', '.join(BASELINE_PARAMS[info.field_name])}")
        return params

    def baseline_params(self, name: str) -> dict[str, Any]:
        """The config's overrides for baseline `name` (none for popularity)."""
        return {"sasrec": self.sasrec, "ease": self.ease, "lightgcn": self.lightgcn}.get(name, {})


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
