"""Few-shot probe prompts (METHOD.md, Step 1 "Prompt") and batch encoding.

A prompt is ``n_shots`` demonstrations and a query in the reference's template::

    "Q: {x1}\\nA: {y1}\\n\\nQ: {x2}\\nA: {y2}\\n\\n...Q: {xq}\\nA:"

Demonstrations come from a seeded training split of the pairs (70%), queries from the
held-out rest. The corrupted prompt of a trial has the same demonstrations with their labels
shuffled among themselves and the same query. The target is the first token of
``" " + output`` as the tokenizer splits it after the prompt.

What goes in front of the prompt text is a rule (``bos=``, :data:`BOS_RULES`): ``"reference"``
(default) is the reference's, whose loader leaves the BOS to the tokenizer for Llama and Gemma
and prepends a literal ``<|endoftext|>`` for every other family (GPT-2, GPT-J, NeoX, OLMo, and
in Soteria's fork Qwen2 and Phi-3). :data:`PROMPT_RULES` names soteria's other choices, recorded
with the scores (``HeadScores.settings["prompts"]``).
"""

from __future__ import annotations

import operator
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .probes import load_pairs

__all__ = [
    "BOS_RULES",
    "PROMPT_RULES",
    "REFERENCE_BOS",
    "ProbePrompts",
    "bos_prefix",
    "build_prompts",
    "check_bos",
    "encode_batch",
    "first_answer_token",
    "format_prompt",
    "position_ids",
    "prompt_settings",
    "split_pairs",
]

_MAX_SHUFFLES = 100  # rejection-sampling budget for a derangement (each try succeeds w.p. ~1/e)

REFERENCE_BOS = "<|endoftext|>"  # the text the reference puts in front when its loader says prepend_bos=False

# What each ``bos=`` rule puts in front of the prompt text (see :func:`bos_prefix`).
BOS_RULES = {
    "reference": "the literal <|endoftext|> when the tokenizer has it as one token (the reference's "
    "prepend_bos=False families: GPT-2, GPT-J, NeoX, OLMo, Qwen2, Phi-3); else the 'tokenizer' rule",
    "tokenizer": "the tokenizer's BOS text when it has a BOS token but does not add it itself, else nothing "
    "(soteria's earlier rule)",
    "none": "nothing (the tokenizer still adds what it adds itself)",
}

# soteria's choices where it differs from the reference on purpose (README, "Prompts").
PROMPT_RULES = {
    "shuffle": "derangement: every corrupted label leaves its position and corrupted != clean",
    "queries": "the whole held-out 30% split in a seeded shuffle, each query once before any repeats",
    "demonstrations": "n_shots distinct pairs of the 70% train split, at least two different outputs",
}


@dataclass
class ProbePrompts:
    """Prompts of ``n`` trials, aligned by index.

    ``clean[i]``/``corrupted[i]``: full prompt strings (BOS text included where the tokenizer
    does not add one itself; encode them with the tokenizer's usual special tokens).
    ``answers[i]``: ``" " + output`` of the query. ``target_ids[i]``: first token id of that
    answer after the prompt. ``queries[i]``: the query input. ``demonstrations[i]``: the
    ``(input, output)`` demonstrations with true labels; ``corrupted_labels[i]``: the labels
    shown in the corrupted prompt. ``prefix``: the text in front of every prompt, from the rule
    ``bos`` (:func:`bos_prefix`). ``dropped``: held-out queries skipped because their answer
    gave no token.
    """

    clean: list[str]
    corrupted: list[str]
    answers: list[str]
    target_ids: list[int]
    queries: list[str] = field(default_factory=list)
    demonstrations: list[list[tuple[str, str]]] = field(default_factory=list)
    corrupted_labels: list[list[str]] = field(default_factory=list)
    prefix: str = ""
    bos: str = "reference"
    n_shots: int = 0
    seed: int = 0
    dropped: list[str] = field(default_factory=list)

    def __post_init__(self):
        n = len(self.clean)
        sizes = {"corrupted": len(self.corrupted), "answers": len(self.answers), "target_ids": len(self.target_ids)}
        for name in ("queries", "demonstrations", "corrupted_labels"):
            if getattr(self, name):
                sizes[name] = len(getattr(self, name))
        bad = {k: v for k, v in sizes.items() if v != n}
        if bad:
            raise ValueError(f"ProbePrompts: {len(self.clean)} clean prompts but lengths {bad}")

    def __len__(self) -> int:
        return len(self.clean)


