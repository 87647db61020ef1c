"""Greedy generation through a quantized KV cache, next to the float cache: where the texts part, how much agrees.

Each prompt is continued greedily (``do_sample=False``) for exactly ``max_new_tokens`` tokens (``min_new_tokens``
equal to it, so an end-of-text token cannot stop one run early and leave the two of different lengths), once with
transformers' float ``DynamicCache`` and once per cache. Per (prompt, cache):

* ``first_divergence``: the index (0-based, among the new tokens) of the first token that differs from the float
  run's, or ``None`` when all agree;
* ``agreement``: the fraction of the new tokens equal to the float run's at the same position. After a divergence
  the two texts usually drift apart, so this counts re-alignments only by chance.

>>> compare_generations(model, tokenizer, PROMPTS, {"kivi2": KIVI(2, 32, 32)})   # doctest: +SKIP
"""
from __future__ import annotations

import pandas as pd
import torch

PROMPTS = (
    "The Roman Empire was",
    "In 1905, Albert Einstein published",
    "The recipe for a simple bread needs flour, water,",
    "Photosynthesis is the process by which",
)


def _cache(spec, config):
    """A fresh cache from a method config (qlab's QuantizedKVCache), None (float) or a callable(config)."""
    from transformers import DynamicCache

    from qlab.methods.kv.cache import STORES, QuantizedKVCache

    if spec is None:
        return DynamicCache()
    if type(spec) in STORES:
        return QuantizedKVCache(spec, config)
    if callable(spec):
        return spec(config)
    raise ValueError(f"a cache is given as a method config ({', '.join(c.__name__ for c in STORES)}), None (the "
                     f"float cache) or a callable(config) returning a Cache; got {spec!r}")


def first_divergence(a: torch.Tensor, b: torch.Tensor) -> int | None:
    """Index of the first position where the 1-D token tensors ``a`` and ``b`` differ; None if none does.

    >>> first_divergence(torch.tensor([5, 6, 7]), torch.tensor([5, 6, 9]))
    2
    """
    if a.shape != b.shape:
        raise ValueError(f"compare continuations of equal length, got {tuple(a.shape)} and {tuple(b.shape)}")
    differ = (a != b).nonzero()
    return int(differ[0, 0]) if len(differ) else None


@torch.no_grad()
def greedy(model, ids: torch.Tensor, cache, max_new_tokens: int) -> torch.Tensor:
    """The ``max_new_tokens`` greedy continuation [max_new_tokens] of ``ids`` [1, L] through ``cache``."""
    mask = torch.ones_like(ids)
    out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=max_new_tokens,
                         min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:]


def compare_generations(model, tokenizer, prompts, caches: dict, max_new_tokens: int = 48) -> pd.DataFrame:
    """One row per (prompt, cache): first divergent token, agreement with the float run, and the texts.

    ``prompts`` are strings (with a ``tokenizer``) or token-id tensors [1, L]; ``caches`` maps a label to a
    method config, None or a callable(config) returning a fresh cache (see :func:`_cache`). The float run is
    the row labelled 'float' (first divergence None, agreement 1).
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    rows = []
    for p, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token ids [1, L] otherwise")
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        else:
            ids = prompt
        reference = greedy(model, ids, _cache(None, model.config), max_new_tokens)
        for label, spec in {"float": None, **caches}.items():
            new = reference if label == "float" else greedy(model, ids, _cache(spec, model.config), max_new_tokens)
            rows.append({"prompt": p, "method": label, "first_divergence": first_divergence(new, reference),
                         "agreement": float((new == reference).float().mean()), "tokens": new.tolist(),
                         "text": tokenizer.decode(new) if tokenizer is not None else None})
    return pd.DataFrame(rows)


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per cache: mean agreement, and the earliest and median first divergence (None counted as the full
    length: the whole continuation agreed)."""
    n = df["tokens"].map(len)
    first = df["first_divergence"].astype("Float64").fillna(n.astype("Float64"))
    out = pd.DataFrame({"method": df["method"], "agreement": df["agreement"], "first": first})
    return out.groupby("method", sort=False).agg(agreement=("agreement", "mean"), earliest=("first", "min"),
                                                 median_first=("first", "median"))
