"""User/item tokens: the vocabulary table, the tokenizer that holds them, and prompt encoding.

Every user and item is one token (`<user_n>`, `<item_n>`, n the dense index from the data
stage). Item tokens are contiguous in the tokenizer (`<item_i>` = `item_offset + i`), so
decoding can slice the logits instead of gathering 30k ids, and a page maps to item
indices by one subtraction.

The template pieces ("has interacted with :", ...) are tokenized once, by tokenizing a
reference prompt and cutting it at the user/item tokens; `PromptEncoder` then assembles
ids directly. Cutting a real tokenization (instead of tokenizing each piece alone) makes
the pieces exactly what the tokenizer produces in context, whatever its normalizer,
pre-tokenizer or BOS convention.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

LAYOUT_FILE = "pagellm_tokens.json"
TEMPLATE_HEAD = "has interacted with :"
TEMPLATE_TAIL = "The user will interact with :"
# The from-scratch tokenizer's specials, in id order (pad = 0 so padding rows are obvious).
LOCAL_SPECIALS = ("<pad>", "<unk>", "<eos>")


def user_token(index: int) -> str:
    return f"<user_{index}>"


def item_token_text(index: int) -> str:
    return f"<item_{index}>"


@dataclass
class Vocab:
    """Dense user/item indices: position in the list = index; lists sorted by raw id."""

    user_ids: list[str]
    item_ids: list[str]
    _user_pos: dict[str, int] = field(init=False, repr=False, compare=False)
    _item_pos: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.user_ids = [str(u) for u in self.user_ids]
        self.item_ids = [str(i) for i in self.item_ids]
        self._user_pos = {u: n for n, u in enumerate(self.user_ids)}
        self._item_pos = {i: n for n, i in enumerate(self.item_ids)}
        if len(self._user_pos) != len(self.user_ids) or len(self._item_pos) != len(self.item_ids):
            raise ValueError("Vocab: duplicate raw ids; use Vocab.build() to deduplicate")

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def user_index(self, raw: str) -> int | None:
        return self._user_pos.get(str(raw))

    def item_index(self, raw: str) -> int | None:
        return self._item_pos.get(str(raw))

    @classmethod
    def build(cls, user_ids, item_ids) -> "Vocab":
        """Sorted and deduplicated, the same rule the data stage uses (Python string order)."""
        return cls(sorted({str(u) for u in user_ids}), sorted({str(i) for i in item_ids}))

    def to_frame(self) -> pd.DataFrame:
        users = pd.DataFrame({"kind": "user", "raw_id": self.user_ids, "index": range(self.n_users)})
        items = pd.DataFrame({"kind": "item", "raw_id": self.item_ids, "index": range(self.n_items)})
        frame = pd.concat([users, items], ignore_index=True)
        frame["index"] = frame["index"].astype("int64")
        frame["token"] = "<" + frame["kind"] + "_" + frame["index"].astype(str) + ">"
        return frame

    def to_parquet(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.to_frame().to_parquet(path, index=False)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> "Vocab":
        missing = {"kind", "raw_id", "index"} - set(frame.columns)
        if missing:
            raise ValueError(f"vocab table lacks columns {sorted(missing)}")
        unknown = set(frame["kind"]) - {"user", "item"}
        if unknown:
            raise ValueError(f"vocab table: unknown kind(s) {sorted(unknown)}")
        lists = {}
        for kind in ("user", "item"):
            part = frame[frame["kind"] == kind].sort_values("index")
            if not (part["index"].to_numpy() == range(len(part))).all():
                raise ValueError(f"vocab table: {kind} indices are not dense 0..{len(part) - 1}")
            lists[kind] = part["raw_id"].astype(str).tolist()
        return cls(lists["user"], lists["item"])

    @classmethod
    def from_parquet(cls, path: str | Path) -> "Vocab":
        return cls.from_frame(pd.read_parquet(path))


@dataclass
class TokenLayout:
    """Where the user/item tokens and template pieces live in one tokenizer's id space."""

    item_offset: int
    n_items: int
    user_offset: int
    n_users: int
    eos_id: int
    pad_id: int
    bos_id: int | None
    vocab_size: int  # len(tokenizer): the embedding rows a model needs
    eos_text: str
    prefix_ids: list[int]  # before the user token (e.g. BOS)
    head_ids: list[int]  # "has interacted with :" between the user token and the history
    tail_ids: list[int]  # "The user will interact with :" after the history
    empty_ids: list[int]  # head + tail as tokenized when the history is empty
    # False: prompts never carry the user token (model.user_tokens); the rows still exist,
    # so one vocabulary serves both settings.
    user_tokens: bool = True
    # model.ranking_prior: weight of the first page position's item logits added to every
    # later position's when pages are decoded or scored (pagellm/models/decoding.py).
    ranking_prior: float = 0.0
    # The guided stage's page terms (pagellm/train/guided.py), at each of the first
    # `page_positions` positions (the page) only: an item's logit is lowered by repeat_penalty x
    # the page items already placed in its category (item_category[i]; -1 = none), and raised
    # by quality_weight x item_quality[i] (the page prior's standardised item quality) in units
    # of the policy's own first-position ranking. 0 = off.
    repeat_penalty: float = 0.0
    page_positions: int = 0
    item_category: list[int] | None = None
    quality_weight: float = 0.0
    item_quality: list[float] | None = None
    # The guided stage's item term (pagellm/models/evaluator.py): an independently trained
    # next-item model's scores for the user, standardised over items, added to every page
    # position's item logits at this weight relative to the policy's own first-position
    # ranking. 0 = off; above 0 a decode must be handed those scores.
    evaluator_weight: float = 0.0

    def drop_tail(self) -> None:
        """Prompts end with the history's last item (model.prompt_tail false): the page's first
        item is then predicted where every later history item is, SASRec's read-out, instead
        of at the template's closing words, a position the next-item phase trains once per
        user (docs/BENCHMARKS.md, Beauty)."""
        self.tail_ids = []
        self.empty_ids = list(self.head_ids)  # an empty history: the head's last token predicts

    def item_token(self, index):
        """Token id(s) of item index(es); works on ints and tensors."""
        return self.item_offset + index

    def is_item_token(self, token):
        """Bool (tensor) marking item tokens; works on ints and tensors."""
        return (token >= self.item_offset) & (token < self.item_offset + self.n_items)

    def token_to_item(self, token: int) -> int | None:
        token = int(token)
        return token - self.item_offset if self.is_item_token(token) else None

    def tokens_to_items(self, tokens: torch.Tensor) -> torch.Tensor:
        """Item index per token, -1 where the token is not an item token."""
        return torch.where(self.is_item_token(tokens), tokens - self.item_offset, torch.full_like(tokens, -1))

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / LAYOUT_FILE).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> "TokenLayout":
        path = Path(directory) / LAYOUT_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} missing: not a PageLLM tokenizer directory")
        state = json.loads(path.read_text())
        if "penalty_positions" in state:  # layouts saved before the quality term named it for the penalty
            state["page_positions"] = state.pop("penalty_positions")
        return cls(**state)


