"""Stage 3, `stage3.algorithm: guided`: reward terms written into the policy's decoding, as
strong as validation allows, without moving its weights (reward-guided decoding, as ARGS):

    logit'(i | page so far) = logit(i | page so far) + w x s x z_e(i)
                              + [page positions] (b x s x q(i) - delta x (page items already in i's category))

It is the token-level KL-regularised optimum for an item-level reward r(i): pi' proportional
to pi_SFT x exp(r / beta). Three terms:

- the item term (`guided.evaluator`, pagellm/models/evaluator.py): z_e, independently
  trained recommenders' standardised scores for the user (SASRec, EASE or their average,
  whichever validation favours; fitted as the evaluation fits its baselines); s, the spread
  of the policy's own first-position logits, so w is in units of the policy's ranking. The
  rewards read off the SFT policy itself rank pages as the policy already does; a model
  trained apart makes different mistakes (SASRec alone raised test ndcg@100 by 2-3 % on
  MovieLens and Musical Instruments; averaged with EASE, Musical Instruments test ndcg@10 by
  8-10 % per seed);
- the page terms, the page prior's two facts beside preference (pagellm/models/page_prior.py):
  its category discount (delta) and its item quality q (b, in the same units as w). The SFT
  policy's pages repeat categories and follow its preference alone; a mild discount on the
  page earns +13 % true utility on the simulator for -0.4 % ndcg@100, a little quality beside
  it more (docs/BENCHMARKS.md, "How far a page can move from the policy's own ranking").
  Page positions only (the first `data.page_len`; the rest of a longer list is the policy's
  ranking as before).

All are chosen on validation, as a stage-3 checkpoint is: the policy writes the lists of up to
`guided.val_users` validation users (evenly spread, none from the half the SFT stage selected
its checkpoint on, where SFT is flattered) once per candidate, and each
candidate's per-user accuracy (`guided.guard`, e.g. ndcg@10) is paired with the same users'
under the SFT policy's own decoding. The item term must show a gain (`choose_weight` over
every (models, w) of `evaluator_mixes` x `guided.evaluator_weights`: the largest lower bound,
paired change less `guided.standard_errors` standard errors, above 0). The page terms may
cost up to `guided.margin` of the decoding they are added to (the chosen w's; the SFT
policy's when none is kept), because they buy page value the guard cannot
see (`choose_page_terms`): with the chosen w, every (delta, b) pair of the two grids is decoded
and paired with that decoding; of the pairs whose lower bound stays within the margin, and whose
smaller neighbours on both axes do too (a pass after a miss is noise), the one whose pages the
page prior values most is published. Paired with the SFT decoding instead, the page terms could
spend the evaluator's whole gain: on Amazon Beauty a repeat penalty 3 "within 1 % of SFT" took
the evaluator's +3 % test ndcg@10 back to +0.1 % (docs/BENCHMARKS.md). The prior is the stage's
reward, validation accuracy its constraint.
Validation only judges; nothing trains. The published policy is the SFT checkpoint with the
chosen terms (and the item categories and qualities) in its token layout and the evaluator
saved beside it (`evaluator/`), so evaluation, KL and serving decode it as published.

Without categories, or when the prior sees no cost in a repeated category (c = 0), no penalty
is tried; when it gives quality no weight (b <= 0), no quality term; with neither and
`guided.evaluator: []`, the stage publishes the SFT policy as it is and says why.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pagellm.config import Config
from pagellm.config.stage3 import parse_guard
from pagellm.runfolder import write_json

ALGORITHM = "guided"
# selection.json's `unit`: what published_step counts (the report tells the guided stage's
# record from a trained stage's by it; records before the quality term said "penalty").
UNIT = "grid point"


def _paired(sft: dict[str, np.ndarray], cand: dict[str, np.ndarray], standard_errors: float) -> tuple[dict, float]:
    """One candidate's record (mean, paired change and its standard error per guarded metric)
    and its worst guarded metric's lower bound, (change - standard_errors x se) / SFT mean."""
    record, worst = {}, np.inf
    for metric, base in sft.items():
        diff = cand[metric] - base
        se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
        record |= {metric: float(cand[metric].mean()), f"{metric}_change": float(diff.mean()),
                   f"{metric}_change_se": se}
        worst = min(worst, (diff.mean() - standard_errors * se) / max(base.mean(), 1e-12))
    return record, float(worst)


