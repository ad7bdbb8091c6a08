"""Stage 3, `stage3.algorithm: guided`: the page prior's category term written into the
policy's decoding, as strong as validation accuracy allows.

The SFT policy's pages repeat categories, and the page prior the reward stage fits says a
repeated category is worth less (its discount c, Bradley-Terry on the diversity and
redundancy pairs). Every trained stage 3 that followed the prior also moved the policy's
ranking and lost accuracy. Rewriting only the page around the policy's own ranking, a mild
category discount alone earns +13 % true utility on the simulator for -0.4 % ndcg@100
(docs/BENCHMARKS.md, "How far a page can move from the policy's own ranking"). This stage
does that in the policy itself, without touching its weights:

    logit'(i | page so far) = logit(i | page so far) - delta x (page items already in i's category)

at the page's positions only (the first `data.page_len`; the rest of a longer list is the
policy's ranking as before). It is the token-level KL-regularised optimum for an item-level
reward of -delta per repeat: pi' proportional to pi_SFT x exp(r / beta), delta = |r| / beta.

delta is chosen on validation, as a stage-3 checkpoint is: the policy writes the lists of
`guided.val_users` validation users (evenly spread) once per candidate in `guided.penalties`,
and each candidate's per-user accuracy (`guided.guard`, e.g. ndcg@10) is paired with the
same users' under the SFT policy's own decoding. Going up the grid, the stage keeps the
largest delta whose mean paired change, less `guided.standard_errors` of its standard error,
stays within `guided.margin` (relative) of the SFT policy's mean on every guarded metric,
stopping at the first that does not: a penalty is kept only when validation can tell its
cost is within the margin. Validation only
judges; nothing trains. The published policy is the SFT checkpoint with delta (and the item
categories) in its token layout, so evaluation, KL and serving decode it as published.

When the prior sees no cost in a repeated category (c = 0, e.g. `reward.prior_satiation:
logs` on logs that cluster) or the data has no categories, the stage publishes the SFT
policy as it is and says why.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pagellm.config import Config
from pagellm.config.stage3 import parse_guard
from pagellm.runfolder import write_json

ALGORITHM = "guided"


def choose_penalty(penalties: list[float], sft: dict[str, np.ndarray], scored: list[dict[str, np.ndarray]],
                   margin: float, standard_errors: float = 1.0) -> tuple[int, list[dict]]:
    """Index into `penalties` of the delta to publish (-1: none, the SFT decoding) and one
    record per candidate. `sft[m]` and `scored[j][m]` are per-user values of guarded metric
    m (same users, same order) under the SFT decoding and under candidate j. Candidates are
    tried in increasing order; the first whose mean paired change less `standard_errors`
    standard errors falls below -margin x the SFT mean, on some metric, ends the search."""
    order = np.argsort(penalties)
    chosen, records, stopped = -1, [None] * len(penalties), False
    for j in order:
        record = {"penalty": float(penalties[j])}
        ok = True
        for metric, base in sft.items():
            diff = scored[j][metric] - base
            se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
            record |= {metric: float(scored[j][metric].mean()), f"{metric}_change": float(diff.mean()),
                       f"{metric}_change_se": se}
            ok &= bool(diff.mean() - standard_errors * se >= -margin * base.mean())
        record["passes"] = ok
        if ok and not stopped:
            chosen = int(j)
        stopped |= not ok
        records[j] = record
    return chosen, records


def _write_lists(model, layout, prompts, exclude, width: int, batch: int) -> list[list[int]]:
    from pagellm.models.decoding import generate_pages

    lists: list[list[int]] = []
    for a in range(0, len(prompts), batch):
        lists += generate_pages(model, layout, prompts[a : a + batch], k=width, exclude=exclude[a : a + batch]).items
    return lists


def _score(lists, targets, guard: list[str]) -> dict[str, np.ndarray]:
    from pagellm.eval.metrics import hr_at_k, ndcg_at_k

    fns = {"ndcg": ndcg_at_k, "hr": hr_at_k}
    out = {}
    for name in guard:
        metric, k = parse_guard(name)
        out[name] = np.array([fns[metric](lst, t, k) for lst, t in zip(lists, targets)], dtype=np.float64)
    return out


def validate_penalties(run_dir: Path, cfg_json: dict, categories: np.ndarray) -> dict:
    """In a worker (harness.in_worker): the SFT decoding's and each candidate's guarded
    metrics on the validation sample, and the prior's mean value of the pages."""
    import copy

    import torch

    from pagellm.config import Config
    from pagellm.eval.runner import load_eval_set
    from pagellm.models.page_prior import PagePrior, first_item_preferences
    from pagellm.models.policy import load_policy
    from pagellm.vocab import PromptEncoder

    cfg = Config.model_validate(cfg_json)
    gcfg = cfg.guided
    model, tokenizer, layout = load_policy(run_dir / "sft", trainable=False)
    model.eval()
    es = load_eval_set(run_dir / "data", "val", None)
    keep = np.unique(np.linspace(0, len(es.prompts) - 1, min(gcfg.val_users, len(es.prompts))).round().astype(int))
    encoder = PromptEncoder(tokenizer, layout)
    prompts = [encoder.encode_prompt(int(es.user_index[i]), es.prompts[i]) for i in keep]
    exclude = [es.exclude[i] for i in keep]
    targets = [es.targets[i] for i in keep]
    width = max(cfg.data.page_len, *(parse_guard(g)[1] for g in gcfg.guard))
    prior = PagePrior.load(run_dir / "reward")
    with torch.inference_mode():
        step = cfg.eval.batch_size  # batches bound the [users, n_items] forward's memory on a large catalogue
        pref = np.concatenate([first_item_preferences(model, layout, prompts[a : a + step])
                               for a in range(0, len(prompts), step)])

        def prior_value(lists):
            return float(prior.score(pref, [lst[: cfg.data.page_len] for lst in lists], categories).mean())

        base_lists = _write_lists(model, layout, prompts, exclude, width, cfg.eval.batch_size)
        out = {"users": len(prompts), "sft": _score(base_lists, targets, gcfg.guard), "candidates": [],
               "prior_sft": prior_value(base_lists), "prior": []}
        for delta in gcfg.penalties:
            guided = with_penalty(copy.deepcopy(layout), delta, cfg.data.page_len, categories)
            lists = _write_lists(model, guided, prompts, exclude, width, cfg.eval.batch_size)
            out["candidates"].append(_score(lists, targets, gcfg.guard))
            out["prior"].append(prior_value(lists))
    return out


