"""Quantized KV caches on long contexts: perplexity, KL and top-1 through a chunked prefill, transformers' own
quantized cache beside qlab's.

    python -m qlab.benchmarks.kv_cache                       # contexts 512 and 2048, 8 windows, every method
    python -m qlab.benchmarks.kv_cache --contexts 2048 --methods float,fp8-token,kivi2-r32
    python -m qlab.benchmarks.kv_cache --smoke                # 2 windows of 128 tokens, qlab's methods only

Protocol. Windows of ``context`` tokens, evenly spread over the evaluation articles of WikiText-2 (no BOS), are
fed ``chunk`` tokens at a time (default 128) through a fresh cache per window and method. A position attends to
the earlier chunks *through the cache* (so it reads back quantized keys and values, apart from a method's own
float window) and to its own chunk exactly; every position but the last is scored. The reference is the same
chunked pass through transformers' float ``DynamicCache`` (equal to one full forward pass). Per row: perplexity
(exp of the mean NLL over all scored positions of all windows), mean KL(float || cached) over the vocabulary,
top-1 agreement with the float model, and the cache's bytes at the end of a window as bits per key/value entry:
``bits_quantized`` (codes + scales + outliers + factors over the entries they stand for) and ``bits_held`` (all
bytes, the fp32 float window included, over all entries; the float cache holds 32).

The peer rows are transformers' ``QuantizedCache``: backend 'quanto' at 2 and 4 bits with its defaults (keys and
values per token, groups of 64 channels, a float window of 128 tokens that is re-quantized with everything when
it fills) and backend 'fp8' (one E4M3 scale per tensor, frozen at the first chunk). Results are written per
(method, context, window) atomically under ``--results``, so a killed run resumes where it stopped; the table
is printed and written as ``table.csv`` beside them.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
import time

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qlab.core.atomic import write_json
from qlab.eval.metrics import CHUNK as CHUNK_SCORED
from qlab.methods.kv.cache import FP8, GEAR, KIVI, QuantizedKVCache, calibrate_fp8, chunked_logits

DEFAULT_RESULTS = Path("results/kv_cache")
CONTEXTS = (512, 2048)
CHUNK = 128

# GEAR at about 3 bits: 2-bit Q in groups of 64 with fp16 statistics (2.5 bits), 1% outliers (0.32 bits),
# rank 2 per block (0.75 bits for the 128-token blocks a chunk of 128 flushes, at head dim 64).
_GEAR = dict(bits=2, group_size=64, residual=64, outlier_ratio=0.01, rank=2, scale_dtype="fp16")
METHODS = {
    "float": None,
    "fp8-token": FP8(),
    "fp8-tensor": "calibrated",  # static per-layer scales from one calibration window (calibrate_fp8)
    "kivi4-r32": KIVI(4, 32, 32), "kivi4-r128": KIVI(4, 32, 128),
    "kivi2-r32": KIVI(2, 32, 32), "kivi2-r128": KIVI(2, 32, 128),
    "ktoken2-r32": KIVI(2, 32, 32, keys="token"),  # the per-token-key baseline KIVI argues against
    "gear2-Q": GEAR(**_GEAR, use_sparse=False, use_lowrank=False),
    "gear2-Q+L": GEAR(**_GEAR, use_sparse=False),
    "gear2-Q+S": GEAR(**_GEAR, use_lowrank=False),
    "gear2-Q+L+S": GEAR(**_GEAR),
}
PEERS = {"hf-quanto4": ("quanto", 4), "hf-quanto2": ("quanto", 2), "hf-fp8": ("fp8", None)}
SMOKE_METHODS = ("float", "fp8-token", "fp8-tensor", "kivi2-r32", "ktoken2-r32", "gear2-Q+L+S")


def peer_cache(label: str, config):
    """transformers' ``QuantizedCache`` for a peer row ('hf-quanto4', 'hf-quanto2', 'hf-fp8')."""
    from transformers import QuantizedCache

    backend, nbits = PEERS[label]
    return QuantizedCache(backend, config) if nbits is None else QuantizedCache(backend, config, nbits=nbits)