def render_prompt(user_index: int, item_indices) -> str:
    items = " ".join(item_token_text(int(i)) for i in item_indices)
    middle = f" {items} " if items else " "
    return f"{user_token(int(user_index))} {TEMPLATE_HEAD}{middle}{TEMPLATE_TAIL}"


def render_page(item_indices, eos_text: str = LOCAL_SPECIALS[2]) -> str:
    """Display form of a page. Token ids come from `PromptEncoder.encode_page`, not from
    tokenizing this string: a pretrained BPE turns the space before its eos into a token."""
    return " ".join([item_token_text(int(i)) for i in item_indices] + [eos_text])


def _tokens(prefix: str, count: int) -> list[AddedToken]:
    # lstrip: the added token swallows the space before it, so "<item_3> <item_91>" is two
    # ids with nothing between them, in prompts exactly as in generated pages.
    return [AddedToken(f"<{prefix}_{n}>", lstrip=True, normalized=False, special=False) for n in range(count)]


def _check_contiguous(tokenizer: PreTrainedTokenizerBase, prefix: str, count: int) -> int:
    if count == 0:
        return len(tokenizer)
    first = tokenizer.convert_tokens_to_ids(f"<{prefix}_0>")
    last = tokenizer.convert_tokens_to_ids(f"<{prefix}_{count - 1}>")
    if last - first != count - 1:
        raise RuntimeError(f"<{prefix}_n> tokens are not contiguous ({first}..{last} for {count})")
    return first


