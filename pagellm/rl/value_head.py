"""The critic of PPO: a linear head on the policy's final hidden states, one value per token.

The learner writes it on its own (`value_head.safetensors`) beside the policy's Hugging Face
checkpoint, so the policy directory stays loadable by `from_pretrained` and the critic can be
inspected. A resumed run does not read that file: the learner's DeepSpeed state holds the
value head with the policy (`actors/learner.py::restore`), so there is no loader here.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file
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