def _storage(t) -> list:
    """The plain tensors behind ``t`` (a tensor, a quanto tensor subclass, a tuple of them)."""
    if t is None:
        return []
    if isinstance(t, (tuple, list)):
        return [x for part in t for x in _storage(part)]
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [x for name in names for x in _storage(getattr(t, name))]
    return [t] if isinstance(t, torch.Tensor) else []


def peer_footprint(cache) -> dict:
    """Bytes held by a transformers quantized cache: its quantized states (every inner tensor) + the float window."""
    total = float_bytes = float_values = 0
    for layer in cache.layers:
        quantized = _storage(layer._quantized_keys) + _storage(layer._quantized_values)
        window = [t for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor) and t.numel()]
        if isinstance(layer._quantized_keys, tuple):  # fp8: (codes, scale); keys/values are not held
            window = []
        total += sum(t.untyped_storage().nbytes() for t in quantized + window)
        float_bytes += sum(t.untyped_storage().nbytes() for t in window)
        float_values += sum(t.numel() for t in window)
    return {"bytes": total, "float_bytes": float_bytes, "float_values": float_values}


def _footprint(cache, config, tokens: int, batch: int = 1) -> dict:
    if isinstance(cache, QuantizedKVCache):
        return cache.footprint()
    text = config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    values = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * tokens * batch
    if hasattr(cache.layers[0], "_quantized_keys"):
        out = peer_footprint(cache)
    else:  # the float DynamicCache
        held = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        out = {"bytes": sum(t.untyped_storage().nbytes() for t in held), "float_bytes": 0, "float_values": 0}
    out["values"] = values
    out["bits_held"] = 8 * out["bytes"] / values
    q_values = values - out["float_values"]
    out["bits_quantized"] = 8 * (out["bytes"] - out["float_bytes"]) / q_values if q_values else float("nan")
    return out


def make_cache(label: str, model, fp8_tensor: FP8 | None = None):
    """A fresh cache for one window: qlab's ``QuantizedKVCache``, the float ``DynamicCache`` or a peer's."""
    from transformers import DynamicCache

    if label in PEERS:
        return peer_cache(label, model.config)
    if label not in METHODS:
        raise ValueError(f"unknown method {label!r}; known: {', '.join([*METHODS, *PEERS])}")
    method = METHODS[label]
    if method is None:
        return DynamicCache()
    if method == "calibrated":
        if fp8_tensor is None:
            raise ValueError("'fp8-tensor' needs calibrated static scales: pass fp8_tensor=calibrate_fp8(...)")
        method = fp8_tensor
    return QuantizedKVCache(method, model.config)


def describe(label: str, fp8_tensor: FP8 | None = None) -> str:
    """The configuration a result file belongs to (a changed method invalidates its files)."""
    if label in PEERS:
        backend, nbits = PEERS[label]
        return f"transformers QuantizedCache({backend!r}" + (f", nbits={nbits})" if nbits else ")")
    m = METHODS[label]
    return "DynamicCache" if m is None else repr(fp8_tensor if m == "calibrated" else m)


def _read_json(path: Path, want: dict) -> dict | None:
    """A stored row if it exists, parses, and was computed for this configuration (``want``)."""
    try:
        row = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return row if all(row.get(k) == v for k, v in want.items()) else None


