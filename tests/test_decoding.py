"""Constrained page decoding: valid pages whatever the model prefers, batching/KV-cache
correctness, and teacher-forced logprobs that match the rollout's."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pagellm.config import ModelConfig
from pagellm.models.decoding import constrained_logprobs, first_item_scores, generate_pages
from pagellm.models.policy import build_policy
from pagellm.vocab import PromptEncoder, Vocab

TINY = {
    "gpt2": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 128},
    "llama": {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
              "num_key_value_heads": 1, "max_position_embeddings": 128},
}
N_ITEMS, K = 30, 5



def policy(arch="gpt2", n_items=N_ITEMS, lora=False):
    vocab = Vocab.build([f"u{n}" for n in range(6)], [f"i{n:03d}" for n in range(n_items)])
    cfg = ModelConfig(name="config", arch=arch, init=TINY[arch], lora={"enabled": lora, "r": 4, "alpha": 8})
    model, tok, layout = build_policy(cfg, vocab, seed=0)
    return model.eval(), layout, PromptEncoder(tok, layout)


@pytest.fixture(scope="module")
def gpt2():
    return policy("gpt2")


class Rigged(torch.nn.Module):
    """A policy whose logits scream for a template word, a user token, eos, and one item."""

    def __init__(self, inner, bias):
        super().__init__()
        self.inner, self.bias = inner, bias

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        out.logits = out.logits + self.bias
        return out


def rigged(model, layout, favourite=3):
    bias = torch.zeros(layout.vocab_size)
    bias[layout.tail_ids[0]] = 80.0
    bias[layout.user_offset + 2] = 70.0
    bias[layout.eos_id] = 60.0
    bias[layout.item_token(favourite)] = 50.0
    return Rigged(model, bias)


def prompts_of(enc, histories):
    return [enc.encode_prompt(n % 6, h) for n, h in enumerate(histories)]


HISTORIES = [[1, 2, 3], [], list(range(12)), [29, 0]]


def assert_valid(batch, layout, k, exclude):
    for row, items in enumerate(batch.items):
        assert len(items) == k and len(set(items)) == k
        assert all(0 <= i < layout.n_items for i in items)
        assert not set(items) & set(exclude[row])
        assert batch.response_ids[row].tolist() == [layout.item_token(i) for i in items] + [layout.eos_id]
    assert batch.response_mask.all() and torch.isfinite(batch.logprobs).all()
    assert (batch.logprobs[:, :k] <= 0).all() and (batch.logprobs[:, k] == 0).all()  # eos is forced


@pytest.mark.parametrize("mode", ["greedy", "sample"])
def test_pages_are_valid_even_when_the_model_prefers_invalid_tokens(gpt2, mode):
    model, layout, enc = gpt2
    bad = rigged(model, layout)
    plain = generate_pages(model, layout, prompts_of(enc, [[]]), K, mode="greedy")
    assert plain.items[0].count(3) <= 1
    exclude = [set(h) for h in HISTORIES]  # exclude history; row 0 excludes the favourite
    gen = torch.Generator().manual_seed(0)
    batch = generate_pages(bad, layout, prompts_of(enc, HISTORIES), K, mode=mode, exclude=exclude, generator=gen)
    assert_valid(batch, layout, K, exclude)
    for row, items in enumerate(batch.items):
        assert (3 in items) == (3 not in exclude[row])  # the favourite once, where it is allowed
        if mode == "greedy":
            assert (items[0] == 3) == (3 not in exclude[row])
    # Without exclusion too, in a batch, with the longest pages the catalogue allows.
    batch = generate_pages(bad, layout, prompts_of(enc, HISTORIES), N_ITEMS, mode=mode, generator=gen)
    assert_valid(batch, layout, N_ITEMS, [()] * len(HISTORIES))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_left_padded_decoding_equals_one_by_one(arch, gpt2):
    model, layout, enc = gpt2 if arch == "gpt2" else policy("llama")
    prompts = prompts_of(enc, HISTORIES)
    assert len({len(p) for p in prompts}) == len(prompts)
    exclude = [set(h) for h in HISTORIES]
    batch = generate_pages(model, layout, prompts, K, exclude=exclude)
    for row, prompt in enumerate(prompts):
        one = generate_pages(model, layout, [prompt], K, exclude=[exclude[row]])
        assert one.items[0] == batch.items[row]
        torch.testing.assert_close(one.logprobs[0], batch.logprobs[row], atol=1e-5, rtol=0)
        width = batch.prompt_width
        assert batch.sequences[row, width - len(prompt) : width].tolist() == prompt
        assert batch.attention_mask[row].sum() == len(prompt) + K + 1


def reference_greedy(model, layout, prompt, k, exclude, prior: float = 0.0, penalty: float = 0.0,
                     cats: list[int] | None = None, positions: int = 0, weight: float = 0.0, scores=None,
                     quality_weight: float = 0.0, quality=None):
    """No cache, no padding, constraints in plain Python: an independent reading of the rule.
    `prior`: model.ranking_prior, the first step's item logits added at every later step;
    `penalty`: at steps < `positions`, minus penalty x earlier items of the item's category;
    `weight`: plus weight x (spread of the first step's item logits) x the standardised
    `scores` at every step, times (1 + prior) after the first; `quality_weight`: the same with
    `quality` (as given), at steps < `positions` only."""
    seq, used, items, logps = list(prompt), set(), [], []
    item_ids = slice(layout.item_offset, layout.item_offset + layout.n_items)
    for t in range(k + 1):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1].clone()
        if t == 0:
            first = logits[item_ids].clone()
        else:
            logits[item_ids] += prior * first
        if weight:
            z = (scores - scores.mean()) / scores.std()
            logits[item_ids] += weight * float(first.std()) * z * (1.0 if t == 0 else 1.0 + prior)
        if quality_weight and t < positions:
            logits[item_ids] += quality_weight * float(first.std()) * torch.as_tensor(quality) * (1.0 if t == 0 else 1.0 + prior)
        if penalty and t < positions:
            for i in range(layout.n_items):
                if cats[i] >= 0:
                    logits[layout.item_token(i)] -= penalty * sum(cats[j] == cats[i] for j in items)
        allowed = [i for i in range(layout.n_items) if i not in used and i not in exclude] if t < k else []
        ids = [layout.item_token(i) for i in allowed] or [layout.eos_id]
        logp = torch.log_softmax(logits[ids], dim=-1)
        best = int(logp.argmax())
        logps.append(float(logp[best]))
        seq.append(ids[best])
        if ids[best] == layout.eos_id:
            break
        used.add(allowed[best])
        items.append(allowed[best])
    return items, logps


def test_kv_cache_decoding_equals_a_no_cache_reference(gpt2):
    model, layout, enc = gpt2
    exclude = [set(h) for h in HISTORIES]
    batch = generate_pages(model, layout, prompts_of(enc, HISTORIES), K, exclude=exclude)
    for row, prompt in enumerate(prompts_of(enc, HISTORIES)):
        items, logps = reference_greedy(model, layout, prompt, K, exclude[row])
        assert batch.items[row] == items
        torch.testing.assert_close(batch.logprobs[row], torch.tensor(logps), atol=1e-5, rtol=0)


def test_the_ranking_prior_adds_the_first_steps_item_logits_to_every_later_step(gpt2):
    """model.ranking_prior: greedy pages follow the rule above, the learner's teacher-forced
    logprobs are the rollout's (stage 3 trains the policy it samples), the first step is the
    plain ranking, and a dominant prior writes the ranking's top K."""
    model, plain, enc = gpt2
    layout = dataclasses.replace(plain, ranking_prior=1.5)
    prompts, exclude = prompts_of(enc, HISTORIES), [set(h) for h in HISTORIES]
    batch = generate_pages(model, layout, prompts, K, exclude=exclude)
    for row, prompt in enumerate(prompts):
        items, logps = reference_greedy(model, layout, prompt, K, exclude[row], prior=1.5)
        assert batch.items[row] == items
        torch.testing.assert_close(batch.logprobs[row], torch.tensor(logps), atol=1e-5, rtol=0)
    assert batch.items != generate_pages(model, plain, prompts, K, exclude=exclude).items  # it changes pages
    sampled = generate_pages(model, layout, prompts * 2, K, mode="sample", exclude=exclude * 2,
                             generator=torch.Generator().manual_seed(3))
    logp = constrained_logprobs(model, layout, prompts * 2, sampled.response_ids, exclude * 2, k=K)[0]
    torch.testing.assert_close(logp, sampled.logprobs, atol=1e-5, rtol=0)

    scores = first_item_scores(model, layout, prompts)
    torch.testing.assert_close(scores, first_item_scores(model, plain, prompts))
    for row, ex in enumerate(exclude):
        scores[row, list(ex)] = float("-inf")
    dominant = generate_pages(model, dataclasses.replace(plain, ranking_prior=1e6), prompts, K, exclude=exclude)
    assert dominant.items == scores.topk(K, dim=1).indices.tolist()


def test_the_repeat_penalty_lowers_items_of_categories_already_on_the_page(gpt2):
    """The guided stage's page term (layout.repeat_penalty): greedy pages follow the rule
    above, only over the first page_positions steps; teacher-forced logprobs match the
    sampled pages' (the KL to SFT and any later RL read them); a dominant penalty writes a
    page whose first positions never repeat a category; uncategorised items are never lowered."""
    model, plain, enc = gpt2
    cats = [-1 if n % 7 == 0 else n % 3 for n in range(N_ITEMS)]
    layout = dataclasses.replace(plain, ranking_prior=0.5, repeat_penalty=0.8, page_positions=3,
                                 item_category=cats)
    prompts, exclude = prompts_of(enc, HISTORIES), [set(h) for h in HISTORIES]
    batch = generate_pages(model, layout, prompts, K, exclude=exclude)
    for row, prompt in enumerate(prompts):
        items, logps = reference_greedy(model, layout, prompt, K, exclude[row], prior=0.5, penalty=0.8, cats=cats,
                                        positions=3)
        assert batch.items[row] == items
        torch.testing.assert_close(batch.logprobs[row], torch.tensor(logps), atol=1e-5, rtol=0)
    sampled = generate_pages(model, layout, prompts * 2, K, mode="sample", exclude=exclude * 2,
                             generator=torch.Generator().manual_seed(5))
    logp = constrained_logprobs(model, layout, prompts * 2, sampled.response_ids, exclude * 2, k=K)[0]
    torch.testing.assert_close(logp, sampled.logprobs, atol=1e-5, rtol=0)

    dominant = generate_pages(model, dataclasses.replace(layout, repeat_penalty=1e6), prompts, K, exclude=exclude)
    for page in dominant.items:
        placed = [cats[i] for i in page[:3] if cats[i] >= 0]
        assert len(placed) == len(set(placed))
    off = dataclasses.replace(layout, repeat_penalty=0.0)
    assert generate_pages(model, off, prompts, K, exclude=exclude).items == generate_pages(
        model, dataclasses.replace(plain, ranking_prior=0.5), prompts, K, exclude=exclude).items


def test_the_evaluator_term_adds_an_independent_models_scores_in_the_policys_units(gpt2):
    """The guided stage's item term (layout.evaluator_weight): greedy pages follow the rule of
    the reference, teacher-forced logprobs match sampled pages' under it, a dominant weight
    writes the evaluator's own ranking, and a layout that weights an evaluator refuses to
    decode without its scores (it would silently be another policy)."""
    model, plain, enc = gpt2
    layout = dataclasses.replace(plain, ranking_prior=0.5, evaluator_weight=0.7)
    prompts, exclude = prompts_of(enc, HISTORIES), [set(h) for h in HISTORIES]
    scores = torch.randn(len(prompts), N_ITEMS, generator=torch.Generator().manual_seed(3))
    batch = generate_pages(model, layout, prompts, K, exclude=exclude, evaluator_scores=scores)
    for row, prompt in enumerate(prompts):
        items, logps = reference_greedy(model, layout, prompt, K, exclude[row], prior=0.5, weight=0.7,
                                        scores=scores[row])
        assert batch.items[row] == items
        torch.testing.assert_close(batch.logprobs[row], torch.tensor(logps), atol=1e-5, rtol=0)
    assert batch.items != generate_pages(model, dataclasses.replace(layout, evaluator_weight=0.0), prompts, K,
                                         exclude=exclude).items  # the term changes pages here
    sampled = generate_pages(model, layout, prompts * 2, K, mode="sample", exclude=exclude * 2,
                             generator=torch.Generator().manual_seed(5), evaluator_scores=scores.repeat(2, 1))
    logp = constrained_logprobs(model, layout, prompts * 2, sampled.response_ids, exclude * 2, k=K,
                                evaluator_scores=scores.repeat(2, 1))[0]
    torch.testing.assert_close(logp, sampled.logprobs, atol=1e-5, rtol=0)

    dominant = generate_pages(model, dataclasses.replace(layout, evaluator_weight=1e6), prompts, K, exclude=exclude,
                              evaluator_scores=scores)
    for row, page in enumerate(dominant.items):
        ranked = [i for i in scores[row].argsort(descending=True).tolist() if i not in exclude[row]]
        assert page == ranked[:K]
    with pytest.raises(ValueError, match="evaluator_scores"):
        generate_pages(model, layout, prompts, K, exclude=exclude)
    with pytest.raises(ValueError, match="shape"):
        generate_pages(model, layout, prompts, K, exclude=exclude, evaluator_scores=scores[:, :3])


def test_the_quality_term_raises_better_items_on_the_page_only(gpt2):
    """The guided stage's second page term (layout.quality_weight): greedy pages follow the
    reference with the evaluator term beside it, only over the first page_positions steps;
    teacher-forced logprobs match sampled pages'; a dominant weight fills the page with the
    highest-quality allowed items and leaves the rest of the list to the policy; a weight
    without a quality per item is refused."""
    model, plain, enc = gpt2
    quality = torch.randn(N_ITEMS, generator=torch.Generator().manual_seed(11)).tolist()
    layout = dataclasses.replace(plain, ranking_prior=0.5, evaluator_weight=0.3, quality_weight=0.6,
                                 page_positions=3, item_quality=quality)
    prompts, exclude = prompts_of(enc, HISTORIES), [set(h) for h in HISTORIES]
    scores = torch.randn(len(prompts), N_ITEMS, generator=torch.Generator().manual_seed(3))
    batch = generate_pages(model, layout, prompts, K, exclude=exclude, evaluator_scores=scores)
    for row, prompt in enumerate(prompts):
        items, logps = reference_greedy(model, layout, prompt, K, exclude[row], prior=0.5, weight=0.3,
                                        scores=scores[row], positions=3, quality_weight=0.6, quality=quality)
        assert batch.items[row] == items
        torch.testing.assert_close(batch.logprobs[row], torch.tensor(logps), atol=1e-5, rtol=0)
    sampled = generate_pages(model, layout, prompts * 2, K, mode="sample", exclude=exclude * 2,
                             generator=torch.Generator().manual_seed(5), evaluator_scores=scores.repeat(2, 1))
    logp = constrained_logprobs(model, layout, prompts * 2, sampled.response_ids, exclude * 2, k=K,
                                evaluator_scores=scores.repeat(2, 1))[0]
    torch.testing.assert_close(logp, sampled.logprobs, atol=1e-5, rtol=0)

    dominant = dataclasses.replace(plain, quality_weight=1e6, page_positions=3, item_quality=quality)
    pages = generate_pages(model, dominant, prompts, K, exclude=exclude).items
    by_quality = sorted(range(N_ITEMS), key=lambda i: -quality[i])
    for row, (page, prompt) in enumerate(zip(pages, prompts)):
        assert page[:3] == [i for i in by_quality if i not in exclude[row]][:3]
        # after the page positions the policy writes on from that prefix, quality unweighted
        assert page == reference_greedy(model, dominant, prompt, K, exclude[row], positions=3,
                                        quality_weight=1e6, quality=quality)[0]
    assert pages != [[i for i in by_quality if i not in ex][:K] for ex in exclude]
    with pytest.raises(ValueError, match="item_quality"):
        generate_pages(model, dataclasses.replace(plain, quality_weight=1.0, page_positions=3), prompts, K)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_teacher_forced_logprobs_match_sampled_pages(gpt2, temperature):
    model, layout, enc = gpt2
    prompts = prompts_of(enc, HISTORIES * 2)
    exclude = [set(h) for h in HISTORIES * 2]
    gen = torch.Generator().manual_seed(1)
    batch = generate_pages(model, layout, prompts, K, mode="sample", exclude=exclude, temperature=temperature,
                           generator=gen)
    logp, entropy, mask = constrained_logprobs(model, layout, prompts, batch.response_ids, exclude, k=K,
                                               temperature=temperature)
    torch.testing.assert_close(logp, batch.logprobs, atol=1e-5, rtol=0)
    assert torch.equal(mask, batch.response_mask)
    assert (entropy[:, :K] > 0).all() and (entropy[:, K] == 0).all()
    # Lists of token ids work the same, and k defaults to the page length.
    as_lists = [[layout.item_token(i) for i in items] + [layout.eos_id] for items in batch.items]
    again = constrained_logprobs(model, layout, prompts, as_lists, exclude, temperature=temperature)[0]
    torch.testing.assert_close(again, batch.logprobs, atol=1e-5, rtol=0)


def test_teacher_forcing_gives_gradients_and_value_states(gpt2):
    model, layout, enc = gpt2
    prompts = prompts_of(enc, HISTORIES)
    batch = generate_pages(model, layout, prompts, K, mode="greedy")
    logp, _, mask, hidden = constrained_logprobs(model, layout, prompts, batch.response_ids, return_hidden=True)
    assert hidden.shape == (len(prompts), K + 1, 32)
    # The state before response token t is the one that emits it: last prompt token for t=0.
    full = model(input_ids=torch.tensor([prompts[1]]), output_hidden_states=True).hidden_states[-1][0, -1]
    torch.testing.assert_close(hidden[1, 0], full, atol=1e-5, rtol=1e-5)
    logp.sum().backward()
    grad = model.get_input_embeddings().weight.grad
    assert grad is not None and grad.abs().sum() > 0
    model.zero_grad()


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_short_catalogue_ends_the_page_early(gpt2, pad_is_eos):
    model, layout, enc = gpt2
    if pad_is_eos:  # as in GPT-2, whose pad token is its eos: padding must not read as pages
        layout = dataclasses.replace(layout, pad_id=layout.eos_id)
    exclude = [set(range(N_ITEMS)) - {4, 9}, set()]
    prompts = prompts_of(enc, [[1], [2]])
    for mode in ("greedy", "sample"):
        batch = generate_pages(model, layout, prompts, K, mode=mode, exclude=exclude)
        assert sorted(batch.items[0]) == [4, 9] and len(batch.items[1]) == K
        assert batch.response_mask[0].tolist() == [True, True, True, False, False, False]
        assert batch.response_ids[0, 2] == layout.eos_id and (batch.response_ids[0, 3:] == layout.pad_id).all()
        assert (batch.logprobs[0, 2:] == 0).all()
        logp, _, mask = constrained_logprobs(model, layout, prompts, batch.response_ids, exclude)
        torch.testing.assert_close(logp, batch.logprobs, atol=1e-5, rtol=0)
        assert torch.equal(mask, batch.response_mask)
        pages = [[layout.item_token(i) for i in items] + [layout.eos_id] for items in batch.items]
        logp = constrained_logprobs(model, layout, prompts, pages, exclude, k=K)[0]
        torch.testing.assert_close(logp, batch.logprobs, atol=1e-5, rtol=0)


def test_teacher_forcing_rejects_pages_that_break_the_rules(gpt2):
    model, layout, enc = gpt2
    prompts = prompts_of(enc, [[1]])
    page = lambda *items: [[layout.item_token(i) for i in items] + [layout.eos_id]]  # noqa: E731
    with pytest.raises(ValueError, match="breaks the page constraints"):
        constrained_logprobs(model, layout, prompts, page(2, 2, 5), k=3)  # repeat
    with pytest.raises(ValueError, match="breaks the page constraints"):
        constrained_logprobs(model, layout, prompts, page(2, 1, 5), exclude=[{1}], k=3)  # excluded
    with pytest.raises(ValueError, match="breaks the page constraints"):
        constrained_logprobs(model, layout, prompts, page(2, 5), k=3)  # eos too early
    with pytest.raises(ValueError, match="non-item token"):
        constrained_logprobs(model, layout, prompts, [[layout.item_token(2), layout.user_offset, layout.eos_id]])


def test_first_item_scores_are_the_constrained_first_step(gpt2):
    model, layout, enc = gpt2
    prompts = prompts_of(enc, HISTORIES)
    scores = first_item_scores(model, layout, prompts)
    assert scores.shape == (len(prompts), N_ITEMS)
    torch.testing.assert_close(scores.logsumexp(dim=1), torch.zeros(len(prompts)), atol=1e-5, rtol=0)
    greedy = generate_pages(model, layout, prompts, K)
    assert [items[0] for items in greedy.items] == scores.argmax(dim=1).tolist()
    torch.testing.assert_close(greedy.logprobs[:, 0], scores.max(dim=1).values, atol=1e-5, rtol=0)


def test_sampling_is_seeded_and_the_model_mode_is_restored():
    model, layout, enc = policy("gpt2", lora=True)  # a peft-wrapped policy decodes the same way
    model.train()
    prompts = prompts_of(enc, HISTORIES)
    draw = lambda seed, temp=1.0: generate_pages(  # noqa: E731
        model, layout, prompts, K, mode="sample", temperature=temp, generator=torch.Generator().manual_seed(seed)
    ).items
    assert draw(0) == draw(0) and draw(0) != draw(1)
    assert draw(0, temp=1e-4) == generate_pages(model, layout, prompts, K).items
    assert model.training


def test_bad_arguments_fail_clearly(gpt2):
    model, layout, enc = gpt2
    prompts = prompts_of(enc, [[1]])
    with pytest.raises(ValueError, match="mode must be"):
        generate_pages(model, layout, prompts, K, mode="nucleus")
    with pytest.raises(ValueError, match="outside 0..29"):
        generate_pages(model, layout, prompts, K, exclude=[{30}])
    with pytest.raises(ValueError, match="1 entries for 2 prompts"):
        generate_pages(model, layout, prompts * 2, K, exclude=[{1}])
    with pytest.raises(ValueError, match="at least one token"):
        generate_pages(model, layout, [[]], K)
    with pytest.raises(ValueError, match="need 141 positions but the model has 128"):
        generate_pages(model, layout, prompts, 140 - len(prompts[0]))