def _cut_template(tokenizer, u0: int, i0: int) -> dict:
    """Template pieces, cut out of real tokenizations at the user and item tokens."""
    # Item 0 twice: the cut works for a one-item vocabulary too.
    full = tokenizer(render_prompt(0, [0, 0]))["input_ids"]
    empty = tokenizer(render_prompt(0, []))["input_ids"]
    try:
        at_user, at_first = full.index(u0), full.index(i0)
        at_second = full.index(i0, at_first + 1)
    except ValueError as exc:
        raise RuntimeError(f"the tokenizer splits user/item tokens; got {full}") from exc
    if at_second != at_first + 1:
        raise RuntimeError(f"the tokenizer puts tokens between two items: {full[at_first:at_second + 1]}")
    prefix = full[:at_user]
    if empty[: at_user + 1] != full[: at_user + 1]:
        raise RuntimeError("the tokenizer encodes the prompt start differently with an empty history")
    return {
        "prefix_ids": prefix,
        "head_ids": full[at_user + 1 : at_first],
        "tail_ids": full[at_second + 1 :],
        "empty_ids": empty[at_user + 1 :],
    }


def _make_layout(tokenizer, n_users: int, n_items: int, user_offset: int, item_offset: int) -> TokenLayout:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; a page needs one to end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # pad rows are masked out, so sharing eos is safe
    if n_users < 1 or n_items < 1:
        raise ValueError(f"a PageLLM vocabulary needs users and items, got {n_users} users, {n_items} items")
    pieces = _cut_template(tokenizer, user_offset, item_offset)
    bos = pieces["prefix_ids"][0] if pieces["prefix_ids"] else None
    return TokenLayout(
        item_offset=item_offset,
        n_items=n_items,
        user_offset=user_offset,
        n_users=n_users,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        bos_id=bos,
        vocab_size=len(tokenizer),
        eos_text=tokenizer.eos_token,
        **pieces,
    )


def build_tokenizer(vocab: Vocab) -> tuple[PreTrainedTokenizerFast, TokenLayout]:
    """A word-level tokenizer for from-scratch models: specials, template words, users, items."""
    words = list(LOCAL_SPECIALS)
    for word in f"{TEMPLATE_HEAD} {TEMPLATE_TAIL}".split():
        if word not in words:
            words.append(word)
    user_offset = len(words)
    item_offset = user_offset + vocab.n_users
    table = {w: n for n, w in enumerate(words)}
    table.update({user_token(n): user_offset + n for n in range(vocab.n_users)})
    table.update({item_token_text(n): item_offset + n for n in range(vocab.n_items)})
    core = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    # Split on whitespace only, so "<item_3>" stays one word (plain Whitespace splits at "<").
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>", padding_side="left"
    )
    return tokenizer, _make_layout(tokenizer, vocab.n_users, vocab.n_items, user_offset, item_offset)


