"""Benchmark: BitNet b1.58 trained from scratch against float, at three tiny sizes (issue 13).

    python -m qlab.benchmarks.bitnet                  # sizes S, M, L x {float, b1.58}; results/bitnet/*.json
    python -m qlab.benchmarks.bitnet --sizes S --steps 20 --out /tmp/bitnet

The paper (Ma et al. 2024, "The Era of 1-bit LLMs", Table 1, WikiText-2 perplexity of LLaMA-shaped models
trained on 100B tokens) finds b1.58 behind float at 700M (12.87 vs 12.33) and 1.3B (11.29 vs 11.25) and
ahead at 3B (9.91 vs 10.04). Here the models have 0.1-3M parameters and see a few hundred thousand tokens:
three to four orders of magnitude smaller in both, so this shows the direction of the gap at the small end,
not where it closes.

Models: Llama-shaped (``transformers.LlamaForCausalLM``: RMSNorm, SwiGLU, rotary attention), tied
input/output embedding. A 49,152-token embedding would dwarf a 1M-parameter model, so the vocabulary is the
``VOCAB - 1`` most frequent SmolLM2 tokens of the training articles plus one ``<unk>`` id for all others
(:class:`TopVocab`; at 2,048 ids, 24% of the held-out tokens are ``<unk>``, and perplexity counts them as
tokens, so it is not comparable with a full-vocabulary perplexity, only between the two arms). The b1.58
arm replaces every Linear of the blocks by :class:`qlab.methods.train.BitLinear` (embedding and head stay
float, as in the paper); the float arm has the same architecture without the quantizers and without the
extra RMSNorm of each BitLinear.

Data: WikiText-2 test split by article (``qlab.models.data.split_documents``, seed 1): 8 articles held
out, the other 54 for training (:func:`article_split`). Both arms get the same windows in the same order,
the same steps, learning rate and schedule (linear warm-up, cosine decay), the same seed.

Each finished (size, arm) row is a JSON file in ``--out``; training checkpoints go to ``--runs`` (a rerun
after a kill continues). A row also holds the trained ternary layers run through the ternary kernel
(``qlab.kernels.ternary``; the largest output difference from the BitLinear), the bytes of the ternary
weights at 2 bits and at 5 trits per byte, and the same float model ternarized after training (absmean
post-training quantization, no retraining) for comparison.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from qlab.core.atomic import write_json
from qlab.methods.train import BitLinear, bitnet_model, pack_trits, train, unpack_trits
from qlab.models import REPO_ROOT
from qlab.models.data import load_wikitext2, split_documents, token_windows, tokenize

VOCAB = 2048
PAPER = {  # Table 1 of the b1.58 paper: size -> (float LLaMA ppl, b1.58 ppl) on WikiText-2
    700e6: (12.33, 12.87),
    1.3e9: (11.25, 11.29),
    3e9: (10.04, 9.91),
}
SIZES = {"S": (64, 2), "M": (128, 3), "L": (256, 3)}  # name -> (hidden, layers)


# ---- data ------------------------------------------------------------------------------------------------
def article_split(n_heldout: int = 8, seed: int = 1):
    """(training text, held-out text, a sentence saying which articles): WikiText-2 test by whole article."""
    split = split_documents(load_wikitext2(), n_heldout, seed)
    text = (f"WikiText-2 test by article (seed {seed}): {len(split.evaluation_docs)} articles "
            f"({len(split.evaluation):,} chars) train, {len(split.calibration_docs)} articles "
            f"{list(split.calibration_docs)} ({len(split.calibration):,} chars) held out")
    return split.evaluation, split.calibration, text


class TopVocab:
    """The ``size - 1`` most frequent token ids of ``tokens`` get ids 0..size-2 (most frequent first);
    every other id maps to ``size - 1`` (``<unk>``).

    >>> v = TopVocab(torch.tensor([7, 7, 7, 3, 3, 9]), 3)
    >>> v(torch.tensor([7, 3, 9, 5])).tolist()
    [0, 1, 2, 2]
    """

    def __init__(self, tokens: torch.Tensor, size: int):
        if size < 2:
            raise ValueError(f"a vocabulary needs at least 2 ids (one for <unk>), got size={size}")
        common = [t for t, _ in Counter(tokens.tolist()).most_common(size - 1)]
        self.size, self.unk = size, size - 1
        self.table = torch.full((int(tokens.max()) + 1,), self.unk, dtype=torch.long)
        self.table[torch.tensor(common, dtype=torch.long)] = torch.arange(len(common))

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        inside = tokens < len(self.table)
        out = torch.full_like(tokens, self.unk)
        out[inside] = self.table[tokens[inside]]
        return out


def data(tokenizer, seq_len: int = 128, vocab: int = VOCAB):
    """(training windows, held-out windows, unk fraction of the held-out tokens, split sentence)."""
    train_text, heldout_text, split = article_split()
    train_ids = tokenize(tokenizer, train_text)
    top = TopVocab(train_ids, vocab)
    heldout = top(tokenize(tokenizer, heldout_text))
    unk = float((heldout == top.unk).float().mean())
    return token_windows(top(train_ids), seq_len), token_windows(heldout, seq_len), unk, split


# ---- models ----------------------------------------------------------------------------------------------
def tiny_llama(vocab: int, hidden: int, layers: int, seed: int = 0):
    """A Llama-shaped model: heads of 32 dimensions (a third of them for keys/values), SwiGLU 8/3 x hidden
    (rounded to 64, so that groups of 64 divide every row), tied embedding; seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, hidden // 32)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64 * round(8 * hidden / 3 / 64),
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 3),
                         max_position_embeddings=1024, tie_word_embeddings=True, rope_theta=10000.0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def block_params(model) -> int:
    """Parameters outside the embedding/head (the paper's sizes count everything; at 1M parameters the
    embedding would dominate, so the plot's x axis is this)."""
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)