def with_penalty(layout, delta: float, positions: int, categories: np.ndarray):
    layout.repeat_penalty = float(delta)
    layout.penalty_positions = int(positions)
    layout.item_category = [int(c) for c in categories]  # the layout is saved as JSON
    return layout


def publish(run_dir: Path, delta: float | None, positions: int, categories: np.ndarray) -> Path:
    """<run>/guided/: the SFT policy's files, its layout carrying delta (None: as it is)."""
    from pagellm.train.stage3_publish import copy_policy
    from pagellm.vocab import TokenLayout

    out = run_dir / ALGORITHM
    copy_policy(run_dir / "sft", out)
    if delta is not None:
        with_penalty(TokenLayout.load(out), delta, positions, categories).save(out)
    return out


def run_guided_stage(cfg: Config, run_dir: Path, log=print) -> dict:
    """Choose delta on validation and publish <run>/guided; returns the selection record."""
    from pagellm.models.page_prior import PagePrior, item_categories
    from pagellm.train.harness import in_worker
    from pagellm.vocab import LAYOUT_FILE

    run_dir = Path(run_dir).resolve()
    t0 = time.perf_counter()
    if not (run_dir / "sft" / LAYOUT_FILE).exists():
        raise FileNotFoundError(f"{run_dir}/sft: no SFT policy; run `pagellm sft --run {run_dir}` first")
    prior = PagePrior.load(run_dir / "reward")
    if prior is None:
        raise FileNotFoundError(f"{run_dir}/reward: no page prior; run `pagellm reward --run {run_dir}` with "
                                f"reward.page_prior=true first")
    gcfg, positions = cfg.guided, cfg.data.page_len
    categories = item_categories(run_dir / "data")
    why = None
    if not (categories >= 0).any():
        why = "the data has no item categories"
    elif prior.satiation <= 0:
        why = "the page prior sees no cost in a repeated category (c = 0)"
    if why:
        out = publish(run_dir, None, positions, categories)
        selection = {"published_step": 0, "unit": "penalty", "repeat_penalty": 0.0, "reason": why, "history": []}
        write_json(out / "selection.json", selection)
        write_json(out / "DONE", {"seconds": round(time.perf_counter() - t0, 1), "published_step": 0,
                                  "repeat_penalty": 0.0, "pages_generated": 0})
        log(f"[guided] done: published the SFT policy as it is ({why}) -> {out}")
        return selection
    log(f"[guided] page prior: repeated category worth x{1 - prior.satiation:.2f}; trying repeat penalties "
        f"{', '.join(f'{d:g}' for d in gcfg.penalties)} on up to {gcfg.val_users:,} validation users, guarding "
        f"{', '.join(gcfg.guard)} within {gcfg.margin:.1%} of the SFT policy's decoding "
        f"(mean paired change less {gcfg.standard_errors:g} standard error(s))")
    found = in_worker(validate_penalties, run_dir, cfg.model_dump(mode="json"), categories)
    chosen, records = choose_penalty(list(gcfg.penalties), found["sft"], found["candidates"], gcfg.margin,
                                     gcfg.standard_errors)
    for record, value in zip(records, found["prior"]):
        record["prior_value"] = value
        changes = ", ".join(f"{m} {record[f'{m}_change']:+.4f} ± {record[f'{m}_change_se']:.4f}" for m in gcfg.guard)
        log(f"[guided] penalty {record['penalty']:g}: {changes} vs SFT; prior value {value:.3f} "
            f"(SFT {found['prior_sft']:.3f}){'' if record['passes'] else ' -- outside the margin'}")
    delta = float(gcfg.penalties[chosen]) if chosen >= 0 else None
    out = publish(run_dir, delta, positions, categories)
    sft_record = {m: float(v.mean()) for m, v in found["sft"].items()}
    step = sorted(gcfg.penalties).index(delta) + 1 if delta is not None else 0  # its rank on the grid
    selection = {"published_step": step, "unit": "penalty", "repeat_penalty": delta or 0.0, "guard": list(gcfg.guard),
                 "margin": gcfg.margin, "standard_errors": gcfg.standard_errors, "users": found["users"], "sft": sft_record,
                 "prior_sft": found["prior_sft"], "history": records}
    write_json(out / "selection.json", selection)
    pages = found["users"] * (len(gcfg.penalties) + 1)
    write_json(out / "DONE", {"seconds": round(time.perf_counter() - t0, 1), "published_step": step,
                              "repeat_penalty": delta or 0.0, "pages_generated": pages})
    what = f"repeat penalty {delta:g}" if delta is not None else "the SFT decoding: no penalty kept accuracy"
    log(f"[guided] done: published {what} -> {out}")
    return selection