def page_grid(penalties: list[float], qualities: list[float]) -> list[tuple[float, float]]:
    """Every (penalty, quality) pair the page terms are tried at, 0 meaning the term is off,
    each axis increasing, penalty-major; (0, 0), the decoding without page terms, left out."""
    return [(d, q) for d in [0.0, *sorted(penalties)] for q in [0.0, *sorted(qualities)] if d or q]


def choose_page_terms(penalties: list[float], qualities: list[float], base: dict[str, np.ndarray],
                      scored: list[dict[str, np.ndarray]], values: list[float], base_value: float, margin: float,
                      standard_errors: float = 1.0) -> tuple[tuple[float, float] | None, list[dict]]:
    """The (penalty, quality) pair to publish (None: neither term) and one record per pair of
    `page_grid(penalties, qualities)`. `base[m]` and `scored[j][m]` are per-user values of
    guarded metric m (same users, same order) under the decoding without page terms
    (`page_terms_base`) and under pair j; `values[j]` is the page prior's mean value of pair j's
    pages, `base_value` that of the decoding without page terms.

    A pair passes when its mean paired change less `standard_errors` standard errors stays
    within `margin` x the base mean on every guarded metric (a non-inferiority test: the terms
    buy page value the guard cannot see). It is eligible when it passes and so are the pairs one
    step smaller on each axis: going up either grid, a pass after a miss is noise. Of the
    eligible pairs the one the prior values most is published, if it is above `base_value` (on a
    tie, the first in grid order: the smaller terms)."""
    grid = page_grid(penalties, qualities)
    if len(scored) != len(grid) or len(values) != len(grid):
        raise ValueError(f"{len(grid)} (penalty, quality) pairs but {len(scored)} scored and {len(values)} values")
    deltas, quals = [0.0, *sorted(penalties)], [0.0, *sorted(qualities)]
    eligible = {(0.0, 0.0): True}
    chosen, best, records = None, base_value, []
    for (d, q), found, value in zip(grid, scored, values):
        record, bound = _paired(base, found, standard_errors)
        ok = bound >= -margin
        i, j = deltas.index(d), quals.index(q)
        below = [(deltas[i - 1], q)] * (i > 0) + [(d, quals[j - 1])] * (j > 0)
        eligible[(d, q)] = ok and all(eligible[pair] for pair in below)
        records.append({"penalty": d, "quality": q, **record, "prior_value": float(value), "passes": ok,
                        "eligible": eligible[(d, q)]})
        if eligible[(d, q)] and value > best:
            chosen, best = (d, q), value
    return chosen, records


def page_terms_base(sft: dict[str, np.ndarray], weights: list[dict[str, np.ndarray]],
                    chosen: int) -> dict[str, np.ndarray]:
    """Per-user guarded metrics of the decoding the page terms are added to and judged against:
    the chosen evaluator weight's (index `chosen` into `weights`), the SFT decoding's when none
    is kept (-1). The page terms' margin is a cost on what would be published without them, so
    they cannot spend the evaluator's gain."""
    return sft if chosen < 0 else weights[chosen]


