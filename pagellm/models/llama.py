"""A Llama-3.2-1B-shaped checkpoint with random weights, for scale runs without the hub.

`write_llama_checkpoint` writes what a download of meta-llama/Llama-3.2-1B holds and reads
the same way (`config.json` + safetensors through save_pretrained, a tokenizer of the full
128,256 ids with `<|begin_of_text|>` / `<|end_of_text|>` where Llama 3 has them), so
`model.name: <that dir>` takes the path a real local copy takes: `build_policy` appends
the user/item tokens after the tokenizer's last id and resizes the embeddings.

The tokenizer is a word-level stand-in (the template words, the specials, reserved
fillers), not Llama's BPE: random weights read no text, and the prompt template cuts into
ids the same way under either. Overrides shrink the same code path for tests.

Real size: 1.24 B parameters (the 128,256 x 2048 embedding, tied with the output, is 263 M
of them): ~2.5 GB to build and save in bfloat16 (as published), ~5 GB in float32.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from pagellm.vocab import TEMPLATE_HEAD, TEMPLATE_TAIL

# meta-llama/Llama-3.2-1B config.json, the fields that shape the network.
LLAMA_3_2_1B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "vocab_size": 128256,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}
# Llama 3 keeps its 256 special ids at the top of the vocabulary; <|begin_of_text|> is the first.
N_SPECIAL_IDS = 256

# The same path at a few thousand weights: what tests and `--size tiny` build.
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 512, "bos_token_id": 256, "eos_token_id": 257}


def llama_config(**overrides) -> LlamaConfig:
    """The published Llama-3.2-1B configuration, with `overrides` (e.g. TINY) on top."""
    fields = {**LLAMA_3_2_1B, **overrides}
    if fields["bos_token_id"] != fields["vocab_size"] - N_SPECIAL_IDS:
        raise ValueError("bos_token_id must sit 256 ids below vocab_size, as in Llama 3")
    return LlamaConfig(**fields)


def n_parameters(config: LlamaConfig) -> int:
    """Weights of a Llama of `config`, counted from its shapes (nothing is built)."""
    h, inner = config.hidden_size, config.intermediate_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    layer = 2 * h * q + 2 * h * kv + 3 * h * inner + 2 * h  # q, o; k, v; gate, up, down; two norms
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    return embeddings + config.num_hidden_layers * layer + h  # + the final norm


def llama_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """`vocab_size` ids: the template words, reserved fillers, then Llama 3's specials
    (bos, eos, reserved); bos is prepended to every encoding, as Llama 3's tokenizer does."""
    words = list(dict.fromkeys(f"{TEMPLATE_HEAD} {TEMPLATE_TAIL}".split()))
    special_at = vocab_size - N_SPECIAL_IDS
    words += [f"<|filler_{n}|>" for n in range(special_at - len(words))]
    words += ["<|begin_of_text|>", "<|end_of_text|>"]
    words += [f"<|reserved_special_token_{n}|>" for n in range(vocab_size - len(words))]
    core = Tokenizer(models.WordLevel({w: n for n, w in enumerate(words)}, unk_token="<|reserved_special_token_0|>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", special_at)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   unk_token="<|reserved_special_token_0|>")


def write_llama_checkpoint(directory: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                           **overrides) -> Path:
    """A random-init Llama-3.2-1B (or `overrides` of it) saved as a hub download is laid
    out; `dtype` bfloat16 as published."""
    directory = Path(directory)
    config = llama_config(**overrides)
    # A private RNG stream: the weights depend on `seed` alone and leave the caller's RNG be.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(str(directory), safe_serialization=True)
    llama_tokenizer(config.vocab_size).save_pretrained(str(directory))
    return directory