def extend_tokenizer(tokenizer: PreTrainedTokenizerBase, vocab: Vocab) -> tuple[PreTrainedTokenizerBase, TokenLayout]:
    """Add user then item tokens to a pretrained tokenizer (in place) as contiguous added tokens."""
    clash = [t for t in (user_token(0), item_token_text(0)) if t in tokenizer.get_vocab()]
    if clash:
        raise ValueError(f"tokenizer already holds {clash}; load it with load_tokenizer() instead of extending it")
    # One add_tokens call per kind: 30k tokens take ~0.4 s that way, while one call per
    # token costs ~1 ms each and grows with the number already added (measured, 2 CPUs).
    start = len(tokenizer)
    added = tokenizer.add_tokens(_tokens("user", vocab.n_users)) + tokenizer.add_tokens(_tokens("item", vocab.n_items))
    if added != vocab.n_users + vocab.n_items:
        raise RuntimeError(f"added {added} tokens, expected {vocab.n_users + vocab.n_items}")
    user_offset = _check_contiguous(tokenizer, "user", vocab.n_users)
    item_offset = _check_contiguous(tokenizer, "item", vocab.n_items)
    if user_offset != start or item_offset != start + vocab.n_users:
        raise RuntimeError(f"new tokens start at {user_offset}/{item_offset}, expected {start}")
    return tokenizer, _make_layout(tokenizer, vocab.n_users, vocab.n_items, user_offset, item_offset)


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, layout: TokenLayout, directory: str | Path) -> None:
    tokenizer.save_pretrained(str(directory))
    layout.save(directory)


def load_tokenizer(directory: str | Path) -> tuple[PreTrainedTokenizerBase, TokenLayout]:
    layout = TokenLayout.load(directory)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    check_layout(tokenizer, layout)
    return tokenizer, layout


def check_layout(tokenizer: PreTrainedTokenizerBase, layout: TokenLayout) -> None:
    """Fail loudly when a layout file does not describe this tokenizer."""
    expect = {
        item_token_text(0): layout.item_offset,
        item_token_text(layout.n_items - 1): layout.item_offset + layout.n_items - 1,
        user_token(0): layout.user_offset,
        tokenizer.eos_token: layout.eos_id,
    }
    got = {t: tokenizer.convert_tokens_to_ids(t) for t in expect}
    if got != expect or len(tokenizer) != layout.vocab_size:
        raise ValueError(f"{LAYOUT_FILE} does not match the tokenizer: expected {expect}, got {got}")


class PromptEncoder:
    """Builds prompt/page ids from the layout without tokenizing strings per call."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, layout: TokenLayout):
        self.tokenizer = tokenizer
        self.layout = layout

    def _check(self, indices, n: int, kind: str) -> list[int]:
        out = [int(i) for i in indices]
        bad = [i for i in out if not 0 <= i < n]
        if bad:
            raise ValueError(f"{kind} index out of range 0..{n - 1}: {bad[:5]}")
        return out

    def encode_prompt(self, user_index: int | None, item_indices) -> list[int]:
        """Prompt ids; user_index None drops the user token (cold start: history alone), and
        so does a layout whose policy was trained without user tokens."""
        lay = self.layout
        items = self._check(item_indices, lay.n_items, "item")
        head = list(lay.prefix_ids)
        if user_index is not None and lay.user_tokens:
            (user,) = self._check([user_index], lay.n_users, "user")
            head.append(lay.user_offset + user)
        if not items:
            return head + lay.empty_ids
        return head + lay.head_ids + [lay.item_offset + i for i in items] + lay.tail_ids

    def encode_page(self, item_indices) -> list[int]:
        items = self._check(item_indices, self.layout.n_items, "item")
        return [self.layout.item_offset + i for i in items] + [self.layout.eos_id]

    def decode_page(self, token_ids) -> list[int]:
        """Item indices of a generated response, up to its first eos."""
        items = []
        for token in token_ids:
            token = int(token)
            if token == self.layout.eos_id:
                break
            item = self.layout.token_to_item(token)
            if item is None:
                raise ValueError(f"token {token} in a page is not an item token")
            items.append(item)
        return items