def choose_weight(weights: list[float], sft: dict[str, np.ndarray], scored: list[dict[str, np.ndarray]],
                  standard_errors: float = 1.0) -> tuple[int, list[dict]]:
    """Index into `weights` of the evaluator weight to publish (-1: none) and one record per
    candidate: the candidate whose worst guarded lower bound (paired change less
    `standard_errors` standard errors, relative to the SFT mean) is largest, if it is above
    0. The penalty may cost accuracy within a margin because it buys page value the guard
    cannot see; the evaluator term buys nothing but accuracy, so it must show a gain."""
    chosen, best, records = -1, 0.0, []
    for j, w in enumerate(weights):
        record, bound = _paired(sft, scored[j], standard_errors)
        records.append({"weight": float(w), **record, "bound": bound, "passes": bound > 0})
        if bound > best:
            chosen, best = j, bound
    return chosen, records


def _write_lists(model, layout, prompts, exclude, width: int, batch: int, scores=None) -> list[list[int]]:
    from pagellm.models.decoding import generate_pages

    lists: list[list[int]] = []
    for a in range(0, len(prompts), batch):
        lists += generate_pages(model, layout, prompts[a : a + batch], k=width, exclude=exclude[a : a + batch],
                                evaluator_scores=None if scores is None else scores[a : a + batch]).items
    return lists


def _score(lists, targets, guard: list[str]) -> dict[str, np.ndarray]:
    from pagellm.eval.metrics import hr_at_k, ndcg_at_k

    fns = {"ndcg": ndcg_at_k, "hr": hr_at_k}
    out = {}
    for name in guard:
        metric, k = parse_guard(name)
        out[name] = np.array([fns[metric](lst, t, k) for lst, t in zip(lists, targets)], dtype=np.float64)
    return out


def judged_rows(n: int, sft_users: int, users: int) -> np.ndarray:
    """Up to `users` validation rows, evenly spread, none from the half the SFT stage chose its
    checkpoint on (probe part "sft" of `sft_users`): there the SFT policy is flattered by its
    own selection, and every candidate here is paired against it. With one validation user
    only, that user."""
    from pagellm.eval.probe import evenly_spread, probe_rows

    rest = np.setdiff1d(np.arange(n), probe_rows(n, sft_users, "sft")) if n > 1 else np.arange(n)
    return rest[evenly_spread(len(rest), users)]


