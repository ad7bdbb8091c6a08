"""Typed configuration: YAML files plus dotted overrides (`--set ppo.lr=1e-5`).

Every model forbids unknown keys, so a typo in a config file or an override fails
before any work starts instead of being silently ignored. The tree's sections live in
`sections` (data, model, SFT, reward, eval, serve) and `stage3` (stage3, ppo, dpo, degre),
the root and its cross-section checks in `tree`, file reading and `--set` in `loading`.
"""

from pagellm.config.base import Strict, one_of
from pagellm.config.loading import DEFAULT_CONFIG, ConfigError, load_config, parse_override, save_config
from pagellm.config.sections import (DataConfig, EvalConfig, LoraConfig, ModelConfig, ProbedTraining, RewardConfig,
                                     ServeConfig, SFTConfig, SimulatorConfig, TrainCommon)
from pagellm.config.stage3 import (GRPO_GROUP, DeGReConfig, DPOConfig, EvaluatorConfig, GuidedConfig, PPOConfig,
                                   Stage3Config)
from pagellm.config.tree import Config

__all__ = ["DEFAULT_CONFIG", "GRPO_GROUP", "Config", "ConfigError", "DataConfig", "DeGReConfig", "DPOConfig",
           "EvalConfig", "EvaluatorConfig", "LoraConfig", "ModelConfig", "PPOConfig", "ProbedTraining",
           "RewardConfig", "SFTConfig", "ServeConfig", "SimulatorConfig", "Stage3Config", "Strict", "TrainCommon",
           "load_config", "one_of", "parse_override", "save_config"]
