"""Benchmark: qlab's post-training quantizers side by side with independent implementations (issue 4).

Same model (the embedded SmolLM2-135M, whose weights already sit on a Q4_1 grid: see qlab.models), same
calibration windows, same evaluation windows, same evaluation (``qlab.eval``: perplexity, KL to the float
model, top-1 agreement). The peers run in their own virtual environment (``make ptq-peers``, by default
``../peers/ptq`` beside the repository) through ``qlab/benchmarks/peer_ptq.py``, which imports only the
peer library; they hand back de-quantized weights, loaded here into a copy of the model.

    python -m qlab.benchmarks.peers --job quality     # GPTQ W4 g64 sym, 32 x 512 calibration; NF4; HQQ
    python -m qlab.benchmarks.peers --job timing      # GPTQ W4 g128 asym, 128 x 512: wall and CPU time
    python -m qlab.benchmarks.peers --job all --threads 1 --out runs/peers

Grids differ in small ways, named in the ``spec`` column: qlab's ``int4-g64`` is the restricted
symmetric grid [-7, 7] with scale = max|w| / 7; ``int4-g64-full`` uses [-8, 7] with the same scale (the
-8 is used only by the rounding of the GPTQ-updated weights); llm-compressor's symmetric int4 is
[-8, 7] with scale = max|w| / 7.5. llm-compressor also fixes each group's scale on the original weights
before the GPTQ sweep, where qlab (like the GPTQ reference code) picks it when the sweep reaches the
group, on the updated weights. Scales: qlab stores fp16 by default (``-sfp32``: fp32), the peers fp32.

Each row is cached as JSON under ``--out`` (rerun with ``--force`` to redo it); the table is printed at
the end. Wall seconds suffer from other work on a shared machine; CPU seconds (user + system of the
process doing the quantization) do not, and are reported next to them with the thread count.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from qlab.models.walker import quantize_model, weight_only
from qlab.models.data import wikitext2_windows
from qlab.eval import evaluate, reference_logprobs
from qlab.models import EMBEDDED, REPO_ROOT, cache_dir, linear_layers, load_model
from qlab.core.quant import fake_quant

PEER_SCRIPT = Path(__file__).with_name("peer_ptq.py")
DEFAULT_PEER = Path(os.environ.get("QLAB_PTQ_PEER", REPO_ROOT.parent / "peers" / "ptq"))
BLOCK_PREFIX = "model.layers."


# ---- windows -------------------------------------------------------------------------------------
def windows(tokenizer, n_calib: int, n_eval: int = 16, seq_len: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration, evaluation) windows exactly as notebook 08 and qlab.benchmarks.gptq take them:
    enough calibration articles for the windows, windows spread evenly over each part."""
    n_articles = max(8, n_calib * seq_len // 2500)
    calib = wikitext2_windows(tokenizer, "calibration", seq_len, n_calib, n_calibration=n_articles, pick="spread")
    evals = wikitext2_windows(tokenizer, "evaluation", seq_len, n_eval, n_calibration=n_articles, pick="spread")
    return calib, evals


# ---- peer weights into the model -----------------------------------------------------------------
def block_linear_names(model) -> list[str]:
    return [n for n in linear_layers(model) if n.startswith(BLOCK_PREFIX)]


def load_peer_weights(model, weights: dict, inplace: bool = False):
    """A copy of ``model`` (or ``model`` itself) with every block Linear's weight replaced by
    ``weights[name]``. The names must be exactly the block linears (each one quantized, nothing else
    touched) and the shapes must match; anything else is a ValueError, never a silent partial load."""
    layers = linear_layers(model)
    expected, given = set(block_linear_names(model)), set(weights)
    if given != expected:
        missing, extra = sorted(expected - given), sorted(given - expected)
        raise ValueError(f"peer weights do not match the block linears: missing {missing[:3]}"
                         f"{'...' if len(missing) > 3 else ''} ({len(missing)}), unexpected {extra[:3]}"
                         f"{'...' if len(extra) > 3 else ''} ({len(extra)})")
    if not inplace:
        model = copy.deepcopy(model)
        layers = linear_layers(model)
    for name, w in weights.items():
        old = layers[name].weight
        if tuple(w.shape) != tuple(old.shape):
            raise ValueError(f"{name}: peer weight has shape {tuple(w.shape)}, the model {tuple(old.shape)}")
        layers[name].weight = torch.nn.Parameter(w.to(old.dtype), requires_grad=False)
    return model


def weight_difference(weights: dict, model, spec) -> dict:
    """Max |peer - qlab fake_quant(W, spec)| over all block linears, and how many elements differ."""
    layers = linear_layers(model)
    max_abs, n_diff, n = 0.0, 0, 0
    for name, w_peer in weights.items():
        ours = fake_quant(layers[name].weight.detach().float(), spec)
        d = (w_peer.float() - ours).abs()
        max_abs, n_diff, n = max(max_abs, d.max().item()), n_diff + int((d > 0).sum()), n + d.numel()
    return {"spec": str(spec), "max_abs_diff": max_abs, "n_differ": n_diff, "n_weights": n}


# ---- the peer subprocess -------------------------------------------------------------------------
@dataclass
class PeerRun:
    """One call of peer_ptq.py: which venv, which method, which grid."""

    python: Path
    method: str
    bits: int = 4
    group_size: int = 64
    sym: bool = True
    extra_env: dict = field(default_factory=dict)

    def run(self, model_dir: Path, calib: torch.Tensor | None, threads: int) -> tuple[dict, dict]:
        """Run the peer; return ({name: de-quantized weight}, its result.json)."""
        from safetensors.torch import load_file

        if not Path(self.python).exists():
            raise ValueError(f"peer interpreter {self.python} is missing: build it with `make ptq-peers`")
        with tempfile.TemporaryDirectory(prefix="qlab-peer-") as tmp:
            cmd = [str(self.python), str(PEER_SCRIPT), "--model", str(model_dir), "--method", self.method,
                   "--bits", str(self.bits), "--group-size", str(self.group_size),
                   "--sym" if self.sym else "--no-sym", "--threads", str(threads), "--out", tmp]
            if calib is not None:
                torch.save(calib.contiguous(), Path(tmp) / "calib.pt")
                cmd += ["--calib", str(Path(tmp) / "calib.pt")]
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                       TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", **self.extra_env)
            env.pop("PYTHONPATH", None)  # the peer must not see qlab
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"peer {self.method} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            result = json.loads((Path(tmp) / "result.json").read_text())
            weights = load_file(Path(tmp) / "weights.safetensors")
        return weights, result


# Bits per weight of what each peer would store: 4-bit codes + per-group scale (+ zero point), at the
# widths the peer keeps them in (llm-compressor: scales in the model dtype, fp16 for a half model, int8
# zero points stored packed to 4 bits in its pack-quantized format; bnb: fp32 absmax; HQQ: scale and
# zero in the compute dtype, fp16).
def peer_bits_per_weight(method: str, bits: int, group_size: int, sym: bool) -> float | None:
    per_group = {"llmcompressor-gptq": 16 + (0 if sym else bits), "gptqmodel-gptq": 16 + bits,
                 "bnb-nf4": 32, "hqq": 32}.get(method)
    return None if per_group is None else bits + per_group / group_size


# ---- the rows ------------------------------------------------------------------------------------
@dataclass
class Context:
    model: torch.nn.Module
    model_dir: Path
    evals: torch.Tensor
    reference: object
    threads: int
    peer_python: Path
    gptqmodel_python: Path | None
    out: Path
    force: bool
    calib: torch.Tensor

    def score(self, model) -> dict:
        r = evaluate(model, self.evals, self.reference, progress=False)
        return {"ppl": r["ppl"], "kl_mean": r["kl_mean"], "top1": r["top1"]}


def qlab_rtn(ctx: Context, spec: str) -> dict:
    c0, t0 = time.process_time(), time.perf_counter()
    model, size = quantize_model(ctx.model, weight_only(spec))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return dict(implementation="qlab", method="RTN", spec=spec, bpw=size.quantized_bpw,
                seconds=seconds, cpu_seconds=cpu, **ctx.score(model))


def qlab_gptq(ctx: Context, spec: str) -> dict:
    c0, t0 = time.process_time(), time.perf_counter()
    model, size = quantize_model(ctx.model, weight_only(f"gptq:{spec}"), ctx.calib)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    bpw = size.quantized_bpw
    return dict(implementation="qlab", method="GPTQ", spec=spec, calib=len(ctx.calib), bpw=bpw,
                seconds=seconds, cpu_seconds=cpu, **ctx.score(model))


def peer(ctx: Context, method: str, bits: int, group_size: int, sym: bool, label: str,
         calibrated: bool = False, compare: tuple = ()) -> dict:
    python = ctx.gptqmodel_python if method == "gptqmodel-gptq" else ctx.peer_python
    if python is None:
        raise ValueError(f"{method}: no interpreter given")
    # GPTQModel's thread pool needs >= 2 CPU workers (it raises with 1); torch still gets ctx.threads
    env = {"GPTQMODEL_CPU_WORKERS": str(max(2, ctx.threads))} if method == "gptqmodel-gptq" else {}
    run = PeerRun(Path(python), method, bits, group_size, sym, env)
    calib = ctx.calib if calibrated else None
    weights, result = run.run(ctx.model_dir, calib, ctx.threads)
    row = dict(implementation=method.split("-")[0] + " " + _main_version(result), method=label,
               spec=f"int{bits}-g{group_size}-{'sym' if sym else 'asym'}" if method != "bnb-nf4"
               else f"nf4-b{group_size}", calib=None if calib is None else len(calib), bpw=peer_bits_per_weight(method, bits, group_size, sym),
               seconds=result["seconds"], cpu_seconds=result["cpu_seconds"], peer=result)
    for spec in compare:
        row.setdefault("weight_check", []).append(weight_difference(weights, ctx.model, spec))
    row.update(ctx.score(load_peer_weights(ctx.model, weights)))
    return row


def _main_version(result: dict) -> str:
    versions = [v for k, v in result["versions"].items() if k not in ("torch", "transformers", "compressed_tensors")]
    return versions[0] if versions else ""


# job: (calibration windows, [(row key, function, keyword arguments)]). ``quality``: the comparison of
# issue 4 at W4 g64 sym with 32 calibration windows, plus round-to-nearest formats; ``timing``: the GPTQ
# 4-bit g128 job with 128 windows, asymmetric (min-max) on both sides. Each job takes its evaluation
# windows from the articles its calibration windows leave out (as qlab.benchmarks.gptq does), so the
# two jobs' perplexities are on different windows: compare rows within a job.
GPTQ = "GPTQ"
JOBS = {
    "quality": (32, [
        ("qlab-rtn-int4-g64", qlab_rtn, dict(spec="int4-g64")),
        ("qlab-rtn-int4-g64-full", qlab_rtn, dict(spec="int4-g64-full")),
        ("qlab-gptq-int4-g64", qlab_gptq, dict(spec="int4-g64")),
        ("qlab-gptq-int4-g64-full", qlab_gptq, dict(spec="int4-g64-full")),
        ("qlab-gptq-int4-g64-full-sfp32", qlab_gptq, dict(spec="int4-g64-full-sfp32")),
        ("llmcompressor-gptq-w4g64sym", peer, dict(method="llmcompressor-gptq", bits=4, group_size=64, sym=True,
                                                   label=GPTQ, calibrated=True)),
        ("gptqmodel-gptq-w4g64sym", peer, dict(method="gptqmodel-gptq", bits=4, group_size=64, sym=True,
                                               label=GPTQ, calibrated=True)),
        ("qlab-rtn-nf4", qlab_rtn, dict(spec="nf4")),
        ("qlab-rtn-nf4-sfp32", qlab_rtn, dict(spec="nf4-sfp32")),
        ("bnb-nf4-b64", peer, dict(method="bnb-nf4", bits=4, group_size=64, sym=True, label="RTN",
                                   compare=("nf4", "nf4-sfp32"))),
        ("qlab-rtn-int4-g64-asym", qlab_rtn, dict(spec="int4-g64-asym-minmax")),
        ("qlab-rtn-int4-g64-asym-mse", qlab_rtn, dict(spec="int4-g64-asym-mse")),
        ("hqq-w4g64", peer, dict(method="hqq", bits=4, group_size=64, sym=False, label="HQQ")),
    ]),
    # llm-compressor 0.14 refuses g128 here (576 columns are 4.5 groups; its observer cannot take a
    # shorter last group), so the same job also runs at g64, which both take
    "timing": (128, [
        ("qlab-gptq-int4-g128-asym", qlab_gptq, dict(spec="int4-g128-asym-minmax")),
        ("llmcompressor-gptq-w4g128asym", peer, dict(method="llmcompressor-gptq", bits=4, group_size=128,
                                                     sym=False, label=GPTQ, calibrated=True)),
        ("llmcompressor-gptq-w4g64asym", peer, dict(method="llmcompressor-gptq", bits=4, group_size=64,
                                                    sym=False, label=GPTQ, calibrated=True)),
        ("qlab-gptq-int4-g64-asym", qlab_gptq, dict(spec="int4-g64-asym-minmax")),
    ]),
}


def run_job(ctx: Context, job: str, rows: list, only: set | None = None) -> list[dict]:
    """The float row, then each row of the job (from its JSON under ctx.out when already measured)."""
    results = [dict(job=job, key="float", implementation="transformers", method="float", spec="fp32",
                    ppl=ctx.reference.perplexity, kl_mean=0.0, top1=1.0)]  # the reference itself
    for key, fn, kwargs in rows:
        if only and key not in only:
            continue
        if fn is peer and kwargs["method"] == "gptqmodel-gptq" and ctx.gptqmodel_python is None:
            continue
        path = ctx.out / f"{job}-{key}.json"
        if path.exists() and not ctx.force:
            results.append(json.loads(path.read_text()))
            continue
        print(f"== {job} {key}", file=sys.stderr, flush=True)
        try:
            row = dict(job=job, key=key, threads=ctx.threads, qlab_commit=_commit(), **fn(ctx, **kwargs))
        except (RuntimeError, ValueError) as e:
            row = dict(job=job, key=key, error=str(e)[-2000:])
        path.write_text(json.dumps(row, indent=1))
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "peer"}), flush=True)
    return results