def validate(run_dir: Path, cfg_json: dict, categories: np.ndarray, penalties: list[float],
             qualities: list[float]) -> dict:
    """In a worker (harness.in_worker): fit the evaluator models (if any), score the SFT
    decoding, each (evaluator mix, weight) of `evaluator_mixes` x `guided.evaluator_weights`,
    then every (penalty, quality) pair of `page_grid` on top of the chosen one on the
    validation sample; the prior's mean value of every candidate's pages."""
    import copy

    import torch

    from pagellm.config import Config
    from pagellm.eval.output_cache import CACHE_DIR
    from pagellm.eval.runner import load_eval_set
    from pagellm.models.evaluator import evaluator_mixes, fit_evaluator
    from pagellm.models.page_prior import PagePrior, first_item_preferences
    from pagellm.models.policy import load_policy
    from pagellm.vocab import PromptEncoder

    cfg = Config.model_validate(cfg_json)
    gcfg = cfg.guided
    model, tokenizer, layout = load_policy(run_dir / "sft", trainable=False)
    model.eval()
    es = load_eval_set(run_dir / "data", "val", None)
    keep = judged_rows(len(es.prompts), cfg.sft.val_users, gcfg.val_users)
    encoder = PromptEncoder(tokenizer, layout)
    prompts = [encoder.encode_prompt(int(es.user_index[i]), es.prompts[i]) for i in keep]
    exclude = [es.exclude[i] for i in keep]
    targets = [es.targets[i] for i in keep]
    width = max(cfg.data.page_len, *(parse_guard(g)[1] for g in gcfg.guard))
    prior = PagePrior.load(run_dir / "reward")
    mixes = []
    if gcfg.evaluator:
        mixes = evaluator_mixes(fit_evaluator(run_dir / "data", {k: cfg.eval.baseline_params(k) for k in gcfg.evaluator},
                                              cfg.seed, run_dir / CACHE_DIR))
    candidates = [(m, w) for m in range(len(mixes)) for w in gcfg.evaluator_weights]
    with torch.inference_mode():
        step = cfg.eval.batch_size  # batches bound the [users, n_items] forward's memory on a large catalogue
        pref = np.concatenate([first_item_preferences(model, layout, prompts[a : a + step])
                               for a in range(0, len(prompts), step)])
        mix_scores = [mix.scores([es.prompts[i] for i in keep]) for mix in mixes]

        def written(candidate_layout, scores=None):
            lists = _write_lists(model, candidate_layout, prompts, exclude, width, step, scores)
            value = float(prior.score(pref, [lst[: cfg.data.page_len] for lst in lists], categories).mean())
            return _score(lists, targets, gcfg.guard), value

        sft, prior_sft = written(layout)
        out = {"users": len(prompts), "sft": sft, "prior_sft": prior_sft, "evaluator": None, "candidate": 0,
               "candidates": [{"evaluator": mixes[m].kinds, "weight": float(w)} for m, w in candidates],
               "weights": [], "weight_prior": [], "weight": None, "base": sft, "base_prior": prior_sft,
               "pages": [], "page_prior": []}
        for m, w in candidates:
            found, value = written(with_guidance(copy.deepcopy(layout), weight=w), mix_scores[m])
            out["weights"].append(found)
            out["weight_prior"].append(value)
        scores = None
        if candidates:
            chosen, out["weight_records"] = choose_weight([w for _, w in candidates], sft, out["weights"],
                                                          gcfg.standard_errors)
            for record, candidate in zip(out["weight_records"], out["candidates"]):
                record["evaluator"] = candidate["evaluator"]
            if chosen >= 0:
                m, w = candidates[chosen]
                out["weight"], out["base_prior"], out["candidate"] = float(w), out["weight_prior"][chosen], chosen + 1
                out["evaluator"], scores = mixes[m], mix_scores[m]
            out["base"] = page_terms_base(sft, out["weights"], chosen)
        for delta, quality in page_grid(penalties, qualities):
            candidate = with_guidance(copy.deepcopy(layout), weight=out["weight"], delta=delta, quality=quality,
                                      positions=cfg.data.page_len, categories=categories, item_quality=prior.quality)
            found, value = written(candidate, scores)
            out["pages"].append(found)
            out["page_prior"].append(value)
    return out


def with_guidance(layout, weight: float | None = None, delta: float | None = None, quality: float | None = None,
                  positions: int = 0, categories: np.ndarray | None = None, item_quality: list[float] | None = None):
    """The layout with the evaluator weight, the repeat penalty and/or the quality weight
    (None or 0: left off)."""
    if weight:
        layout.evaluator_weight = float(weight)
    if delta or quality:
        layout.page_positions = int(positions)
    if delta:
        layout.repeat_penalty = float(delta)
        layout.item_category = [int(c) for c in categories]  # the layout is saved as JSON
    if quality:
        layout.quality_weight = float(quality)
        layout.item_quality = [float(v) for v in item_quality]
    return layout


def publish(run_dir: Path, layout_terms: dict, evaluator=None) -> Path:
    """<run>/guided/: the SFT policy's files, its layout carrying the chosen terms (none: as it
    is), and the evaluator beside it when its weight was kept."""
    from pagellm.models.evaluator import EVALUATOR_DIR
    from pagellm.train.stage3_publish import copy_policy
    from pagellm.vocab import TokenLayout

    out = run_dir / ALGORITHM
    copy_policy(run_dir / "sft", out)
    if (out / EVALUATOR_DIR).exists():  # an earlier publish's evaluator, not this one's
        import shutil

        shutil.rmtree(out / EVALUATOR_DIR)
    if any(layout_terms.get(term) for term in ("weight", "delta", "quality")):
        with_guidance(TokenLayout.load(out), **layout_terms).save(out)
    if layout_terms.get("weight"):
        evaluator.save(out)
    return out


