"""Named registries of the interchangeable pieces of PPO (as in veRL's core_algos).

`ppo.advantage` and `ppo.policy_loss` in the config name an entry here, so a new
estimator or loss is one decorated function, with no change to the learner. The names
themselves are declared in `pagellm.names` (which the config validates against, without
importing torch): a registry refuses a name that is not declared there, and
tests/test_config.py checks that every declared name has its function.

Calling conventions (every entry of a registry takes the same arguments):
- advantage estimators: `fn(rewards, values, mask, *, gamma, lam, group_ids=None)
  -> (advantages [B,T], returns [B,T])`, zero on padding, not whitened;
- policy losses: `fn(logprobs, old_logprobs, advantages, mask, clip)
  -> (loss scalar, stats dict of floats)`;
- KL estimators: `fn(logprobs, ref_logprobs) -> per-token KL` (unmasked).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

from pagellm import names


class Registry(dict):
    """A name -> function table over a declared set of names; failed lookups list them."""

    def __init__(self, kind: str, declared: Sequence[str]):
        super().__init__()
        self.kind = kind
        self.declared = tuple(declared)

    def __missing__(self, name: str):
        if name in self.declared:  # tests/test_config.py checks that this never happens
            raise KeyError(f"{self.kind} {name!r} is declared in pagellm/names.py but no function is registered")
        known = ", ".join(sorted(self)) or "(none)"
        raise KeyError(f"unknown {self.kind} {name!r}; known: {known}")

    def register(self, name: str) -> Callable[[Callable], Callable]:
        if name not in self.declared:
            raise ValueError(f"{self.kind} {name!r} is not declared in pagellm/names.py "
                             f"(declared: {', '.join(self.declared)}); add it there so configs may select it")

        def decorator(fn: Callable) -> Callable:
            # A second registration under one name is almost always a copy-paste slip
            # that would silently change which function a config selects.
            if name in self and self[name] is not fn:
                raise ValueError(f"{self.kind} {name!r} is already registered ({self[name].__qualname__})")
            self[name] = fn
            return fn

        return decorator


ADVANTAGE_ESTIMATORS = Registry("advantage estimator", names.ADVANTAGE_ESTIMATORS)
POLICY_LOSSES = Registry("policy loss", names.POLICY_LOSSES)
KL_ESTIMATORS = Registry("KL estimator", names.KL_ESTIMATORS)


def register_advantage(name: str) -> Callable[[Callable], Callable]:
    return ADVANTAGE_ESTIMATORS.register(name)


def register_policy_loss(name: str) -> Callable[[Callable], Callable]:
    return POLICY_LOSSES.register(name)


def register_kl(name: str) -> Callable[[Callable], Callable]:
    return KL_ESTIMATORS.register(name)


def get_advantage(name: str) -> Callable:
    return ADVANTAGE_ESTIMATORS[name]


def get_policy_loss(name: str) -> Callable:
    return POLICY_LOSSES[name]


def get_kl_estimator(name: str) -> Callable:
    return KL_ESTIMATORS[name]


# The built-in entries register themselves when their modules load; importing them here
# means `from pagellm.rl.registry import get_advantage` alone sees a full table.
import pagellm.rl.advantages  # noqa: E402,F401
import pagellm.rl.losses  # noqa: E402,F401
