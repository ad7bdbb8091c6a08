"""Evaluate every page-writer of a run on the same users and split (docs/ARCHITECTURE.md §7).

Each model produces, per user, a 100-item ranked list (its first page_len items are the
served page) and a full score vector over items. Baselines rank items by their scores;
policies write the list by greedy constrained decoding and score items from the
item-token distribution at the page's first position.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from pagellm.config import Config
from pagellm.eval.baselines import make_baseline, rank, scores_of
from pagellm.eval.baselines.params import BASELINE_PARAMS
from pagellm.eval.metrics import (evaluate_full_ranking, evaluate_lists, expected_relevance, history_mask, hr_at_pct,
                                  random_pages, tail_items_from_counts)
from pagellm.eval.output_cache import CACHE_DIR, OutputCache, files_key, input_key
from pagellm.names import STAGE3_ALGORITHMS


@dataclass
class EvalSet:
    """The users evaluated and what each model sees of them."""

    user_index: np.ndarray
    prompts: list[list[int]]  # recent positives before the evaluated split (policy prompt)
    histories: list[list[int]]  # all positives before the split (baseline input)
    train_sequences: list[list[int]]  # training positives of every user (baseline fit)
    exclude: list[set[int]]  # everything seen before the split
    targets: list[list[int]]  # held-out positives of the split, in time order
    n_items: int
    cats_of: dict[int, set[str]]
    popularity: np.ndarray
    # The validation step (training positives -> validation items) a trained baseline may
    # select its epoch on, as the policy does: only when the evaluated split is test (an
    # evaluation of the validation split has nothing held out to select on).
    val_histories: list[list[int]] | None = None
    val_targets: list[list[int]] | None = None
    # The user index of each train_sequences / val_histories row, for a baseline that scores
    # users rather than histories (LightGCN's graph nodes).
    train_users: list[int] | None = None
    val_users: list[int] | None = None


def fit_sequences(evals: pd.DataFrame) -> tuple[list[list[int]], list[list[int]], list[list[int]], list[int], list[int]]:
    """What a trained baseline fits on (from eval.parquet): every user's training positives,
    and the validation step it selects its epoch on — the training positives and validation
    items of every user with one — with the user index of each row. Nothing from test."""
    has_train = np.flatnonzero(evals["train_positives"].map(len).to_numpy() > 0)
    has_val = np.flatnonzero(evals["val_items"].map(len).to_numpy() > 0)
    user_index = evals["user_index"].to_numpy()
    return ([list(evals["train_positives"].iloc[i]) for i in has_train],
            [list(evals["train_positives"].iloc[i]) for i in has_val],
            [list(evals["val_items"].iloc[i]) for i in has_val],
            user_index[has_train].tolist(), user_index[has_val].tolist())


def load_eval_set(data_dir: Path, split: str, max_users: int | None) -> EvalSet:
    evals = pd.read_parquet(data_dir / "eval.parquet")
    items = pd.read_parquet(data_dir / "items.parquet")
    if split == "test":
        prompts, seen, targets = evals["prompt_test"], evals["seen_before_test"], evals["test_items"]
        histories = [list(a) + list(b) for a, b in zip(evals["train_positives"], evals["val_items"])]
    elif split == "val":
        prompts, seen, targets = evals["prompt_val"], evals["train_items"], evals["val_items"]
        histories = [list(a) for a in evals["train_positives"]]
    else:
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    keep = np.flatnonzero(targets.map(len).to_numpy() > 0)
    if max_users:
        keep = keep[:max_users]
    train_sequences, val_histories, val_targets, train_users, val_users = fit_sequences(evals)
    if split != "test":
        val_histories = val_targets = val_users = None
    return EvalSet(
        user_index=evals["user_index"].to_numpy()[keep],
        prompts=[list(prompts.iloc[i]) for i in keep],
        histories=[histories[i] for i in keep],
        train_sequences=train_sequences,
        exclude=[set(seen.iloc[i]) for i in keep],
        targets=[list(targets.iloc[i]) for i in keep],
        n_items=len(items),
        cats_of={int(i): set(c) for i, c in zip(items["index"], items["categories"])},
        popularity=items["popularity"].to_numpy(),
        val_histories=val_histories,
        val_targets=val_targets,
        train_users=train_users,
        val_users=val_users,
    )


@dataclass
class ModelOutput:
    lists: list[list[int]]
    scores: Callable[[int, int], np.ndarray]  # (start, stop) -> [stop-start, n_items]
    seconds: float


def fitted_baseline(name: str, params: dict, es: EvalSet, seed: int, cache: OutputCache | None = None,
                    log=print):
    """A baseline fitted on the eval set's training sequences. A trained baseline's fit (SASRec,
    EASE) is taken from `cache` when one with the same parameters, seed, sequences and
    validation step is there.

    A trained baseline selects on the validation step when the evaluation has one (a test
    evaluation), as the policy selects its checkpoint: SASRec its epoch, up to
    `eval.sasrec.epochs` (a fixed short schedule leaves it undertrained on small data:
    MovieLens's loss still falls steeply at epoch 20), EASE its lambda. Without one they use
    their fixed settings (`fixed_epochs`, `fixed_lambda`)."""
    torch.manual_seed(seed)
    if "seed" in BASELINE_PARAMS[name]:  # it seeds its own init and order: one run's seed for every model
        params = {"seed": seed, **params}
    model = make_baseline(name, params if name != "popularity" else None)
    trained = hasattr(model, "restore")
    by_user = getattr(model, "by_user", False)
    key = (input_key(name, model.params, es.train_sequences, es.n_items, es.val_targets,
                     *((es.train_users, es.val_users) if by_user else ())) if trained else None)
    state = cache.state(name, key) if cache is not None and key else None
    if state is not None:
        model.restore(state, es.n_items)
        log(f"[eval] {name}: reusing its fit on the same sequences ({cache.directory}/{name}-{key}.safetensors)")
    else:
        users = {"users": es.train_users, "val_users": es.val_users} if by_user else {}
        model.fit(es.train_sequences, es.n_items, es.val_histories, es.val_targets, **users)
        if cache is not None and key:
            cache.put_state(name, key, model.state())
    return model


def baseline_output(name: str, params: dict, es: EvalSet, list_len: int, seed: int,
                    cache: OutputCache | None = None, log=print) -> ModelOutput:
    """A fitted baseline's ranked lists and item scores for the eval set's users."""
    t0 = time.perf_counter()
    model = fitted_baseline(name, params, es, seed, cache, log)
    users = es.user_index.tolist()
    lists = rank(model, es.histories, list_len, exclude=es.exclude, users=users)
    return ModelOutput(lists, lambda a, b: scores_of(model, es.histories[a:b], users[a:b]), time.perf_counter() - t0)


def policy_output(policy_dir: Path, es: EvalSet, list_len: int, batch_size: int, exclude: bool,
                  cache: OutputCache | None = None, log=print) -> ModelOutput:
    """A policy's greedy constrained lists and its first-position item scores. The lists are
    taken from `cache` when the same policy files wrote them for the same prompts."""
    from pagellm.models.decoding import first_item_scores, first_position_terms, generate_pages
    from pagellm.models.evaluator import Guidance
    from pagellm.models.policy import load_policy
    from pagellm.vocab import PromptEncoder

    t0 = time.perf_counter()
    model, tokenizer, layout = load_policy(policy_dir, trainable=False)
    model.eval()
    guidance = Guidance.load(policy_dir, layout)
    encoder = PromptEncoder(tokenizer, layout)
    prompts = [encoder.encode_prompt(int(u), p) for u, p in zip(es.user_index, es.prompts)]
    banned = es.exclude if exclude else None
    key = input_key(files_key(policy_dir), prompts, banned, list_len, batch_size)
    lists = cache.lists("policy", key) if cache is not None else None
    if lists is not None:
        log(f"[eval] {policy_dir.name}: reusing the lists these policy files wrote ({cache.directory}/policy-{key}.parquet)")
    else:
        lists = []
        with torch.inference_mode():
            for a in range(0, len(prompts), batch_size):
                batch = generate_pages(model, layout, prompts[a : a + batch_size], k=list_len, mode="greedy",
                                       exclude=banned[a : a + batch_size] if banned is not None else None,
                                       evaluator_scores=guidance.scores(es.prompts[a : a + batch_size]))
                lists.extend(batch.items)
        if cache is not None:
            cache.put_lists("policy", key, lists)

    def scores(a: int, b: int) -> np.ndarray:
        # The published policy's first-position ranking, guided terms included (a guided
        # policy's evaluator and quality term), as its pages are written.
        with torch.inference_mode():
            first = first_item_scores(model, layout, prompts[a:b])
            return first_position_terms(layout, first, guidance.scores(es.prompts[a:b])).float().numpy()

    return ModelOutput(lists, scores, time.perf_counter() - t0)


def sim_utilities(sim, es: EvalSet, item_ids: list[str], user_ids: list[str], pages: list[list[int]],
                  rows: list[int] | None = None) -> np.ndarray:
    """True utility of pages[j] for user rows[j] of the eval set (default: page j for user j)."""
    rows = range(len(es.user_index)) if rows is None else rows
    users = [user_ids[es.user_index[r]] for r in rows]
    return sim.page_utility(users, [[item_ids[i] for i in p] for p in pages])


def score_model(out: ModelOutput, es: EvalSet, cfg: Config, tail: set, sim_ctx) -> dict:
    k = cfg.data.page_len
    metrics = evaluate_lists(out.lists, es.targets, es.cats_of, es.n_items, set(range(es.n_items)),
                             page_len=k, tail_items=tail)
    mask = history_mask([sorted(s) for s in es.exclude], es.n_items)
    metrics |= evaluate_full_ranking(out.scores, mask, es.targets, n_items=es.n_items, hr_ks=(10,))
    if sim_ctx is not None:
        sim, item_ids, user_ids, oracle, _ = sim_ctx
        util = sim_utilities(sim, es, item_ids, user_ids, [lst[:k] for lst in out.lists])
        metrics["sim_utility"] = float(util.mean())
        metrics["sim_utility_ratio"] = float(util.mean() / oracle.mean()) if oracle.mean() > 0 else None
    metrics["seconds"] = round(out.seconds, 2)
    return metrics


HR_PCT_KS = (1, 10)  # the HR@k% cutoffs reported, in percent
JUDGE_PAGES = 50_000  # most pages per judge call: bounds the simulator's [pages, k, k] satiation arrays
JUDGE_USERS = 1024  # most users per judge call: bounds SASRec's [users, n_items] scores


@dataclass
class PageJudge:
    """The evaluator of HR@k%: independent of every model a stage-3 algorithm trains against."""

    name: str  # "simulator" | "sasrec"
    value: Callable[[int, int, np.ndarray], np.ndarray]  # (a, b, [b-a, M, k] pages, -1 empty) -> [b-a, M]


def simulator_judge(sim_ctx, es: EvalSet) -> PageJudge:
    """The simulator's true utility: no model sees it, so it judges every model fairly."""
    sim, item_ids, user_ids, _, _ = sim_ctx
    # Index arrays instead of per-item Python loops (millions of pages); an empty slot (-1)
    # reads the last entry, "", an id the simulator does not know: it is worth 0 and, being
    # last on the page, changes no other item's worth.
    raw_items = np.asarray([*item_ids, ""], dtype=object)
    raw_users = np.asarray(user_ids, dtype=object)[es.user_index]

    def value(a: int, b: int, pages: np.ndarray) -> np.ndarray:
        users = np.repeat(raw_users[a:b], pages.shape[1]).tolist()
        return sim.page_utility(users, raw_items[pages.reshape(-1, pages.shape[2])].tolist()).reshape(b - a, -1)

    return PageJudge("simulator", value)


def sasrec_judge(sasrec: ModelOutput) -> PageJudge:
    """Real data has no truth: SASRec, fitted by eval on the training split with its own seed,
    values pages by their expected relevance (metrics.expected_relevance)."""
    return PageJudge("sasrec", lambda a, b, pages: expected_relevance(sasrec.scores(a, b), pages))


def judge_in_chunks(judge: PageJudge, pages_of: Callable[[int, int], np.ndarray], users: int, per_user: int) -> np.ndarray:
    """judge.value over all users, a bounded block of users per call; pages_of(a, b) builds
    the pages of users a..b so only one block of pages is held at a time."""
    step = max(1, min(JUDGE_USERS, JUDGE_PAGES // per_user))
    return np.concatenate([judge.value(a, min(a + step, users), pages_of(a, min(a + step, users)))
                           for a in range(0, users, step)])


def random_page_values(judge: PageJudge, es: EvalSet, k: int, n_pages: int, seed: int) -> np.ndarray:
    """The judge's values of n_pages random pages per user, [users, n_pages]: drawn once per
    evaluation from the run's seed, so every model is ranked against the same pages."""
    rng = np.random.default_rng(seed)

    def pages_of(a: int, b: int) -> np.ndarray:
        return np.stack([random_pages(rng, es.n_items, es.exclude[u], n_pages, k) for u in range(a, b)])

    return judge_in_chunks(judge, pages_of, len(es.exclude), n_pages)


def hr_pct(judge: PageJudge, reference: np.ndarray, lists: list[list[int]], k: int) -> dict:
    """hr@1% and hr@10% of a model's pages (the first k items of its lists)."""
    pages = np.full((len(lists), 1, k), -1, dtype=np.int64)
    for u, lst in enumerate(lists):
        pages[u, 0, : min(k, len(lst))] = lst[:k]
    generated = judge_in_chunks(judge, lambda a, b: pages[a:b], len(lists), 1)[:, 0]
    return hr_at_pct(generated, reference, HR_PCT_KS)


def page_judge(cfg: Config, es: EvalSet, sim_ctx, sasrec: ModelOutput | None, log) -> PageJudge | None:
    """The simulator where there is one, else SASRec when eval fitted it; None = no HR@k%."""
    if not cfg.eval.hr_pct_pages:
        return None
    if sim_ctx is not None:
        return simulator_judge(sim_ctx, es)
    if sasrec is not None:
        return sasrec_judge(sasrec)
    log("[eval] hr@k%: skipped: on real data its judge is the SASRec baseline, and eval.baselines leaves it out")
    return None


def reward_fidelity(policy_dir: Path, reward_dir: Path, es: EvalSet, greedy_lists: list[list[int]], sim_ctx,
                    k: int, samples: int, batch_size: int, seed: int) -> dict:
    """The `reward_fidelity` block (pagellm/eval/fidelity.py) for the policy stage 3 starts
    from: `samples` sampled pages per user (constrained, temperature 1, history excluded, as
    PPO's rollouts), its greedy page and the oracle page, each scored by R_c, R_f, their sum,
    the page prior when the reward stage fitted one, the policy's own log-likelihood and
    summed item popularity, and by the truth."""
    from pagellm.eval.fidelity import fidelity_block
    from pagellm.models.decoding import constrained_logprobs, generate_pages
    from pagellm.models.page_prior import PagePrior, first_item_preferences, item_categories
    from pagellm.models.policy import load_policy
    from pagellm.models.reward import REWARD_FILE
    from pagellm.models.reward_scorer import RewardScorer
    from pagellm.vocab import PromptEncoder

    sim, item_ids, user_ids, oracle_truth, oracle_pages = sim_ctx
    model, tokenizer, layout = load_policy(policy_dir, trainable=False)
    model.eval()
    # reward.heads: none trains no reward model, only the prior: no R, R_c, R_f then.
    scorer = RewardScorer.load(reward_dir) if (reward_dir / REWARD_FILE).exists() else None
    encoder = PromptEncoder(tokenizer, layout)
    prompts = [encoder.encode_prompt(int(u), p) for u, p in zip(es.user_index, es.prompts)]
    users = len(prompts)
    generator = torch.Generator().manual_seed(seed)
    prior = PagePrior.load(reward_dir)
    if prior is not None:
        item_cat = item_categories(reward_dir.parent / "data")

    def signals(rows: list[int], pages: list[list[int]]) -> dict[str, np.ndarray]:
        """Every signal for page j of user rows[j]."""
        out: dict[str, list] = {"R": [], "R_c": [], "R_f": []} if scorer is not None else {}
        out["policy_logprob"] = []
        for a in range(0, len(rows), batch_size):
            r, pg = rows[a : a + batch_size], pages[a : a + batch_size]
            p = [prompts[i] for i in r]
            responses = [encoder.encode_page(x) for x in pg]
            if scorer is not None:
                r_c, r_f = scorer.score_tokens(p, responses)
                out["R"].append(r_c + r_f)
                out["R_c"].append(r_c)
                out["R_f"].append(r_f)  # a head the model lacks scores 0: dropped below
            with torch.inference_mode():
                logp, _, _ = constrained_logprobs(model, layout, p, responses, exclude=[es.exclude[i] for i in r], k=k)
            out["policy_logprob"].append(logp.sum(dim=1).float().numpy())
            if prior is not None:  # one forward per user: a batch of samples repeats its prompts
                out.setdefault("prior", []).append(prior.score(first_item_preferences(model, layout, p), pg, item_cat))
        result = {name: np.concatenate(parts) for name, parts in out.items()
                  if name not in ("R_c", "R_f") or {"R_c": "coarse", "R_f": "fine"}[name] in scorer.heads}
        result["popularity"] = np.array([es.popularity[x].sum() for x in pages], dtype=np.float64)
        return result

    rows = [u for u in range(users) for _ in range(samples)]
    sampled: list[list[int]] = []
    with torch.inference_mode():
        for a in range(0, len(rows), batch_size):
            r = rows[a : a + batch_size]
            batch = generate_pages(model, layout, [prompts[i] for i in r], k=k, mode="sample",
                                   exclude=[es.exclude[i] for i in r], generator=generator)
            sampled.extend(batch.items)
    sampled_signals = {n: v.reshape(users, samples) for n, v in signals(rows, sampled).items()}
    sampled_truth = sim_utilities(sim, es, item_ids, user_ids, sampled, rows)
    greedy = [lst[:k] for lst in greedy_lists]
    everyone = list(range(users))
    return fidelity_block(sampled_signals, sampled_truth.reshape(users, samples),
                          signals(everyone, greedy), signals(everyone, oracle_pages),
                          sim_utilities(sim, es, item_ids, user_ids, greedy), oracle_truth)


def fidelity_line(block: dict) -> str:
    """One console line: each signal's within-user Spearman, oracle > greedy and best of S."""
    def fmt(value) -> str:
        return "–" if value is None else f"{value:.3f}"

    signals = [k.split("/", 1)[1] for k in block if k.startswith("spearman/") and k.split("/", 1)[1] in
               ("R", "R_c", "R_f", "prior")]
    parts = [f"{name} {fmt(block[f'spearman/{name}'])}/{fmt(block.get(f'oracle_above_greedy/{name}'))}/"
             f"{fmt(block[f'best_of_S/{name}'])}" for name in signals]
    return (f"[eval] reward fidelity (spearman / oracle > greedy / best of {block['samples_per_user']}): "
            + ", ".join(parts) + f"; best of {block['samples_per_user']} by truth {block['best_of_S/truth']:.3f}")


def policy_dirs(run_dir: Path) -> dict[str, Path]:
    """The trained policies of a run, in pipeline order: SFT, then stage 3's (named by its
    algorithm, the folder it writes)."""
    found = {}
    for name in ("sft", *STAGE3_ALGORITHMS):
        d = run_dir / name
        if (d / "pagellm_policy.json").exists() or (d / "adapter_config.json").exists():
            found[name] = d
    return found


PER_USER_FILE = "per_user.parquet"


def per_user_outcomes(lists: dict[str, list[list[int]]], es: EvalSet, page_len: int, sim_ctx) -> pd.DataFrame:
    """One row per (model, user): the page, its hr/ndcg@page_len and, on the simulator, its
    true utility. The means equal metrics.json's; the rows let two models be compared on
    the same users (pagellm/eval/paired.py), which seed-level means cannot do on small sets."""
    from pagellm.eval.metrics import hr_at_k, ndcg_at_k

    frames = []
    for name, model_lists in lists.items():
        pages = [[int(i) for i in lst[:page_len]] for lst in model_lists]
        frame = pd.DataFrame({
            "model": name, "user_index": np.asarray(es.user_index, dtype=np.int64), "page": pages,
            f"hr@{page_len}": [hr_at_k(p, t, page_len) for p, t in zip(pages, es.targets)],
            f"ndcg@{page_len}": [ndcg_at_k(p, t, page_len) for p, t in zip(pages, es.targets)]})
        if sim_ctx is not None:
            sim, item_ids, user_ids = sim_ctx[:3]
            frame["sim_utility"] = sim_utilities(sim, es, item_ids, user_ids, pages)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def run_eval_stage(cfg: Config, run_dir: Path, split: str = "test", log=print) -> dict:
    """Evaluate baselines and the run's policies; writes eval/metrics.json, per_user.parquet,
    report.md, plots."""
    from pagellm.eval.report import write_report
    from pagellm.runfolder import write_json

    data_dir, out_dir = run_dir / "data", run_dir / "eval"
    if not (data_dir / "eval.parquet").exists():
        raise FileNotFoundError(f"{data_dir}/eval.parquet not found: run `pagellm data --run {run_dir}` first")
    es = load_eval_set(data_dir, split, cfg.eval.max_users)
    vocab = pd.read_parquet(data_dir / "vocab.parquet")
    user_ids = vocab.loc[vocab["kind"] == "user", "raw_id"].tolist()
    item_ids = vocab.loc[vocab["kind"] == "item", "raw_id"].tolist()
    tail = tail_items_from_counts(es.popularity)
    log(f"[eval] {len(es.prompts):,} users with {split} positives, {es.n_items:,} items")

    sim_ctx = None
    if (data_dir / "simulator").exists():
        from pagellm.data.simulator import Simulator

        sim = Simulator.load(data_dir / "simulator")
        oracle_pages = sim.oracle_page([user_ids[u] for u in es.user_index], cfg.data.page_len,
                                       [{item_ids[i] for i in s} for s in es.exclude])
        oracle = sim.page_utility([user_ids[u] for u in es.user_index], oracle_pages)
        position = {raw: n for n, raw in enumerate(item_ids)}
        sim_ctx = (sim, item_ids, user_ids, oracle, [[position[i] for i in page] for page in oracle_pages])

    models: dict[str, dict] = {}
    lists: dict[str, list[list[int]]] = {}  # every model's lists, for HR@k% and reward fidelity
    sasrec = None  # its fitted scores are the HR@k% judge on real data
    cache = OutputCache(run_dir / CACHE_DIR)
    for name in cfg.eval.baselines:
        log(f"[eval] baseline {name}")
        out = baseline_output(name, cfg.eval.baseline_params(name), es, cfg.eval.list_len, cfg.seed,
                              cache, log)
        models[name], lists[name] = score_model(out, es, cfg, tail, sim_ctx), out.lists
        sasrec = out if name == "sasrec" else sasrec
    for name, path in policy_dirs(run_dir).items():
        log(f"[eval] policy {name} ({path})")
        out = policy_output(path, es, cfg.eval.list_len, cfg.eval.batch_size, cfg.eval.exclude_history, cache, log)
        models[name], lists[name] = score_model(out, es, cfg, tail, sim_ctx), out.lists
    stage3 = [name for name in lists if name in STAGE3_ALGORITHMS]
    if cfg.eval.kl_samples and stage3 and "sft" in lists:
        from pagellm.eval.divergence import kl_to_reference
        from pagellm.vocab import PromptEncoder, load_tokenizer

        tokenizer, layout = load_tokenizer(run_dir / "sft")  # prompts only: no model needed here
        encoder, n = PromptEncoder(tokenizer, layout), min(cfg.eval.kl_users, len(es.prompts))
        prompts = [encoder.encode_prompt(int(u), p) for u, p in zip(es.user_index[:n], es.prompts[:n])]
        for name in stage3:
            models[name] |= kl_to_reference(run_dir / name, run_dir / "sft", prompts, es.exclude[:n],
                                            cfg.data.page_len, cfg.eval.kl_samples, cfg.eval.batch_size, cfg.seed)
            log(f"[eval] {name}: KL to the SFT policy {models[name]['kl_to_sft']:.3f} ± "
                f"{models[name]['kl_to_sft_se']:.3f} nats per page ({cfg.eval.kl_samples} pages x {n} users)")
    judge = page_judge(cfg, es, sim_ctx, sasrec, log)
    if judge is not None:
        t0 = time.perf_counter()
        reference = random_page_values(judge, es, cfg.data.page_len, cfg.eval.hr_pct_pages, cfg.seed)
        for name, model_lists in lists.items():
            if name != judge.name:  # SASRec as the judge would rank its own pages: not scored
                models[name] |= hr_pct(judge, reference, model_lists, cfg.data.page_len)
        log(f"[eval] hr@k%: judge {judge.name}, {cfg.eval.hr_pct_pages:,} random pages per user "
            f"({time.perf_counter() - t0:.1f}s)")
    for name, m in models.items():
        util = f" sim_utility {m['sim_utility']:.4f}" if "sim_utility" in m else ""
        util += f" hr@10% {m['hr@10%']:.3f}" if "hr@10%" in m else ""
        log(f"[eval] {name:<10} ndcg@100 {m['ndcg@100']:.4f} ndcg@10 {m['ndcg@10']:.4f} hr@10 {m['hr@10']:.4f} "
            f"full/ndcg@100 {m['full/ndcg@100']:.4f}{util} invalid {m['invalid_rate']:.3f}")

    result = {
        "dataset": cfg.data.source if cfg.data.source == "simulator" else f"{cfg.data.source}:{cfg.data.path}",
        "split": split,
        "split_method": cfg.data.split,
        "users": len(es.prompts),
        "items": es.n_items,
        "page_len": cfg.data.page_len,
        "list_len": cfg.eval.list_len,
        "models": models,
    }
    if judge is not None:
        result |= {"hr_pct_judge": judge.name, "hr_pct_pages": cfg.eval.hr_pct_pages}
    if sim_ctx is not None:
        result["sim_oracle_utility"] = float(sim_ctx[3].mean())
        if cfg.eval.fidelity_samples and "sft" in lists and (run_dir / "reward" / "metrics.json").exists():
            log(f"[eval] reward fidelity: {cfg.eval.fidelity_samples} sampled pages per user")
            result["reward_fidelity"] = reward_fidelity(
                run_dir / "sft", run_dir / "reward", es, lists["sft"], sim_ctx, cfg.data.page_len,
                cfg.eval.fidelity_samples, cfg.eval.batch_size, cfg.seed)
            log(fidelity_line(result["reward_fidelity"]))
    write_json(out_dir / "metrics.json", result)
    per_user_outcomes(lists, es, cfg.data.page_len, sim_ctx).to_parquet(out_dir / PER_USER_FILE)
    write_report(result, run_dir, out_dir)
    log(f"[eval] wrote {out_dir}/metrics.json, {PER_USER_FILE}, report.md and plots")
    return result