@torch.no_grad()
def score_window(model, window: torch.Tensor, cache, chunk: int, reference: dict | None) -> dict:
    """NLL, KL(reference || this) and top-1 agreement of one window [T] fed ``chunk`` tokens at a time.

    ``reference`` is the float row's result (its ``logprobs`` [T-1, V] and ``top1``). The scores are taken
    ``metrics.CHUNK`` positions at a time, so the temporaries stay in cache; every score is per position, so the
    numbers are those of whole-window tensors. The window's log-probs overwrite its logits as they are scored."""
    logprobs = chunked_logits(model, window[None], cache, chunk)[0, :-1].float()
    n = logprobs.shape[0]
    nll, kl, top1 = torch.empty(n), torch.empty(n), torch.empty(n, dtype=torch.long)
    for s in range(0, n, CHUNK_SCORED):
        part = slice(s, s + CHUNK_SCORED)
        if not torch.isfinite(logprobs[part]).all():
            raise ValueError("the model produced NaN/Inf logits through the cache")
        logq = logprobs[part] = F.log_softmax(logprobs[part], dim=-1)
        nll[part] = -logq.gather(-1, window[1:][part, None])[:, 0]
        top1[part] = logq.argmax(-1)
        if reference is not None:
            lp = reference["logprobs"][part]
            kl[part] = (lp.exp() * (lp - logq)).sum(-1)
    out = {"nll_sum": float(nll.sum()), "n": n, "logprobs": logprobs, "top1": top1}
    if reference is not None:
        out["kl_sum"] = float(kl.sum())
        out["top1_sum"] = int((top1 == reference["top1"]).sum())
    return out