@dataclass(frozen=True)
class BitNetRun:
    size: str
    arm: str  # "float" or "b1.58"
    steps: int = 200
    batch: int = 8
    seq_len: int = 128
    lr: float = 2e-3
    warmup: int = 20
    vocab: int = VOCAB
    seed: int = 0

    @property
    def name(self) -> str:
        return f"{self.size}-{self.arm}"


def build(run: BitNetRun):
    if run.arm not in ("float", "b1.58"):
        raise ValueError(f"arm must be 'float' or 'b1.58', got {run.arm!r}")
    if run.size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {run.size!r}")
    model = tiny_llama(run.vocab, *SIZES[run.size], seed=run.seed)
    return bitnet_model(model) if run.arm == "b1.58" else model


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())


@torch.no_grad()
def heldout_ppl(model, windows: torch.Tensor, batch: int = 16) -> float:
    """exp(mean next-token NLL) over the held-out windows (each window independent, as qlab.eval)."""
    model.eval()
    nll = [lm_loss(model, windows[i:i + batch]) * len(windows[i:i + batch]) for i in range(0, len(windows), batch)]
    return float(torch.exp(torch.stack(nll).sum() / len(windows)))


# ---- the ternary layers after training -------------------------------------------------------------------
def ternary_ptq(model):
    """A copy of a float model with every block Linear replaced by its absmean ternary weight (gamma * T),
    no retraining, activations float: post-training quantization to b1.58's grid."""
    import copy

    from qlab.core.quant import fake_quant

    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in model.named_modules():
            if type(m) is torch.nn.Linear and name.startswith("model.layers."):
                m.weight.copy_(fake_quant(m.weight, "ternary"))
    return model


