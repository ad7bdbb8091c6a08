"""The policy: a causal LM whose vocabulary holds one token per user and per item.

`build_policy` is the one place a policy comes from: random init from a config
(`model.name: config`, the embedded default), a hub name or a local directory (GPT-2,
Llama or any causal LM), or an earlier PageLLM checkpoint. Pretrained models get the new
tokens appended and their embedding rows drawn from N(0, σ²), σ the std of the existing
rows, so new tokens start at the scale of the old ones. Under LoRA only the adapters and
the new token rows train (peft `trainable_token_indices`).

A checkpoint directory holds the tokenizer, `pagellm_tokens.json`, `pagellm_policy.json`
and either a full model or a LoRA adapter (plus `base/` when the base has no name to be
reloaded from, i.e. a random init). A stage-3 adapter's base is the SFT policy merged
(`stage3_policy`): its checkpoint names the SFT checkpoint (`base_policy`) instead.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pandas as pd
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from pagellm.config import LoraConfig, ModelConfig
from pagellm.models.item_init import metadata_vectors
from pagellm.models.positions import set_positions
from pagellm.vocab import (
    LAYOUT_FILE,
    TokenLayout,
    Vocab,
    build_tokenizer,
    extend_tokenizer,
    load_tokenizer,
    save_tokenizer,
)

POLICY_FILE = "pagellm_policy.json"
ARCH_CONFIGS = {"gpt2": GPT2Config, "llama": LlamaConfig}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: str | torch.device | None = None) -> torch.dtype:
    """"auto" = bfloat16 where the model will run on CUDA, float32 on CPU."""
    if name != "auto":
        return DTYPES[name]
    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    return torch.bfloat16 if on_cuda else torch.float32


def build_policy(
    model_cfg: ModelConfig, vocab: Vocab, seed: int, device: str | torch.device | None = None,
    items: pd.DataFrame | None = None,
):
    """(model, tokenizer, layout) for `model_cfg.name`: "config", a hub name or a local dir.

    `device` only decides the "auto" dtype; the model is returned on CPU. `items` (the data
    stage's items table) is what `model.item_init: metadata` starts the item rows from; an
    earlier PageLLM checkpoint keeps its trained rows.
    """
    dtype = resolve_dtype(model_cfg.dtype, device)
    if model_cfg.name == "config":
        model, tokenizer, layout = _from_config(model_cfg, vocab, seed, dtype)
    elif is_policy_checkpoint(model_cfg.name):
        # An earlier PageLLM checkpoint (e.g. SFT output): its tokens must be this vocabulary.
        model, tokenizer, layout = load_policy(model_cfg.name, model_cfg, device=device)
        if (layout.n_users, layout.n_items) != (vocab.n_users, vocab.n_items):
            raise ValueError(
                f"{model_cfg.name} was built for {layout.n_users} users / {layout.n_items} items, "
                f"the data has {vocab.n_users} / {vocab.n_items}"
            )
        return model, tokenizer, layout
    else:
        model, tokenizer, layout = _from_pretrained(model_cfg.name, vocab, seed, dtype)
    if model_cfg.item_init == "metadata":
        if items is None:
            raise ValueError("model.item_init=metadata needs the data stage's items table (items.parquet)")
        init_item_rows_from_metadata(model, layout, items, model_cfg.item_init_scale, seed)
    layout.user_tokens = model_cfg.user_tokens
    layout.ranking_prior = model_cfg.ranking_prior
    if not model_cfg.prompt_tail:
        layout.drop_tail()
    set_positions(model, model_cfg.positions)
    if model_cfg.lora.enabled:
        model = apply_lora(model, model_cfg.lora, layout)
    return model, tokenizer, layout


def is_policy_checkpoint(name: str) -> bool:
    """`model.name` is an earlier PageLLM checkpoint (loaded as trained, tokens and all)."""
    return (Path(name) / LAYOUT_FILE).exists()


def _from_config(model_cfg: ModelConfig, vocab: Vocab, seed: int, dtype: torch.dtype):
    tokenizer, layout = build_tokenizer(vocab)
    fields = dict(model_cfg.init)
    fields.update(
        vocab_size=layout.vocab_size,
        eos_token_id=layout.eos_id,
        pad_token_id=layout.pad_id,
        bos_token_id=layout.eos_id if layout.bos_id is None else layout.bos_id,
    )
    config_cls = ARCH_CONFIGS[model_cfg.arch]
    # transformers configs keep unknown kwargs as attributes, so a typo ("n_layers") would
    # silently build the default-size model; refuse fields the config does not define.
    defaults = config_cls()
    unknown = sorted(k for k in model_cfg.init if not hasattr(defaults, k))
    if unknown:
        raise ValueError(f"model.init: {unknown} are not {config_cls.__name__} fields")
    config = config_cls(**fields)
    # A private RNG stream: the init depends on `seed` alone and leaves the caller's RNG be.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model, tokenizer, layout


def _from_pretrained(name: str, vocab: Vocab, seed: int, dtype: torch.dtype):
    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    tokenizer, layout = extend_tokenizer(tokenizer, vocab)
    old_rows = model.get_input_embeddings().weight.shape[0]
    # Some checkpoints pad their embedding past len(tokenizer); never shrink those.
    model.resize_token_embeddings(max(layout.vocab_size, old_rows), mean_resizing=False)
    init_new_token_rows(model, layout.user_offset, layout.item_offset + layout.n_items, seed)
    model.config.eos_token_id = layout.eos_id
    model.config.pad_token_id = layout.pad_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = layout.pad_id
    return model, tokenizer, layout


@torch.no_grad()
def init_new_token_rows(model: PreTrainedModel, start: int, stop: int, seed: int) -> None:
    """Rows start..stop-1 of the input (and untied output) embeddings ~ N(0, σ²),
    σ the std of rows 0..start-1 of the same matrix."""
    gen = torch.Generator().manual_seed(seed)
    for weight in _token_row_matrices(model):
        sigma = weight[:start].float().std().item()
        rows = torch.randn((stop - start, weight.shape[1]), generator=gen) * sigma
        weight[start:stop] = rows.to(weight.dtype)


@torch.no_grad()
def init_item_rows_from_metadata(model: PreTrainedModel, layout: TokenLayout, items: pd.DataFrame, scale: float,
                                 seed: int = 0) -> int:
    """Overwrite the item rows of the input (and untied output) embeddings with metadata
    vectors (pagellm/models/item_init.py) at `scale` × the std of the rows they replace;
    items without metadata keep their rows. Returns how many rows were set."""
    if len(items) != layout.n_items:
        raise ValueError(f"items table has {len(items)} rows, the vocabulary {layout.n_items} items")
    vec, has = metadata_vectors(items, model.get_input_embeddings().weight.shape[1], seed)
    ids = torch.from_numpy(has.nonzero()[0]) + layout.item_offset
    for weight in _token_row_matrices(model):
        sigma = weight[layout.item_offset : layout.item_offset + layout.n_items].float().std().item()
        weight[ids] = (torch.from_numpy(vec[has]) * sigma * scale).to(weight.dtype)
    return len(ids)


def _token_row_matrices(model: PreTrainedModel) -> list[torch.Tensor]:
    """The input embedding, and the output embedding when it is not tied to it: where a
    token's rows live."""
    matrices = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight is not matrices[0]:
        matrices.append(out.weight)
    return matrices


def _module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def apply_lora(model: PreTrainedModel, lora_cfg: LoraConfig, layout: TokenLayout):
    """Wrap in peft LoRA; the user/item token rows (input and untied output) train as well."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    new_ids = list(range(layout.user_offset, layout.item_offset + layout.n_items))
    emb = model.get_input_embeddings()
    token_rows = {_module_name(model, emb): new_ids}
    out = model.get_output_embeddings()
    if out is not None and out.weight is not emb.weight:
        token_rows[_module_name(model, out)] = new_ids
    peft_cfg = PeftLoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=lora_cfg.target_modules,
        trainable_token_indices=token_rows,
        # GPT-2 keeps its projections in transposed Conv1D layers; say so instead of letting
        # peft warn and guess.
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def is_adapter_model(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _policy_meta(directory: str | Path) -> dict:
    path = Path(directory) / POLICY_FILE
    return json.loads(path.read_text()) if path.exists() else {"adapter": (Path(directory) / "adapter_config.json").exists()}


def reference_is_base(sft_dir: str | Path, model_cfg: ModelConfig) -> bool:
    """Whether stage 3's policy from `sft_dir` is an adapter over the SFT policy, so the
    reference is the policy itself with its adapter disabled (see `stage3_policy`)."""
    return bool(_policy_meta(sft_dir)["adapter"]) or model_cfg.lora.enabled


def stage3_policy(sft_dir: str | Path, model_cfg: ModelConfig, trainable: bool = True,
                  device: str | torch.device | None = None, seed: int = 0):
    """(model, tokenizer, layout) stage 3 starts from. An SFT adapter is merged into its
    base, which becomes the frozen base of a fresh adapter of the same LoRA config: the
    frozen SFT policy is then this model with the adapter disabled (no second copy), and
    only the fresh adapter and token rows train and travel. The fresh adapter trains the
    new token rows again, as SFT's did: the rows are where a reward on an item lands most
    directly, and full fine-tuning (GPT-2) trains them too. A full SFT checkpoint is
    loaded as before (fresh adapters over it when `model_cfg.lora.enabled`)."""
    if not _policy_meta(sft_dir)["adapter"]:
        return load_policy(sft_dir, model_cfg, trainable=trainable, device=device)
    merged, tokenizer, layout, lora_cfg = _merged_adapter(sft_dir, model_cfg.dtype, device)
    # A private RNG stream: LoRA's A matrices depend on `seed` alone (B starts at 0, so the
    # fresh adapter changes nothing until it trains).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = apply_lora(merged, lora_cfg, layout)
    if not trainable:
        model.requires_grad_(False)
    return model, tokenizer, layout


def adapter_weights(model) -> dict[str, torch.Tensor]:
    """What a rollout actor needs after an update: every trainable tensor (under LoRA only
    the adapters and the new token rows), as CPU copies."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_weights(model, weights: dict[str, torch.Tensor]) -> None:
    """Load published weights (a subset of the model's parameters) in place."""
    missing = set(weights) - {n for n, _ in model.named_parameters()}
    if missing:
        raise KeyError(f"published weights name unknown parameters: {sorted(missing)[:5]}")
    model.load_state_dict(weights, strict=False)


def export_merged(directory: str | Path, out: str | Path, dtype: str = "auto") -> Path:
    """Write the checkpoint at `directory` to `out` as one full model (adapters merged), so
    it loads without the checkpoints it was built on."""
    model, tokenizer, layout = load_policy(directory, ModelConfig(dtype=dtype), trainable=False)
    if is_adapter_model(model):
        model = model.merge_and_unload()
    # An adapter published to `out` earlier would be read instead of the full model.
    for stale in ("adapter_config.json", "adapter_model.safetensors", "base"):
        path = Path(out) / stale
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return save_policy(model, tokenizer, layout, out)


def save_policy(
    model, tokenizer, layout: TokenLayout, directory: str | Path, merged: bool = False, state_dict: dict | None = None
) -> Path:
    """Write a checkpoint load_policy reads. Under LoRA: the adapter (with the new token rows),
    `base/` when the base cannot be reloaded by name, and with `merged=True` a standalone
    full model in `merged/`. `state_dict`: full weights gathered by the trainer (under
    ZeRO-3 the module's own parameters are shards)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tokenizer, layout, directory)
    rows = model.config.vocab_size if state_dict is not None else model.get_input_embeddings().weight.shape[0]
    meta = {"adapter": is_adapter_model(model), "base": None, "embedding_rows": rows}
    if meta["adapter"]:
        # The token rows travel in the adapter (trainable tokens), so the embedding
        # matrices need not be copied into it.
        model.save_pretrained(
            str(directory), save_embedding_layers=False, safe_serialization=True, state_dict=state_dict
        )
        base_name = model.peft_config[model.active_adapter].base_model_name_or_path
        if base_name and (Path(base_name) / POLICY_FILE).exists() and _policy_meta(base_name)["adapter"]:
            meta["base_policy"] = str(Path(base_name).resolve())  # stage3_policy's merged SFT adapter
        elif base_name and (Path(base_name) / "config.json").exists():
            meta["base"] = str(Path(base_name).resolve())
        elif base_name and not Path(base_name).exists():
            meta["base"] = base_name  # a hub name
        else:
            copy.deepcopy(model).unload().save_pretrained(str(directory / "base"), safe_serialization=True)
            meta["base"] = "base"
        if merged:
            full = copy.deepcopy(model).merge_and_unload()
            save_policy(full, tokenizer, layout, directory / "merged")
    else:
        model.save_pretrained(str(directory), safe_serialization=True, state_dict=state_dict)
    (directory / POLICY_FILE).write_text(json.dumps(meta, indent=1))
    return directory


def layout_mismatches(layout: TokenLayout, model_cfg: ModelConfig) -> list[str]:
    """The model fields fixed when a policy was built (saved in its TokenLayout) that differ
    from `model_cfg`, one sentence each. A run whose policy already exists keeps the saved
    values, so `--set model.ranking_prior=...` on it would otherwise be ignored unseen."""
    saved = {"user_tokens": layout.user_tokens, "ranking_prior": layout.ranking_prior,
             "prompt_tail": bool(layout.tail_ids)}
    return [f"model.{key} is {getattr(model_cfg, key)} in the config but {value} in the saved policy"
            for key, value in saved.items() if getattr(model_cfg, key) != value]


def load_policy(
    directory: str | Path,
    model_cfg: ModelConfig | None = None,
    trainable: bool = True,
    device: str | torch.device | None = None,
):
    """(model, tokenizer, layout) from a save_policy directory. A full checkpoint gets fresh
    LoRA adapters when `model_cfg.lora.enabled`; an adapter checkpoint stays an adapter
    (trainable unless `trainable=False`)."""
    directory = Path(directory)
    tokenizer, layout = load_tokenizer(directory)
    dtype = resolve_dtype(model_cfg.dtype if model_cfg else "auto", device)
    meta = _policy_meta(directory)
    if meta["adapter"] or (directory / "adapter_config.json").exists():
        from peft import PeftModel

        if meta.get("base_policy"):
            base = _merged_adapter(meta["base_policy"], model_cfg.dtype if model_cfg else "auto", device)[0]
        else:
            base_ref = meta.get("base") or "base"
            base_path = directory / base_ref if (directory / base_ref).is_dir() else base_ref
            base = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=dtype)
        rows = meta.get("embedding_rows", layout.vocab_size)
        if base.get_input_embeddings().weight.shape[0] != rows:
            base.resize_token_embeddings(rows, mean_resizing=False)
        model = PeftModel.from_pretrained(base, str(directory), is_trainable=trainable)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype)
        if model_cfg is not None and model_cfg.lora.enabled:
            model = apply_lora(model, model_cfg.lora, layout)
        elif not trainable:
            model.requires_grad_(False)
    if model.get_input_embeddings().weight.shape[0] < layout.vocab_size:
        raise ValueError(f"{directory}: the model has fewer embedding rows than the tokenizer has tokens")
    return model, tokenizer, layout


def _merged_adapter(directory: str | Path, dtype: str, device):
    """(model, tokenizer, layout, LoRA config) of the adapter checkpoint at `directory`,
    merged into one model. The merged weights exist nowhere on disk: the model is named
    after `directory`, so save_policy records an adapter over it as `base_policy` and
    load_policy rebuilds that base by merging again."""
    adapter, tokenizer, layout = load_policy(directory, ModelConfig(dtype=dtype), trainable=False, device=device)
    peft_cfg = adapter.peft_config[adapter.active_adapter]
    lora_cfg = LoraConfig(enabled=True, r=peft_cfg.r, alpha=peft_cfg.lora_alpha, dropout=peft_cfg.lora_dropout,
                          target_modules=sorted(peft_cfg.target_modules))
    merged = adapter.merge_and_unload()
    merged.name_or_path = merged.config._name_or_path = str(Path(directory).resolve())
    return merged, tokenizer, layout, lora_cfg