def run(model, windows: dict, labels, results: str | Path = DEFAULT_RESULTS, chunk: int = CHUNK,
        calibration: torch.Tensor | None = None, progress: bool = True) -> pd.DataFrame:
    """Score every method in ``labels`` on ``windows`` ({context: ids [n, context]}), resuming from ``results``.

    ``calibration`` (token ids [1, L]) calibrates 'fp8-tensor'. Returns one row per (method, context).
    """
    unknown = [x for x in labels if x not in METHODS and x not in PEERS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join([*METHODS, *PEERS])}")
    max_len = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    for ctx, w in windows.items():
        if not isinstance(w, torch.Tensor) or w.ndim != 2 or w.shape[1] != ctx:
            raise ValueError(f"windows[{ctx}] must be token ids [n, {ctx}], got "
                             f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
        if max_len is not None and ctx > max_len:
            raise ValueError(f"context {ctx} exceeds the model's maximum of {max_len} (max_position_embeddings)")
    fp8_tensor = None
    if "fp8-tensor" in labels:
        if calibration is None:
            raise ValueError("'fp8-tensor' needs calibration ids (token ids [1, L]) for its static scales")
        fp8_tensor = calibrate_fp8(model, calibration)
    results = Path(results)
    labels = ["float"] + [x for x in labels if x != "float"]  # the reference is computed first in any case

    def path(label, ctx, i):
        return results / f"ctx{ctx}" / label.replace("+", "_") / f"w{i}.json"

    def want(label, ctx, i, w):
        return {"config": describe(label, fp8_tensor), "chunk": chunk, "context": ctx, "window": i,
                "window_checksum": int((w * torch.arange(1, w.numel() + 1)).sum())}

    todo = [(ctx, i, label) for ctx, w in windows.items() for i in range(w.shape[0]) for label in labels
            if _read_json(path(label, ctx, i), want(label, ctx, i, w[i])) is None]
    bar = tqdm(total=len(todo), desc="kv cache", disable=not progress)
    for ctx, w in windows.items():
        for i in range(w.shape[0]):
            pending = [x for x in labels if (ctx, i, x) in set(todo)]
            if not pending:
                continue
            reference = None
            for label in labels:  # 'float' first: its log-probs are every other row's reference
                if label not in pending and label != "float":
                    continue
                if label != "float" and _read_json(path(label, ctx, i), want(label, ctx, i, w[i])) is not None:
                    bar.update()  # written meanwhile by another run on the same folder
                    continue
                bar.set_postfix_str(f"{label} @ {ctx}, window {i}")
                cache = make_cache(label, model, fp8_tensor)
                t0, c0 = time.perf_counter(), time.process_time()
                scored = score_window(model, w[i], cache, chunk, reference)
                seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
                if label == "float":
                    reference = scored
                    scored.update(kl_sum=0.0, top1_sum=scored["n"])
                if label in pending:
                    row = {**want(label, ctx, i, w[i]), "label": label, "seconds": seconds, "cpu_seconds": cpu_seconds,
                           **{k: v for k, v in scored.items() if k not in ("logprobs", "top1")},
                           **_footprint(cache, model.config, ctx)}
                    write_json(path(label, ctx, i), row)
                    bar.update()
    bar.close()
    return table(results, labels, windows.keys())


def table(results: str | Path = DEFAULT_RESULTS, labels=None, contexts=None) -> pd.DataFrame:
    """One row per (method, context) from the per-window files under ``results``, complete or not (``windows``
    says how many each row has). ``delta_ppl_pct`` compares with the float cache on the *same* windows."""
    files = {}
    for path in Path(results).glob("ctx*/*/w*.json"):
        p = json.loads(path.read_text())
        if (labels is None or p["label"] in labels) and (contexts is None or p["context"] in contexts):
            files.setdefault((p["label"], p["context"]), {})[p["window"]] = p

    def ppl(parts):
        return math.exp(sum(p["nll_sum"] for p in parts) / sum(p["n"] for p in parts))

    rows = []
    for (label, ctx), by_window in files.items():
        parts = [by_window[i] for i in sorted(by_window)]
        n = sum(p["n"] for p in parts)
        ref = files.get(("float", ctx), {})
        matched = [ref[i] for i in sorted(by_window) if i in ref]
        rows.append({"method": label, "context": ctx, "windows": len(parts), "ppl": ppl(parts),
                     "delta_ppl_pct": 100 * (ppl(parts) / ppl(matched) - 1) if len(matched) == len(parts)
                     else float("nan"),
                     "kl": sum(p["kl_sum"] for p in parts) / n,
                     "top1": sum(p["top1_sum"] for p in parts) / n,
                     "bits_quantized": sum(p["bits_quantized"] for p in parts) / len(parts),
                     "bits_held": sum(p["bits_held"] for p in parts) / len(parts),
                     "seconds": sum(p["seconds"] for p in parts),  # wall; cpu_seconds: this process's CPU time
                     "cpu_seconds": sum(p.get("cpu_seconds", float("nan")) for p in parts),
                     "window_nll": [p["nll_sum"] / p["n"] for p in parts]})
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    order = {m: k for k, m in enumerate([*METHODS, *PEERS])}
    return df.sort_values(["context", "method"], key=lambda c: c.map(order) if c.name == "method" else c,
                          ignore_index=True)


def inputs(tokenizer, contexts=CONTEXTS, n_windows: int = 8) -> tuple[dict, torch.Tensor]:
    """The long-context table's inputs: ({context: n_windows evaluation windows spread over the evaluation
    articles}, one calibration window of 512 tokens for the static scales of 'fp8-tensor'). Notebook 12 and
    ``main`` take them from here, so their rows are the same files."""
    from qlab.models.data import wikitext2_windows

    windows = {c: wikitext2_windows(tokenizer, "evaluation", c, n_windows, pick="spread") for c in contexts}
    return windows, wikitext2_windows(tokenizer, "calibration", 512, 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join([*METHODS, *PEERS]))
    p.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--chunk", type=int, default=CHUNK)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="2 windows of 128 tokens, qlab's methods only")
    p.add_argument("--results", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from qlab.models.loading import load_model

    if args.smoke:
        args.methods, args.contexts, args.windows, args.chunk = ",".join(SMOKE_METHODS), "128", 2, 32
    results = Path(args.results or (DEFAULT_RESULTS / "smoke" if args.smoke else DEFAULT_RESULTS))
    model, tokenizer = load_model()
    contexts = [int(c) for c in args.contexts.split(",")]
    windows, calibration = inputs(tokenizer, contexts, args.windows)
    t0 = time.perf_counter()
    df = run(model, windows, args.methods.split(","), results, args.chunk, calibration)
    print(f"chunk {args.chunk}, {args.windows} windows per context; wall {time.perf_counter() - t0:.0f} s this run")
    cols = ["method", "context", "windows", "bits_quantized", "bits_held", "ppl", "delta_ppl_pct", "kl", "top1",
            "seconds"]
    print(df[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    df.drop(columns=["window_nll"]).to_csv(results / "table.csv", index=False)


if __name__ == "__main__":
    main()