@torch.no_grad()
def kernel_check(model, x_tokens: torch.Tensor, backend: str = "torch") -> float:
    """Run every BitLinear's quantized input through the ternary kernel and return the largest
    |kernel - BitLinear| relative to max |BitLinear output| (fp32 rounding only: the kernel multiplies by
    gamma after the sum, the layer before)."""
    from qlab.core.quant import fake_quant
    from qlab.kernels.ternary import TernaryWeight, ternary_matmul
    from qlab.methods.train.bitnet import ACT_SPEC

    worst = 0.0
    inputs = {}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, BitLinear)}
    def keep(name):
        return lambda module, args, y: inputs.__setitem__(name, (args[0], y))

    hooks = [m.register_forward_hook(keep(n)) for n, m in layers.items()]
    try:
        model(input_ids=x_tokens, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    for n, layer in layers.items():
        x, y = inputs[n]
        x_q = fake_quant(layer.norm(x), ACT_SPEC)
        y_kernel = ternary_matmul(x_q, TernaryWeight.from_quantized(layer.quantized_weight()), backend=backend)
        worst = max(worst, float((y_kernel - y).abs().max() / y.abs().max()))
    return worst


def ternary_bytes(model) -> dict:
    """Bytes of the BitLinear weights at 2 bits per weight and at 5 trits per byte (1.6 bits), after checking
    that every layer's trits unpack to themselves."""
    n = two_bit = five_trit = 0
    for m in model.modules():
        if isinstance(m, BitLinear):
            T = m.quantized_weight().values().to(torch.int64)
            packed = pack_trits(T)
            if not torch.equal(unpack_trits(packed, T.numel()), T.reshape(-1)):
                raise AssertionError("5-trit packing did not round-trip")
            n += T.numel()
            two_bit += -(-T.numel() // 4)
            five_trit += packed.numel()
    return {"ternary_weights": n, "bytes_2bit": two_bit, "bytes_5trit": five_trit}


# ---- a run -----------------------------------------------------------------------------------------------
def run_one(run: BitNetRun, train_windows, heldout, folder=None, progress: bool = True, every: int = 50) -> dict:
    """Train one (size, arm) on ``train_windows`` (batches in order, wrapping), evaluate on ``heldout``."""
    model = build(run)
    g = torch.Generator().manual_seed(run.seed)
    order = torch.randperm(len(train_windows), generator=g)  # one shuffle, shared by both arms

    def loss_at(m, step):
        idx = order[[(step * run.batch + i) % len(order) for i in range(run.batch)]]
        return lm_loss(m, train_windows[idx])

    t0 = time.perf_counter()
    log = train(model, loss_at, {**asdict(run), "data": list(train_windows.shape)}, run.steps, run.lr, folder=folder,
                every=every, seed=run.seed, weight_decay=0.05, warmup=run.warmup, cosine=True, progress=progress)
    seconds = time.perf_counter() - t0
    row = {"name": run.name, "run": asdict(run), "block_params": block_params(model),
           "params": sum(p.numel() for p in model.parameters()), "ppl": heldout_ppl(model, heldout),
           "losses": log.losses, "train_seconds": seconds, "resumed_from": log.resumed_from}
    if run.arm == "float":
        row["ppl_ternary_ptq"] = heldout_ppl(ternary_ptq(model), heldout)
    else:
        row.update(kernel_rel_diff=kernel_check(model, heldout[:2]), **ternary_bytes(model))
    return row


def run_all(runs: list[BitNetRun], tokenizer, out_dir, runs_dir=None, progress: bool = True) -> list[dict]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for r in runs:  # a stored row of other settings is never passed off as this run's
        path = out_dir / f"{r.name}.json"
        if path.exists() and json.loads(path.read_text())["run"] != asdict(r):
            raise ValueError(f"{path} holds a run with other settings; delete it or pass another --out")
    todo = [r for r in runs if not (out_dir / f"{r.name}.json").exists()]
    if todo:
        cache = {}
        for run in todo:
            key = (run.seq_len, run.vocab)
            if key not in cache:
                cache[key] = data(tokenizer, run.seq_len, run.vocab)
            train_w, heldout, unk, split = cache[key]
            folder = None if runs_dir is None else Path(runs_dir) / run.name
            row = run_one(run, train_w, heldout, folder, progress)
            row.update(split=split, heldout_unk=unk, train_windows=len(train_w), heldout_windows=len(heldout))
            write_json(out_dir / f"{run.name}.json", row)
    return [json.loads((out_dir / f"{r.name}.json").read_text()) for r in runs]


def table(rows: list[dict]):
    """One line per size: block parameters, float and b1.58 held-out perplexity, their ratio, and the float
    model ternarized after training."""
    import pandas as pd

    by = {(r["run"]["size"], r["run"]["arm"]): r for r in rows}
    out = []
    for size in dict.fromkeys(r["run"]["size"] for r in rows):
        f, b = by.get((size, "float")), by.get((size, "b1.58"))
        if f and b:
            out.append({"size": size, "block_params": f["block_params"], "ppl_float": f["ppl"], "ppl_b158": b["ppl"],
                        "ratio": b["ppl"] / f["ppl"], "ppl_float_ternary_ptq": f["ppl_ternary_ptq"]})
    return pd.DataFrame(out)


def plot_scaling(rows: list[dict], ax=None):
    """Held-out perplexity ratio b1.58 / float against block parameters: these runs and the paper's Table 1."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 4))
    t = table(rows)
    ax.plot(t.block_params, t.ratio, "o-", label="qlab: tiny Llamas, WikiText-2 articles")
    for x, y, s in zip(t.block_params, t.ratio, t["size"]):
        ax.annotate(f"{s}: {100 * (y - 1):+.0f}%", (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    sizes = list(PAPER)
    ax.plot(sizes, [PAPER[s][1] / PAPER[s][0] for s in sizes], "s--", label="paper, Table 1 (100B tokens)")
    gaps = "\n".join(f"{s / 1e9:g}B: {100 * (PAPER[s][1] / PAPER[s][0] - 1):+.1f}%" for s in sizes)
    ax.text(2e8, 1.05, f"paper:\n{gaps}", fontsize=8, va="bottom", color="C1")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlim(3e4, 2e10)
    ax.margins(y=0.12)
    ax.set_xlabel("parameters (qlab: without embedding; paper: all)")
    ax.set_ylabel("perplexity b1.58 / float")
    ax.set_title("BitNet b1.58 vs float: the gap against model size")
    ax.legend(fontsize=8)
    return ax


def smoke_rows(steps: int = 2) -> list[dict]:
    """Both arms of size S for ``steps`` steps on random tokens of a 64-id vocabulary (notebook 13's smoke mode:
    checks that everything runs, not the numbers)."""
    g = torch.Generator().manual_seed(0)
    train_windows, heldout = torch.randint(0, 64, (16, 32), generator=g), torch.randint(0, 64, (4, 32), generator=g)
    return [run_one(BitNetRun("S", arm, steps=steps, batch=4, seq_len=32, warmup=1, vocab=64), train_windows, heldout,
                    progress=False) for arm in ("float", "b1.58")]


def main(argv=None):
    p = argparse.ArgumentParser(description="BitNet b1.58 vs float at tiny sizes (issue 13)")
    p.add_argument("--sizes", default=",".join(SIZES))
    p.add_argument("--steps", type=int, default=BitNetRun.steps)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(REPO_ROOT / "results" / "bitnet"))
    p.add_argument("--runs", default=str(REPO_ROOT / "runs" / "bitnet"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from qlab.models import load_model

    _, tokenizer = load_model()  # only its tokenizer is used
    runs = [BitNetRun(s, arm, steps=args.steps) for s in args.sizes.split(",") for arm in ("float", "b1.58")]
    rows = run_all(runs, tokenizer, args.out, args.runs)
    print(rows[0]["split"])
    print(table(rows).to_string(index=False))


if __name__ == "__main__":
    main()
