"""Item token embeddings started from the items' metadata (`model.item_init: metadata`).

A randomly initialised item token knows nothing until the log trains it, and on 5-core
data most items are seen a handful of times. Their titles, brands and category paths are
known from the start: items that share words, a brand or a category begin close together,
so what the log teaches about one reaches its neighbours (the idea behind initialising ID
embeddings from text in LLM-based sequential recommenders, done here without a language
model). The vectors are the top singular directions of a sparse item × feature matrix:
TF-IDF title words, the brand, and every prefix of the category path, each block
normalised per item so that no block dominates by its length.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.sparse.linalg import svds

_WORD = re.compile(r"[a-z0-9]+")


def _listify(value) -> list[str]:
    """A metadata cell as a list of strings (lists, arrays, scalars, None/NaN)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, float) and math.isnan(value):
        return []
    if isinstance(value, Iterable):
        return [str(v) for v in value if v is not None and str(v)]
    return [str(value)]


def item_features(items: pd.DataFrame) -> list[dict[str, float]]:
    """Per item (in `index` order): {feature: weight} over title words, brand and category prefixes.

    Title words are weighted by TF-IDF and kept only when at least two items use them (a
    word one item has links it to nothing). Each block is L2-normalised within the item.
    """
    items = items.sort_values("index")  # the data stage's table: every ITEM_COLUMNS column is there
    titles = [_WORD.findall(" ".join(_listify(t)).lower()) for t in items["title"]]
    df = Counter(w for words in titles for w in set(words))
    n = len(items)
    rows: list[dict[str, float]] = []
    for words, brand, path in zip(titles, items["brand"], items["categories"]):
        blocks: list[dict[str, float]] = []
        tf = Counter(w for w in words if df[w] >= 2)
        blocks.append({f"w:{w}": c * math.log(n / df[w]) for w, c in tf.items()})
        blocks.append({f"b:{b.lower()}": 1.0 for b in _listify(brand)})
        labels = _listify(path)
        blocks.append({"c:" + ">".join(labels[: k + 1]): 1.0 for k in range(len(labels))})
        row: dict[str, float] = {}
        for block in blocks:
            norm = math.sqrt(sum(v * v for v in block.values()))
            row.update({k: v / norm for k, v in block.items() if norm > 0})
        rows.append(row)
    return rows


def metadata_vectors(items: pd.DataFrame, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """([n_items, dim] vectors, [n_items] bool: the item has any feature).

    Vectors are the item × feature matrix's top-`dim` left singular vectors scaled by their
    singular values, centred and scaled to unit standard deviation over the items that have
    features; items without any are zero rows (the caller keeps their random init).
    """
    rows = item_features(items)
    names = sorted({k for r in rows for k in r})
    col = {k: j for j, k in enumerate(names)}
    has = np.array([bool(r) for r in rows])
    if not names or has.sum() <= dim:
        raise ValueError(
            f"model.item_init=metadata needs titles, brands or categories for more than {dim} items; "
            f"{int(has.sum())} of {len(rows)} have any"
        )
    data, ri, ci = [], [], []
    for i, r in enumerate(rows):
        for k, v in r.items():
            ri.append(i)
            ci.append(col[k])
            data.append(v)
    x = sparse.csr_matrix((data, (ri, ci)), shape=(len(rows), len(names)), dtype=np.float64)
    k = min(dim, min(x.shape) - 1)
    # svds' start vector is random; a fixed one makes the init a function of the data alone.
    v0 = np.random.default_rng(seed).standard_normal(min(x.shape))
    u, s, _ = svds(x, k=k, v0=v0)
    vec = np.zeros((len(rows), dim))
    vec[:, :k] = u * s
    vec[has] -= vec[has].mean(axis=0)
    vec[has] /= vec[has].std() or 1.0
    vec[~has] = 0.0
    return vec.astype(np.float32), has