def _commit() -> str | None:
    """The qlab checkout's HEAD (rows measured on different commits can differ in speed)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True).stdout.strip() or None
    except OSError:
        return None


def table(rows: list[dict]) -> pd.DataFrame:
    cols = ["job", "key", "implementation", "method", "spec", "calib", "bpw", "ppl", "kl_mean", "top1", "seconds",
            "cpu_seconds", "threads"]
    return pd.DataFrame([{c: r.get(c) for c in cols} | ({"error": r["error"][:80]} if "error" in r else {})
                         for r in rows])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", default="quality", choices=[*JOBS, "all"])
    p.add_argument("--rows", default="", help="comma-separated row keys to run (default: all of the job)")
    p.add_argument("--peer-python", default=str(DEFAULT_PEER / "bin" / "python"))
    p.add_argument("--gptqmodel-python", default=None, help="interpreter of a GPTQModel venv (optional)")
    p.add_argument("--eval", type=int, default=16, help="evaluation windows")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(REPO_ROOT / "runs" / "peers"))
    p.add_argument("--force", action="store_true", help="recompute rows already saved under --out")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model()  # also writes the safetensors copy the peers load
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = set(filter(None, args.rows.split(","))) or None
    results = []
    for job in (list(JOBS) if args.job == "all" else [args.job]):
        n_calib, rows = JOBS[job]
        calib, evals = windows(tokenizer, n_calib, args.eval, args.seq_len)
        ctx = Context(model, cache_dir() / EMBEDDED, evals, reference_logprobs(model, evals, progress=False),
                      args.threads, Path(args.peer_python),
                      Path(args.gptqmodel_python) if args.gptqmodel_python else None, out, args.force, calib)
        results += run_job(ctx, job, rows, only)
    (out / "table.json").write_text(json.dumps(results, indent=1))
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        print(table(results).to_string(index=False, float_format=lambda x: f"{x:.4g}"))


if __name__ == "__main__":
    main()
