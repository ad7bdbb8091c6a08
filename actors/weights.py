"""The newest published policy weights, for actors that (re)start mid-run."""

from __future__ import annotations

import ray


@ray.remote(num_cpus=0)
class WeightsBroker:
    """Holds (version, weights ref). A restarted rollout actor asks here instead of the
    learner, which may be busy in an update for seconds."""

    def __init__(self) -> None:
        self.version = 0
        self.ref = None

    def publish(self, version: int, weights: list) -> None:
        # `weights` arrives as [ObjectRef] so Ray keeps the reference instead of fetching
        # the tensors into this actor. Publishes are not awaited by the driver, so never
        # let an older version replace a newer one.
        if self.ref is None or version >= self.version:
            self.version, self.ref = version, weights[0]

    def latest(self) -> tuple[int, list]:
        return self.version, [self.ref] if self.ref is not None else []
