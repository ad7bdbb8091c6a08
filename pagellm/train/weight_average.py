"""An exponential moving average of a model's weights (Polyak averaging), for what a stage
validates and publishes while the optimiser keeps training the raw weights.

    avg <- decay * avg + (1 - decay) * w        after every optimiser step

Why: the next-item phase trains at a high learning rate (2e-3 on the Amazon sets) and its
validation ranking moves by about a standard error from epoch to epoch; the average of the
last few hundred steps is a smoother point of the same trajectory (docs/BENCHMARKS.md has
what it measured). Plain torch: the harness updates it, swaps it in to validate and save,
and keeps its state beside the DeepSpeed checkpoint so a resumed run continues it.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

AVERAGE_FILE = "weight_average.safetensors"


class WeightAverage:
    """The EMA of `module`'s trainable parameters (buffers are not averaged: the policy has
    none that training changes). The first update copies the weights (no bias from init)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"weight-average decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.shadow: dict[str, torch.Tensor] | None = None
        self.updates = 0

    @classmethod
    def over_epochs(cls, module: torch.nn.Module, epochs: float, steps_per_epoch: int) -> "WeightAverage":
        """An average spanning about `epochs` epochs of steps: decay 1 - 1 / steps (>= 2 steps)."""
        return cls(module, decay=1.0 - 1.0 / max(2.0, epochs * steps_per_epoch))

    def _params(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        params = dict(module.named_parameters())
        return {n: params[n] for n in self.names}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        params = self._params(module)
        if self.shadow is None:
            # float32 whatever the module's dtype: a bf16 average would round away steps of
            # (1 - decay) = 1e-3 of a weight.
            self.shadow = {n: p.detach().float().clone() for n, p in params.items()}
        else:
            for n, p in params.items():
                self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)
        self.updates += 1

    @contextmanager
    def applied(self, module: torch.nn.Module):
        """The averaged weights in `module` for the block (validate, save), the raw ones after."""
        if self.shadow is None:  # nothing averaged yet: the raw weights are the average
            yield module
            return
        params = self._params(module)
        raw = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.shadow[n])
        try:
            yield module
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(raw[n])

    def save(self, directory: str | Path) -> None:
        if self.shadow is not None:
            tensors = {n: t.contiguous().cpu() for n, t in self.shadow.items()}
            save_file(tensors, str(Path(directory) / AVERAGE_FILE), metadata={"updates": str(self.updates)})

    def load(self, directory: str | Path, device: torch.device | str = "cpu") -> bool:
        """Restore a saved average; False when `directory` holds none (a run saved before any update)."""
        path = Path(directory) / AVERAGE_FILE
        if not path.exists():
            return False
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            self.updates = int(f.metadata()["updates"])
            loaded = {n: f.get_tensor(n) for n in f.keys()}
        missing = set(self.names) - set(loaded)
        if missing:
            raise ValueError(f"{path} lacks {len(missing)} averaged parameter(s), e.g. {sorted(missing)[:3]}")
        self.shadow = {n: loaded[n] for n in self.names}
        return True
