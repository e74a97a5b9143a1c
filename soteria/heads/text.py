"""Step 1 from plain text: rank a language's heads by attribution on its language-modelling loss.

The probe scorer (:mod:`.search`) needs in-context tasks in the language. This one needs only
sentences in it: a file, a list of strings, or the built-in ones (``soteria/data/text/<lang>.txt``,
about a hundred short, harmless sentences for each of the paper's twelve languages).

For head ``h`` of layer ``l`` (o_proj input ``z^l_h``, ``[B, T, D]`` slice of ``[B, T, H*D]``)
and the summed next-token loss ``NLL`` of the sentences:

    score(l, h) = (1 / N) * sum_{real positions t} (b^l_h - z^l_h[t]) . dNLL/dz^l_h[t]

the first-order (attribution patching) estimate of how much the mean loss per predicted token
(``N`` of them) rises when the head's output is replaced by ``b`` at every position: ``b`` is
the head's mean output over every real token of the text (``method="atp"``, default: a mean
ablation) or zero (``method="grad_x_act"``: plain gradient x activation, negated). Higher =
the model leans on the head more to read the language.

Two passes over the sentences (batches of similar length): forward passes for the means, then
one forward and one backward pass per batch, in which every layer's ``[B*T, H*D]`` activations
and gradients (the model's dtype, bf16 on a GPU; padded rows zeroed in the gradient) go through
the fused kernel :func:`soteria_kernels.head_attribution` with ``sum_rows=True``, so only
``[H]`` per layer and batch leaves it. Hooks, input checks and model-state handling are :mod:`.attribution`'s.
Results are cached like :func:`~soteria.heads.search.find_heads`'s, keyed by the weights'
fingerprint and the token ids fed.

What it finds: the heads the model leans on to model the language's text. On
Qwen2.5-Coder-0.5B-Instruct (``python -m benchmarks.text_heads``) these are mostly the same
heads for es, fr and de and share no more with the probe-task heads than random sets do, so
they are a fallback for languages without probe data, not a stand-in for the probe scorer.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import soteria_kernels

from ..io.jsonl import json_lines
from ..langs import lang_list, shipped_codes
from ..models.state import frozen_eval, input_device
from ..progress import progress_bar
from ..version import __version__
from .attribution import _one_logit, _pre_hooks, _projection_input, _refuse_prompt_learning, _sites
from .cache import cache_dir, cache_key, model_fingerprint
from .prompts import encode_batch
from .scores import HeadScores, model_name

__all__ = [
    "DEFAULT_TEXT_BATCH",
    "MAX_TOKENS",
    "TEXT_METHODS",
    "check_text_args",
    "load_text",
    "text_head_scores",
    "text_languages",
    "text_sources",
]

TEXT_METHODS = ("atp", "grad_x_act")  # baseline: the head's mean output over the text, or zero
DEFAULT_TEXT_BATCH = 16  # sentences per pass
MAX_TOKENS = 128  # each sentence is cut to this many tokens
_TEXT_DIR = ("data", "text")


# --------------------------------------------------------------------------- the sentences


def _text_dir():
    root = resources.files("soteria")
    for part in _TEXT_DIR:
        root = root.joinpath(part)
    return root


@functools.lru_cache(maxsize=1)
def _shipped() -> tuple[str, ...]:
    return shipped_codes(_text_dir(), ".txt")


def text_languages() -> list[str]:
    """Language codes with built-in sentences (the paper's order first)."""
    return list(_shipped())


def _lines(raw: str) -> list[str]:
    return [line.strip() for line in raw.splitlines() if line.strip()]


def _read_file(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    raw = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl":
        return _lines(raw)
    out = []
    for n, row in json_lines(raw.splitlines(), str(path)):
        row = row.get("text") if isinstance(row, dict) else row
        if not isinstance(row, str):
            raise ValueError(f'{path}:{n}: expected a JSON string or an object with a "text" string')
        out.append(row.strip())
    return [s for s in out if s]


def load_text(lang: str, text: Any = None, *, max_sentences: int | None = None) -> tuple[list[str], str]:
    """``(sentences, where)`` for ``lang``: ``text`` as given, else the built-in sentences.

    ``text``: None (built-in), a path (``str`` or ``Path``) to a ``.txt`` file (one sentence per
    line) or a ``.jsonl`` file (JSON strings or ``{"text": ...}`` objects), or a list of strings.
    Blank entries are dropped; ``max_sentences`` keeps the first that many. ValueError (one line)
    for an unknown language without ``text``, empty text or non-string entries.
    """
    if not isinstance(lang, str):
        raise ValueError(f"lang must be one language code, got {lang!r}")
    lang = lang_list(lang)[0]
    if max_sentences is not None and (isinstance(max_sentences, bool) or int(max_sentences) != max_sentences
                                      or max_sentences < 1):  # fmt: skip
        raise ValueError(f"max_sentences must be a positive int or None, got {max_sentences!r}")
    if text is None:
        if lang not in _shipped():
            raise ValueError(f"no built-in sentences for {lang!r} (built-in: {' '.join(_shipped())}); pass text= "
                             "a .txt file (one sentence a line) or a list of strings in the language")  # fmt: skip
        sentences, where = _lines(_text_dir().joinpath(f"{lang}.txt").read_text(encoding="utf-8")), f"built-in:{lang}"
    elif isinstance(text, (str, Path)):
        path = Path(text).expanduser()
        if isinstance(text, str) and "\n" in text:
            raise ValueError("text= as a str is a file path; pass sentences as a list of strings")
        sentences, where = _read_file(path), f"file:{path.name}"
    else:
        if isinstance(text, dict):  # its keys would pass for sentences
            raise ValueError("text must be None, a file path or a list of strings, got dict")
        try:
            rows = list(text)
        except TypeError:
            what = type(text).__name__
            raise ValueError(f"text must be None, a file path or a list of strings, got {what}") from None
        bad = [i for i, s in enumerate(rows) if not isinstance(s, str)]
        if bad:
            raise ValueError(f"text[{bad[0]}] is a {type(rows[bad[0]]).__name__}, not a string")
        sentences, where = [s.strip() for s in rows if s.strip()], "list"
    if not sentences:
        raise ValueError(f"the text for {lang!r} ({where}) has no sentences")
    return sentences[: max_sentences or len(sentences)], where


def _token_rows(tokenizer, sentences: list[str], max_length: int) -> list[list[int]]:
    """Token ids (the tokenizer's usual special tokens, cut to ``max_length``); rows of fewer
    than two tokens predict nothing and are dropped (ValueError when none is left)."""
    rows = [list(r)[:max_length] for r in tokenizer(sentences, add_special_tokens=True)["input_ids"]]
    rows = [[int(t) for t in r] for r in rows if len(r) >= 2]
    if not rows:
        raise ValueError("no sentence has the two tokens a next-token loss needs")
    return rows


def _digest(rows: list[list[int]]) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(torch.tensor(row, dtype=torch.int64).numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()


# --------------------------------------------------------------------------- the two passes


def _batches(rows: list[list[int]], size: int):
    """Longest first (little padding), ``size`` rows at a time."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    for a in range(0, len(order), size):
        yield [rows[i] for i in order[a : a + size]]


def _means(model, tokenizer, rows, sites, bs, bar) -> list[torch.Tensor]:
    """``[H*D]`` per layer: each o_proj input's mean over every real token (fp32, fp64 for fp64 models)."""
    sums: list[torch.Tensor | None] = [None] * len(sites)
    device, state = input_device(model), {}

    def make_hook(layer, site):
        def hook(module, args, kwargs):
            z = _projection_input(args, kwargs, site, state["B"])
            m = state["mask"].to(z.device, torch.promote_types(z.dtype, torch.float32))
            s = torch.einsum("bt,btc->c", m, z.to(m.dtype))
            sums[layer] = s if sums[layer] is None else sums[layer] + s

        return hook

    with frozen_eval(model, grad=False), _pre_hooks(sites, make_hook):
        for batch in _batches(rows, bs):
            ids, mask, _ = encode_batch(tokenizer, batch, padding_side="right")
            state.update(B=len(batch), mask=mask)
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **_one_logit(model))
            bar.update(0.25 * len(batch))
    if any(s is None for s in sums):
        raise RuntimeError("an output projection was never called during the forward pass")
    n = sum(len(r) for r in rows)
    return [s / n for s in sums]


def _nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed next-token loss over real positions (fp32 softmax; padding ignored)."""
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100).to(logits.device)
    sel = logits[:, :-1].float() if logits.dtype != torch.float64 else logits[:, :-1]
    return F.cross_entropy(sel.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")


def _scores(model, tokenizer, rows, sites, means, bs, baseline: bool, bar) -> torch.Tensor:
    """float64 ``[L, H]``: ``sum_t (b - z) . dNLL/dz`` over every real position of every row."""
    L, H = len(sites), sites[0].num_heads
    out = torch.zeros(L, H, dtype=torch.float64)
    device, state = input_device(model), {}

    def make_hook(layer, site):
        def hook(module, args, kwargs):
            z = _projection_input(args, kwargs, site, state["B"])
            if state["deltas"][layer] is not None:
                raise RuntimeError(f"{site.name} was called twice in one forward pass")
            # A zero leaf in the model's dtype: its gradient is dNLL/dz, and z stays in the graph
            # so the gradient also flows through the layers above.
            delta = torch.zeros_like(z, requires_grad=True)
            state["deltas"][layer], state["acts"][layer] = delta, z.detach()
            return (z + delta, *args[1:]), kwargs

        return hook

    with frozen_eval(model, grad=True), _pre_hooks(sites, make_hook):
        for batch in _batches(rows, bs):
            ids, mask, _ = encode_batch(tokenizer, batch, padding_side="right")
            state.update(B=len(batch), deltas=[None] * L, acts=[None] * L)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            if any(d is None for d in state["deltas"]):
                raise RuntimeError("an output projection was never called during the forward pass")
            grads = torch.autograd.grad(_nll(logits, ids, mask), state["deltas"], allow_unused=True)
            del logits
            for layer, (act, g) in enumerate(zip(state["acts"], grads)):
                if g is None:  # this layer cannot reach the loss
                    continue
                width = act.shape[-1]
                g = g.reshape(-1, width).mul_(mask.view(-1, 1).to(g.device, g.dtype))  # padded rows: no score
                s = soteria_kernels.head_attribution(
                    act.reshape(-1, width), g, num_heads=H, sum_rows=True,
                    baseline=means[layer].to(act.device, torch.float32) if baseline else None,
                )  # fmt: skip
                out[layer] += (s if baseline else -s).double().cpu()
            state.update(deltas=None, acts=None)
            del grads
            bar.update(0.75 * len(batch))
    return out


# --------------------------------------------------------------------------- the scorer


def text_head_scores(
    model: nn.Module,
    tokenizer,
    lang: str,
    *,
    text: Any = None,
    method: str = "atp",
    max_sentences: int | None = None,
    max_length: int = MAX_TOKENS,
    batch_size: int | None = None,
    cache: bool = True,
    progress: bool = True,
) -> HeadScores:
    """Score every head of ``model`` by attribution on the language-modelling loss of text in ``lang``.

    Args:
        text: None (the built-in sentences of ``lang``), a ``.txt`` / ``.jsonl`` file or a list of
            strings (:func:`load_text`). A few hundred sentences are plenty.
        method: ``"atp"`` (default: against each head's mean output over the text) or
            ``"grad_x_act"`` (against zero).
        max_sentences: use only the first that many sentences.
        max_length: tokens kept of each sentence (special tokens included).
        batch_size: sentences per pass (default :data:`DEFAULT_TEXT_BATCH`).
        cache: read/write ``$SOTERIA_CACHE_DIR/heads/<key>.json`` (key: the weights' fingerprint,
            the token ids, ``lang``, ``method``, ``max_length``, the soteria version).
        progress: a bar over sentences (hidden when stderr is not a terminal).

    Returns:
        :class:`HeadScores` with float32 ``[L, H]`` scores: the estimated rise in mean loss per
        predicted token (nats) when each head is replaced by its baseline; ``settings`` record
        ``source="text"``, the sentences, tokens and predicted tokens used.
    """
    if method not in TEXT_METHODS:
        raise ValueError(f"method must be one of {TEXT_METHODS} for text scores, got {method!r}")
    for name, v in (("max_length", max_length), ("batch_size", batch_size)):
        if v is not None and (isinstance(v, bool) or int(v) != v or v < (2 if name == "max_length" else 1)):
            raise ValueError(f"{name} must be a positive int{' >= 2' if name == 'max_length' else ''}, got {v!r}")
    lang = lang_list(lang)[0]
    sentences, where = load_text(lang, text, max_sentences=max_sentences)
    rows = _token_rows(tokenizer, sentences, int(max_length))
    _refuse_prompt_learning(model)
    sites = _sites(model)
    if cache and any(site.weight.device.type == "meta" for site in sites):
        warnings.warn("find_heads: output projections are offloaded (meta); not using the cache", stacklevel=3)
        cache = False
    n_tokens = sum(len(r) for r in rows)
    settings = {
        "source": "text",
        "text": where,
        "n_sentences": len(rows),
        "n_tokens": n_tokens,
        "n_predicted": n_tokens - len(rows),
        "max_length": int(max_length),
        "baseline": "mean" if method == "atp" else "zero",
        "normalised": "mean over predicted tokens",
        "model_fingerprint": model_fingerprint(model),
        "soteria_version": __version__,
    }
    path = None
    if cache:
        # The tokens fed, not where they came from, key the entry.
        parts = {k: v for k, v in settings.items() if k != "text"}
        key = cache_key({"kind": "text_head_scores", "lang": lang, "method": method, "tokens": _digest(rows), **parts})
        path = cache_dir() / "heads" / f"{key}.json"
        if path.is_file():
            try:
                hit = HeadScores.load(path)
            except ValueError:
                pass  # unreadable cache entry: recompute and overwrite it
            else:
                hit.settings["text"] = where
                return hit
    bs = int(batch_size or DEFAULT_TEXT_BATCH)
    with torch.inference_mode(False), progress_bar(total=len(rows), desc=f"find_heads {lang} (text, {method})",
                                                   unit="sentence", enabled=progress) as bar:  # fmt: skip
        means = _means(model, tokenizer, rows, sites, bs, bar) if method == "atp" else None
        total = _scores(model, tokenizer, rows, sites, means, bs, method == "atp", bar)
    result = HeadScores(scores=(total / settings["n_predicted"]).float(), model_name=model_name(model), lang=lang,
                        method=method, settings=settings)  # fmt: skip
    if path is not None:
        result.save(path)
    return result


def check_text_args(tasks: Any, n_shots: int, n_trials: Any, stop_k: Any, distributed: Any, bos: Any,
                    tasks_by_lang: Any = None, means: Any = "paired") -> None:  # fmt: skip
    """ValueError when a probe-only argument of :func:`find_heads` is given with ``source="text"``
    (the sentences are tokenised with the tokenizer's usual special tokens)."""
    given = [name for name, v, default in (("tasks", tasks, None), ("n_shots", n_shots, 10),
             ("n_trials", n_trials, "auto"), ("stop_k", stop_k, None), ("bos", bos, "reference"),
             ("tasks_by_lang", tasks_by_lang, None), ("means", means, "paired")) if v != default]  # fmt: skip
    if distributed:
        given.append("distributed")
    if given:
        raise ValueError(f"{', '.join(given)} apply to source='probes' only; source='text' takes text=, max_sentences=")


def text_sources(langs: list[str], text: Any, max_sentences: int | None, method: str) -> dict[str, Any]:
    """``{lang: text}`` for :func:`text_head_scores`, every language's text read and checked
    (:func:`load_text`) first. ``text``: None (built-in), one language's text (one language
    only), or ``{lang: text}`` (languages it leaves out: built-in)."""
    if method not in TEXT_METHODS:
        raise ValueError(f"method must be one of {TEXT_METHODS} for text scores, got {method!r}")
    if isinstance(text, dict):
        extra = [str(x) for x in text if x not in langs]
        if extra:
            raise ValueError(f"text names {', '.join(extra)}, which langs does not ({' '.join(langs)})")
        sources = {lang: text.get(lang) for lang in langs}
    elif text is not None and len(langs) > 1:
        raise ValueError(f"text= is one language's sentences; for {len(langs)} languages pass {{lang: text}}")
    else:
        sources = {lang: text for lang in langs}
    for lang, t in sources.items():
        load_text(lang, t, max_sentences=max_sentences)
    return sources
