"""The whole config tree, and the checks that span its sections."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from pagellm.config.base import Strict
from pagellm.config.sections import DataConfig, EvalConfig, ModelConfig, RewardConfig, ServeConfig, SFTConfig
from pagellm.config.stage3 import (DeGReConfig, DPOConfig, GuidedConfig, PPOConfig, Stage3Config, grpo_presets,
                                   stage3_keys)
from pagellm.names import REWARD_HEADS, RL_ALGORITHMS


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
    guided: GuidedConfig = Field(default_factory=GuidedConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @model_validator(mode="before")
    @classmethod
    def _retired_keys(cls, tree: Any) -> Any:
        """Keys that moved, read from configs saved before they did; `grpo`'s presets."""
        if not isinstance(tree, dict):
            return tree
        return grpo_presets(stage3_keys(eval_page_len(tree)))

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        rl = self.stage3.algorithm in RL_ALGORITHMS
        if self.reward.heads == "none" and not self.reward.page_prior:
            raise ValueError("reward.heads=none trains only the page prior: set reward.page_prior=true")
        if rl and self.ppo.model_reward_weight > 0:
            needs, has = REWARD_HEADS[self.ppo.reward], REWARD_HEADS.get(self.reward.heads, ())
            if not set(needs) <= set(has):
                fits = [name for name, heads in REWARD_HEADS.items() if set(heads) <= set(has)]
                raise ValueError(
                    f"ppo.reward: {self.ppo.reward!r} needs the reward model's {' and '.join(needs)} head(s), "
                    f"but reward.heads={self.reward.heads!r} trains {' and '.join(has) or 'none'}; "
                    + (f"allowed with it: {', '.join(fits)}" if fits else
                       "set ppo.model_reward_weight=0 (and ppo.prior_reward_weight > 0) or train the heads"))
        if (self.stage3.algorithm == "dpo" and self.dpo.on_policy and self.dpo.ranker == "reward"
                and self.reward.heads == "none"):
            raise ValueError("dpo.ranker=reward ranks pages with the reward model, but reward.heads=none trains none")
        if rl and self.ppo.prior_reward_weight > 0 and not self.reward.page_prior:
            raise ValueError("ppo.prior_reward_weight > 0 needs the page prior: set reward.page_prior=true")
        if (self.stage3.algorithm == "dpo" and self.dpo.on_policy and self.dpo.ranker == "prior"
                and not self.reward.page_prior):
            raise ValueError("dpo.ranker=prior needs the page prior: set reward.page_prior=true")
        if self.stage3.algorithm == "degre" and self.degre.value_model == "page_prior" and not self.reward.page_prior:
            raise ValueError("degre.value_model=page_prior needs the page prior: set reward.page_prior=true")
        if self.stage3.algorithm == "guided" and not self.reward.page_prior:
            raise ValueError("stage3.algorithm=guided follows the page prior's category discount: set reward.page_prior=true")
        missing = [k for k in self.guided.evaluator if k not in self.eval.baselines]
        if self.stage3.algorithm == "guided" and missing:
            # The published policy adds these models' scores: the report must show what they earn alone.
            raise ValueError(f"guided.evaluator adds {' and '.join(missing)}'s scores to the published policy, but "
                             f"eval.baselines leaves {'it' if len(missing) == 1 else 'them'} out, so the evaluation "
                             f"could not show what {'it earns' if len(missing) == 1 else 'they earn'} alone: add "
                             f"{', '.join(missing)} to eval.baselines or drop {'it' if len(missing) == 1 else 'them'} "
                             f"from guided.evaluator")
        return self

    def uses_reward_model(self) -> bool:
        """Whether stage 3 reads the reward stage's output (so the pipeline trains it)."""
        algo = self.stage3.algorithm
        if algo in RL_ALGORITHMS:
            return self.ppo.model_reward_weight > 0 or self.ppo.prior_reward_weight > 0
        if algo == "degre":
            return self.degre.value_model == "page_prior"
        if algo == "guided":
            return True
        return algo == "dpo" and self.dpo.on_policy and self.dpo.ranker != "next_item"


def eval_page_len(tree: dict) -> dict:
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