def format_prompt(demonstrations: Sequence[tuple[str, str]], query: str, *, prefix: str = "") -> str:
    """``prefix + "Q: x1\\nA: y1\\n\\n" ... + "Q: xq\\nA:"``."""
    shots = "".join(f"Q: {x}\nA: {y}\n\n" for x, y in demonstrations)
    return f"{prefix}{shots}Q: {query}\nA:"


def split_pairs(pairs: Sequence[Any], *, train_frac: float = 0.7, seed: int = 0) -> tuple[list, list]:
    """Seeded ``(train, test)`` split: ``round(n * train_frac)`` pairs (at least 1, at most
    ``n - 1``) go to train. Same ``pairs`` order and seed -> same split."""
    pairs = list(pairs)
    if not 0.0 < float(train_frac) < 1.0:
        raise ValueError(f"train_frac must be in (0, 1), got {train_frac!r}")
    if len(pairs) < 2:
        raise ValueError(f"need at least 2 pairs to split into train and test, got {len(pairs)}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_train = min(max(round(len(pairs) * train_frac), 1), len(pairs) - 1)
    return [pairs[i] for i in order[:n_train]], [pairs[i] for i in order[n_train:]]


def _ids(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _single_token(tokenizer, text: str) -> int | None:
    """The id ``text`` encodes to when it is exactly one token (special tokens not split), else None."""
    ids = _ids(tokenizer, text, add_special_tokens=False)
    return int(ids[0]) if len(ids) == 1 else None


def check_bos(bos: Any) -> str:
    """``bos`` when it names a rule of :data:`BOS_RULES`, else ValueError."""
    if not isinstance(bos, str) or bos not in BOS_RULES:
        raise ValueError(f"bos must be one of {', '.join(map(repr, BOS_RULES))}, got {bos!r}")
    return bos


def bos_prefix(tokenizer, bos: str = "reference") -> str:
    """The text put in front of each prompt under the rule ``bos`` (:data:`BOS_RULES`).

    ``"tokenizer"``: the BOS token's text when the tokenizer has a ``bos_token`` but does not
    add it itself when encoding (GPT-2: ``"<|endoftext|>"``; a Phi-3 style ``<s>`` that is not
    added), else ``""`` (it adds one itself, like Llama and Gemma, or has none, like Qwen2).

    ``"reference"``: ``"<|endoftext|>"`` whenever that text is a single token of the tokenizer,
    whatever it adds itself: the reference (``load_gpt_model_and_tokenizer``,
    ``word_pairs_to_prompt_data(prepend_bos_token=not prepend_bos)``) prepends this literal for
    every family it loads with ``prepend_bos=False`` (GPT-2, GPT-J, NeoX/Pythia, OLMo; Qwen and
    Phi in Soteria's fork), and all of those have it; the families it loads with
    ``prepend_bos=True`` (Llama, Gemma) do not, and add their own BOS. A tokenizer without it
    (a family the reference never loaded) gets the ``"tokenizer"`` rule rather than the
    literal split into pieces.

    ``"none"``: ``""``.
    """
    check_bos(bos)
    if bos == "none":
        return ""
    if bos == "reference" and _single_token(tokenizer, REFERENCE_BOS) is not None:
        return REFERENCE_BOS
    bos_text, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if not bos_text or bos_id is None:
        return ""
    encoded = _ids(tokenizer, "Q: a")
    if encoded and encoded[0] == bos_id:
        return ""
    # Only prefix text that the tokenizer maps back to the BOS id (special tokens not split).
    return bos_text if _single_token(tokenizer, bos_text) == bos_id else ""


def prompt_settings(bos: str = "reference", prefix: str | None = None) -> dict[str, Any]:
    """How prompts are made, for a result's ``settings``: the BOS rule (and the text it gave,
    when known) and :data:`PROMPT_RULES`."""
    out: dict[str, Any] = {"bos": check_bos(bos)}
    if prefix is not None:
        out["bos_text"] = prefix
    return {**out, **PROMPT_RULES}


def first_answer_token(tokenizer, prompt: str, answer: str) -> int | None:
    """First token id of ``answer`` after ``prompt``: tokenise both ``prompt`` and
    ``prompt + answer`` (usual special tokens) and take the first id that differs or is new;
    None when the answer adds no token."""
    without, with_ = _ids(tokenizer, prompt), _ids(tokenizer, prompt + answer)
    for a, b in zip(without, with_):
        if a != b:
            return int(b)
    return int(with_[len(without)]) if len(with_) > len(without) else None


def _shuffle_labels(labels: list[str], rng: random.Random) -> list[str]:
    """``labels`` permuted by a random derangement (no label keeps its position) whose result
    differs from ``labels``. Impossible (returned unchanged) for fewer than 2 labels or when all
    labels are equal; with repeated labels a derangement can reproduce the sequence, so such
    draws are rejected (fallback: rotate by one, a derangement that always changes it)."""
    n = len(labels)
    if n < 2 or len(set(labels)) < 2:
        return list(labels)
    for _ in range(_MAX_SHUFFLES):
        perm = list(range(n))
        rng.shuffle(perm)
        if any(p == i for i, p in enumerate(perm)):
            continue
        out = [labels[p] for p in perm]
        if out != labels:
            return out
    return labels[1:] + labels[:1]  # pragma: no cover - probability ~ 0.63**100


def build_prompts(
    pairs: Any,
    tokenizer,
    *,
    n_shots: int = 10,
    n_trials: int = 25,
    seed: int = 0,
    train_frac: float = 0.7,
    bos: str = "reference",
) -> ProbePrompts:
    """``n_trials`` clean/corrupted prompt pairs from ``pairs`` (anything :func:`load_pairs` reads).

    Per trial: ``n_shots`` distinct demonstrations drawn from the train split of
    :func:`split_pairs`; the query is the next held-out pair in a seeded shuffle of the test
    split (each used once before any repeats). With ``n_shots >= 2`` the demonstrations always
    hold at least two different outputs (if a draw has one, its last demonstration is swapped
    for a train pair with another output) so the corrupted labels (see :func:`_shuffle_labels`)
    always differ from the clean ones; with ``n_shots < 2`` corrupted equals clean. A query
    whose answer gives no token is dropped and the next one drawn; ValueError when none remain.
    Everything is drawn from ``random.Random`` seeded by ``seed``: same inputs -> same prompts.
    ``bos``: what goes in front of the prompt text (:func:`bos_prefix`; ``"tokenizer"`` is
    soteria's earlier rule); it changes no draw.
    """
    for name, value, low in (("n_shots", n_shots, 0), ("n_trials", n_trials, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    check_bos(bos)
    pairs = load_pairs(pairs)
    train, test = split_pairs(pairs, train_frac=train_frac, seed=seed)
    if n_shots > len(train):
        raise ValueError(
            f"n_shots={n_shots} needs at least {n_shots} training pairs; the {train_frac:.0%} train split "
            f"of {len(pairs)} pairs has {len(train)}. Use fewer shots or more pairs."
        )
    if n_shots >= 2 and len({p["output"] for p in train}) < 2:
        raise ValueError(
            "all training pairs have the same output, so shuffled (corrupted) labels would equal the clean ones"
        )

    prefix = bos_prefix(tokenizer, bos)
    rng = random.Random(f"soteria.build_prompts:{seed}")
    out = ProbePrompts([], [], [], [], prefix=prefix, bos=bos, n_shots=n_shots, seed=seed)
    bad: set[int] = set()
    order: list[int] = []
    for _ in range(n_trials):
        demos = rng.sample(train, n_shots)
        if n_shots >= 2 and len({p["output"] for p in demos}) < 2:
            others = [p for p in train if p["output"] != demos[0]["output"]]
            demos[-1] = rng.choice(others)
        labels = [p["output"] for p in demos]
        corrupted_labels = _shuffle_labels(labels, rng)
        while True:
            if not order:
                order = [i for i in range(len(test)) if i not in bad]
                if not order:
                    raise ValueError(
                        f"no held-out query has an answer that tokenises to at least one token "
                        f"({len(bad)} dropped: {sorted(out.dropped)[:5]}...)"
                    )
                rng.shuffle(order)
            qi = order.pop()
            query = test[qi]
            clean = format_prompt([(p["input"], p["output"]) for p in demos], query["input"], prefix=prefix)
            answer = " " + query["output"]
            target = first_answer_token(tokenizer, clean, answer)
            if target is not None:
                break
            bad.add(qi)
            out.dropped.append(query["input"])
        corrupted = format_prompt(
            [(p["input"], y) for p, y in zip(demos, corrupted_labels)], query["input"], prefix=prefix
        )
        out.clean.append(clean)
        out.corrupted.append(corrupted)
        out.answers.append(answer)
        out.target_ids.append(target)
        out.queries.append(query["input"])
        out.demonstrations.append([(p["input"], p["output"]) for p in demos])
        out.corrupted_labels.append(corrupted_labels)
    return out


def token_ids(row: Any, where: str) -> list[int]:
    """A prompt given as token ids (a list/tuple of ints or a 1-D integer tensor) as a list of ints;
    ValueError naming ``where`` (e.g. ``"prompt 3"``) unless every id is an int >= 0 and there is one."""
    if isinstance(row, torch.Tensor):
        if row.dim() != 1 or row.dtype.is_floating_point or row.dtype.is_complex or row.dtype == torch.bool:
            raise ValueError(
                f"{where}: a token-id tensor must be 1-D with an integer dtype, got {row.dim()}-D {row.dtype}"
            )
        ids = [int(v) for v in row.tolist()]
    elif isinstance(row, (list, tuple)):
        ids = []
        for j, v in enumerate(row):
            try:
                if isinstance(v, bool):
                    raise TypeError
                ids.append(operator.index(v))
            except TypeError:
                raise ValueError(f"{where}, position {j}: expected an int token id, got {v!r}") from None
    else:
        raise ValueError(f"{where}: expected a string or a sequence of token ids, got {type(row).__name__}")
    if not ids:
        raise ValueError(f"{where} is an empty token-id list")
    if any(v < 0 for v in ids):
        raise ValueError(f"{where}: negative token id {min(ids)}")
    return ids


def prompt_list(prompts: Any, what: str = "prompts") -> list[str | list[int]]:
    """``prompts`` as a non-empty list of strings and token-id lists (:func:`token_ids`); a single
    prompt (a string, a 1-D tensor) is refused with a message naming ``what``."""
    if isinstance(prompts, (str, bytes)) or (isinstance(prompts, torch.Tensor) and prompts.dim() < 2):
        raise ValueError(f"{what} must be a list of prompts; wrap a single prompt in a list")
    try:
        out = list(prompts)
    except TypeError:
        raise ValueError(f"{what} must be a list of prompts, got {type(prompts).__name__}") from None
    if not out:
        raise ValueError(f"{what} is empty")
    return [p if isinstance(p, str) else token_ids(p, f"{what}[{i}]") for i, p in enumerate(out)]


def encode_batch(
    tokenizer,
    prompts: Sequence[Any],
    *,
    padding_side: str = "right",
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad a batch of prompts into ``(input_ids [B, T] long, attention_mask [B, T] long, last_index [B] long)``.

    ``prompts``: all strings (tokenised with the tokenizer's usual special tokens) or all
    token-id sequences (lists/tuples of ints or 1-D integer tensors, used exactly as given).
    Pads on ``padding_side`` with the pad token (eos when there is none). ``last_index[i]`` is
    the position of row i's last real token. The tokenizer is not modified. With left padding,
    pass ``position_ids=position_ids(attention_mask)`` to the model: a plain HF forward of some
    families (GPT-2) numbers positions from 0 including the padding, which changes absolute
    position embeddings (rotary models are unaffected by the shift).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    is_str = [isinstance(p, str) for p in prompts] if isinstance(prompts, (list, tuple)) else []
    if any(is_str) and not all(is_str):
        i, j = is_str.index(True), is_str.index(False)
        raise ValueError(f"prompts mix strings (e.g. prompt {i}) and token ids (e.g. prompt {j}); pass one kind")
    prompts = prompt_list(prompts)
    if all(isinstance(p, str) for p in prompts):
        rows = [list(r) for r in tokenizer(prompts, add_special_tokens=True)["input_ids"]]
    else:
        rows = prompts
    empty = [i for i, r in enumerate(rows) if not r]
    if empty:
        raise ValueError(f"prompt(s) {empty} have no tokens")

    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None)
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with; set tokenizer.pad_token")

    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    last_index = torch.empty(len(rows), dtype=torch.long)
    for i, row in enumerate(rows):
        start = 0 if padding_side == "right" else width - len(row)
        input_ids[i, start : start + len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, start : start + len(row)] = 1
        last_index[i] = start + len(row) - 1
    if device is not None:
        input_ids, attention_mask, last_index = (t.to(device) for t in (input_ids, attention_mask, last_index))
    return input_ids, attention_mask, last_index


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions ``[B, T]`` counting real tokens only (0 at each row's first real token; pads 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
