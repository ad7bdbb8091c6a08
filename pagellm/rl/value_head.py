"""The critic of PPO: a linear head on the policy's final hidden states, one value per token.

It is saved on its own (`value_head.safetensors` in a directory) beside the policy's
Hugging Face checkpoint, so the policy directory stays loadable by `from_pretrained`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueHead(nn.Module):
    """hidden [B,T,H] -> values [B,T]; computed in the head's own dtype (fp32 by default)
    so a bf16 backbone does not quantise the value targets."""

    def __init__(self, hidden_size: int, dropout: float = 0.0):
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.hidden_size = hidden_size
        self.dropout_p = dropout
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.summary = nn.Linear(hidden_size, 1)
        # Small initial values keep the first GAE targets dominated by rewards, not noise.
        nn.init.normal_(self.summary.weight, std=1.0 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden size {hidden_states.shape[-1]} != value head's {self.hidden_size}")
        x = self.dropout(hidden_states.to(self.summary.weight.dtype))
        return self.summary(x).squeeze(-1)

    def save(self, directory: str | Path) -> Path:
        """Write `<directory>/value_head.safetensors` (weights + hidden size and dropout)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / VALUE_HEAD_FILE
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"hidden_size": str(self.hidden_size), "dropout": str(self.dropout_p)})
        return path

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> "ValueHead":
        path = Path(directory) / VALUE_HEAD_FILE
        if not path.exists():
            raise FileNotFoundError(f"no value head at {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path), device=str(device))
        hidden_size = int(meta.get("hidden_size", tensors["summary.weight"].shape[1]))
        head = cls(hidden_size, dropout=float(meta.get("dropout", 0.0)))
        head.load_state_dict(tensors)
        return head.to(device=device, dtype=tensors["summary.weight"].dtype)