def published_terms(weight: float | None, delta: float | None, quality: float | None = None,
                    evaluator: list[str] | None = None) -> str:
    """'evaluator (sasrec + ease) weight 2, repeat penalty 0.25 and quality weight 0.1', '' when
    none was kept."""
    named = f" ({' + '.join(evaluator)})" if evaluator else ""
    kept = ([f"evaluator{named} weight {weight:g}"] if weight else []) + ([f"repeat penalty {delta:g}"] if delta else []) \
        + ([f"quality weight {quality:g}"] if quality else [])
    return ", ".join(kept[:-1]) + " and " + kept[-1] if len(kept) > 1 else "".join(kept)


def page_terms_against(weight: float | None) -> str:
    """What the page terms' changes are paired with (selection.json, the log, the report)."""
    return f"the decoding at evaluator weight {weight:g}" if weight else "the SFT decoding"


def _changes(record: dict, guard: list[str]) -> str:
    return ", ".join(f"{m} {record[f'{m}_change']:+.4f} ± {record[f'{m}_change_se']:.4f}" for m in guard)


def _kept(weight: float | None, delta: float | None, quality: float | None) -> dict:
    """The published terms as selection.json and DONE record them (0: not kept)."""
    return {"repeat_penalty": delta or 0.0, "quality_weight": quality or 0.0, "evaluator_weight": weight or 0.0}


def _why_not(cfg: Config, prior, categories: np.ndarray) -> tuple[str | None, str | None]:
    """Why the repeat penalty and why the quality term are not tried (None: they are; "": the
    term is off by configuration and needs no reason)."""
    gcfg = cfg.guided
    penalty = quality = None
    if not gcfg.penalties:
        penalty = "guided.penalties is empty"
    elif not (categories >= 0).any():
        penalty = "the data has no item categories"
    elif prior.satiation <= 0:
        penalty = "the page prior sees no cost in a repeated category (c = 0)"
    if not gcfg.qualities:
        quality = ""  # off by configuration (the default): nothing to say
    elif prior.quality_weight <= 0:
        quality = f"the page prior gives item quality no weight (b = {prior.quality_weight:.2f})"
    elif np.ptp(prior.quality) == 0:
        quality = "every item has the same quality"
    return penalty, quality


