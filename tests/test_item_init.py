"""Item token rows started from metadata (`model.item_init: metadata`): the features, the
vectors, and the policy built with them."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from pagellm.config import ModelConfig
from pagellm.models.item_init import item_features, metadata_vectors
from pagellm.models.policy import build_policy
from pagellm.vocab import Vocab

TINY = {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 64}
FAMILIES = [  # (brand, category path, title words): 8 items of each family
    ("acme", ["Beauty", "Fragrance", "Women's"], "eau de parfum spray"),
    ("zenith", ["Beauty", "Hair Care", "Shampoo"], "volume shampoo bottle"),
    ("nimbus", ["Beauty", "Makeup", "Eyes"], "mascara black lash"),
]


def items_table(with_missing: bool = True) -> pd.DataFrame:
    rows = []
    for brand, path, words in FAMILIES:
        for k in range(8):
            rows.append({"brand": brand, "categories": path, "title": f"{brand} {words} no{len(rows)}"})
    if with_missing:
        rows.append({"brand": None, "categories": [], "title": None})  # no metadata at all
    return pd.DataFrame(rows).assign(index=lambda d: np.arange(len(d)))[::-1]  # not in index order


def test_features_are_idf_title_words_brand_and_category_prefixes_each_block_unit_length():
    rows = item_features(items_table())
    first = rows[0]
    # "no0" is one item's own word: it links the item to nothing and is dropped.
    assert "w:no0" not in first and "w:parfum" in first
    assert {k for k in first if k.startswith("c:")} == {"c:Beauty", "c:Beauty>Fragrance",
                                                      "c:Beauty>Fragrance>Women's"}
    assert first["b:acme"] == 1.0
    for prefix in ("w:", "c:"):
        assert math.isclose(sum(v * v for k, v in first.items() if k.startswith(prefix)), 1.0)
    assert rows[-1] == {}


def test_items_of_one_family_start_closer_to_each_other_than_to_the_others():
    vec, has = metadata_vectors(items_table(), dim=8, seed=0)
    assert vec.shape == (25, 8) and has.tolist() == [True] * 24 + [False]
    assert not vec[24].any()  # no metadata: a zero row, the caller keeps the random init
    unit = vec[:24] / np.linalg.norm(vec[:24], axis=1, keepdims=True)
    sim = unit @ unit.T
    family = np.arange(24) // 8
    same = sim[family[:, None] == family[None, :]].mean()
    other = sim[family[:, None] != family[None, :]].mean()
    assert same > 0.8 and other < 0.2
    again, _ = metadata_vectors(items_table(), dim=8, seed=0)
    np.testing.assert_array_equal(vec, again)  # a function of the data alone


def test_too_little_metadata_is_refused():
    bare = pd.DataFrame({"index": range(30), "title": [None] * 30, "brand": [None] * 30, "categories": [[]] * 30})
    with pytest.raises(ValueError, match="item_init=metadata"):
        metadata_vectors(bare, dim=8)


def test_policy_built_with_metadata_init_sets_only_item_rows_at_the_random_rows_scale():
    vocab = Vocab.build([f"u{n}" for n in range(4)], [f"i{n:03d}" for n in range(25)])
    plain, _, layout = build_policy(ModelConfig(init=TINY), vocab, seed=0)
    cfg = ModelConfig(init=TINY, item_init="metadata", item_init_scale=2.0)
    model, _, _ = build_policy(cfg, vocab, seed=0, items=items_table())
    w, w0 = model.get_input_embeddings().weight, plain.get_input_embeddings().weight
    a, b = layout.item_offset, layout.item_offset + layout.n_items
    torch.testing.assert_close(w[:a], w0[:a])  # text and user tokens as the random init made them
    torch.testing.assert_close(w[b - 1], w0[b - 1])  # the item without metadata keeps its row
    assert not torch.allclose(w[a:b - 1], w0[a:b - 1])
    assert math.isclose(w[a:b - 1].std().item(), 2.0 * w0[a:b].std().item(), rel_tol=0.1)
    assert model.get_output_embeddings().weight is w  # tied: the output rows are the same
    with pytest.raises(ValueError, match="items table"):
        build_policy(cfg, vocab, seed=0)


def test_config_refuses_a_non_positive_scale_or_an_unknown_init():
    with pytest.raises(ValidationError):
        ModelConfig(item_init_scale=0.0)
    with pytest.raises(ValidationError):
        ModelConfig(item_init="text")