def run_guided_stage(cfg: Config, run_dir: Path, log=print) -> dict:
    """Choose the evaluator weight, then the repeat penalty and quality weight, on validation
    and publish <run>/guided; returns the selection record."""
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
    no_penalty, no_quality = _why_not(cfg, prior, categories)
    why = "; ".join(f"no {term}: {reason}" for term, reason in (("repeat penalty", no_penalty),
                                                                  ("quality term", no_quality)) if reason)
    if no_penalty is not None and no_quality is not None and not gcfg.evaluator:
        out = publish(run_dir, {})
        none = _kept(None, None, None)
        selection = {"published_step": 0, "unit": UNIT, **none, "reason": why, "history": []}
        write_json(out / "selection.json", selection)
        write_json(out / "DONE", {"seconds": round(time.perf_counter() - t0, 1), "published_step": 0, **none,
                                  "pages_generated": 0})
        log(f"[guided] done: published the SFT policy as it is ({why}) -> {out}")
        return selection
    penalties = [] if no_penalty is not None else list(gcfg.penalties)
    qualities = [] if no_quality is not None else list(gcfg.qualities)
    rule = (f"on up to {gcfg.val_users:,} validation users, guarding {', '.join(gcfg.guard)} (mean paired change "
            f"less {gcfg.standard_errors:g} standard error(s))")
    if gcfg.evaluator:
        each = " each alone and averaged," if len(gcfg.evaluator) > 1 else ""
        log(f"[guided] fitting {' and '.join(gcfg.evaluator)} (as the evaluation fits its baselines), then trying "
            f"them,{each} at weights {', '.join(f'{w:g}' for w in gcfg.evaluator_weights)} {rule}: the best kept "
            f"only above the SFT decoding")
    if why:
        log(f"[guided] {why}")
    if penalties or qualities:
        terms = ([f"repeat penalties {', '.join(f'{d:g}' for d in penalties)} (the prior: a repeated category "
                  f"is worth x{1 - prior.satiation:.2f})"] if penalties else []) + \
                ([f"quality weights {', '.join(f'{q:g}' for q in qualities)} (the prior's b = "
                  f"{prior.quality_weight:.2f})"] if qualities else [])
        log(f"[guided] trying {' x '.join(terms)} {rule}: of the pairs within {gcfg.margin:.1%} of the decoding "
            f"without page terms, the one the page prior values most")
    found = in_worker(validate, run_dir, cfg.model_dump(mode="json"), categories, penalties, qualities)
    weight_records = found.get("weight_records", [])
    for record, value in zip(weight_records, found["weight_prior"]):
        record["prior_value"] = value
        log(f"[guided] evaluator {' + '.join(record['evaluator'])} weight {record['weight']:g}: "
            f"{_changes(record, gcfg.guard)} vs SFT"
            f"{'' if record['passes'] else ' -- no gain validation can tell'}")
    weight = found["weight"]
    chosen, records = choose_page_terms(penalties, qualities, found["base"], found["pages"], found["page_prior"],
                                        found["base_prior"], gcfg.margin, gcfg.standard_errors)
    for record in records:
        pair = f"penalty {record['penalty']:g}" + (f", quality {record['quality']:g}" if qualities else "")
        log(f"[guided] {pair}"
            f"{f' (evaluator weight {weight:g})' if weight else ''}: {_changes(record, gcfg.guard)} vs "
            f"{page_terms_against(weight)}; prior "
            f"value {record['prior_value']:.3f} (without page terms {found['base_prior']:.3f})"
            f"{'' if record['passes'] else ' -- outside the margin'}"
            f"{' -- after a miss' if record['passes'] and not record['eligible'] else ''}")
    delta, quality = (chosen[0] or None, chosen[1] or None) if chosen else (None, None)
    out = publish(run_dir, {"weight": weight, "delta": delta, "quality": quality, "positions": positions,
                            "categories": categories, "item_quality": prior.quality}, found["evaluator"])
    grid = page_grid(penalties, qualities)
    # The grid point published: 1 + its index in page_grid (0: no page term) + (grid + 1) x the
    # weight's rank; 0 = the SFT decoding.
    step = (grid.index(chosen) + 1 if chosen else 0) + (len(grid) + 1) * found["candidate"]
    terms = _kept(weight, delta, quality)
    kinds = found["evaluator"].kinds if found["evaluator"] is not None else []
    selection = {"published_step": step, "unit": UNIT, **terms, "evaluator": kinds, "evaluators_tried": gcfg.evaluator,
                 "guard": list(gcfg.guard), "margin": gcfg.margin, "standard_errors": gcfg.standard_errors,
                 "users": found["users"], "sft": {m: float(v.mean()) for m, v in found["sft"].items()},
                 "prior_sft": found["prior_sft"], "prior_base": found["base_prior"],
                 "page_terms_against": page_terms_against(weight),
                 "evaluator_history": weight_records, "history": records}
    if why:
        selection["reason"] = why
    write_json(out / "selection.json", selection)
    pages = found["users"] * (1 + len(found["weights"]) + len(found["pages"]))
    write_json(out / "DONE", {"seconds": round(time.perf_counter() - t0, 1), "published_step": step, **terms,
                              "pages_generated": pages})
    what = published_terms(weight, delta, quality, kinds) or "the SFT decoding: no term passed validation"
    log(f"[guided] done: published {what} -> {out}")
    return selection
