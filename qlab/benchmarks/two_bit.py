"""Two bits per weight on the embedded model: QuIP# (E8P) and AQLM next to RTN, GPTQ and AWQ, one sweep, one protocol.

    python -m qlab.benchmarks.two_bit                          # QuIP# and RTN (about 20-40 min on 2 cores)
    python -m qlab.benchmarks.two_bit --methods rtn,gptq,awq,quip --threads 2
    python -m qlab.benchmarks.two_bit --methods aqlm-2x8       # AQLM ('aqlm': 2x8 and 1x8); 2x8: 12 CPU-min
    python -m qlab.benchmarks.two_bit --methods rtn,rtn-rot,gptq,gptq-rot --bits 2,3,4   # with and without rotation

The protocol is notebook 08's (16 spread windows of 512 tokens from the evaluation articles, 32 calibration
windows from the 8 held-out articles, no BOS), so its rows line up with the README's calibrated-PTQ table. Every
block Linear is quantized; embeddings and the tied lm_head stay float. Scalar methods use int2, groups of 128,
asymmetric min-max (2.16 bits per weight on 576-wide rows); 'rtn-rot' and 'gptq-rot' quantize each weight's
randomized Hadamard rotation instead, as QuIP does, and store its two sign vectors (+0.003 bits per weight over the
block Linears). QuIP# spends 16 bits per 8 weights plus one scale and the sign vectors per layer (2.00). AQLM
2x8 spends 16 bits per 8 weights plus two 256 x 8 fp16 codebooks and an fp16 scale per row in every Linear (2.153
over the block Linears, against int2 g128's 2.152), 1x8 half the codes (1.088); its search is cut to fit the
issue's hour on 2 cores (``AQLM_SEARCH``: k-means with 10 Lloyd iterations, then one round of 20 Adam steps and a
beam search of width 4). Results are cached per configuration under ``--results``, and each AQLM weight under
``<results>/aqlm_cache`` as soon as it is done, so a killed run resumes at the layer it reached; the table
(label, bits per weight, perplexity, KL, top-1, quantize seconds) is printed and written as CSV beside them.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from qlab.eval.sweep import DEFAULT_RESULTS, EvalProtocol, run_sweep

SCALAR_SPEC = "int{bits}-g128-asym-minmax"
QUIP_SPEC = {2: "e8p", 3: "e8p-rvq3", 4: "e8p-rvq4"}
AQLM_SEARCH = {"beam_size": 4, "rounds": 1, "adam_steps": 20, "kmeans_iters": 10}
AQLM_FORMATS = ("2x8", "1x8")


def configs(methods: list[str], calib_windows: int = 32, results=DEFAULT_RESULTS / "two_bit",
            bits=(2,)) -> list[dict]:
    """One configuration per (method, bit width); AQLM's formats fix their own bits and appear once."""
    out = []
    if bad := [b for b in bits if b not in QUIP_SPEC]:
        raise SystemExit(f"--bits must be among {sorted(QUIP_SPEC)} (QuIP#'s E8P and its residual variants), got {bad}")
    methods = [f for m in methods for f in ([f"aqlm-{x}" for x in AQLM_FORMATS] if m == "aqlm" else [m])]
    for m in methods:
        if m.startswith("aqlm-") and m[5:] in AQLM_FORMATS:
            entry = {"method": "aqlm", "spec": m[5:], **AQLM_SEARCH, "cache_dir": str(Path(results) / "aqlm_cache")}
            out.append({"label": f"AQLM {m[5:]}", "recipe": {"model.layers.*": entry}, "calib_windows": calib_windows})
        else:
            out += [_scalar_or_quip(m, b, calib_windows) for b in bits]
    return out


def _scalar_or_quip(m: str, bits: int, calib_windows: int) -> dict:
    spec = SCALAR_SPEC.format(bits=bits)
    if m == "rtn":
        return {"label": f"RTN int{bits} g128", "recipe": {"model.layers.*": spec}}
    if m in ("gptq", "awq"):
        return {"label": f"{m.upper()} int{bits} g128", "recipe": {"model.layers.*": f"{m}:{spec}"},
                "calib_windows": calib_windows}
    if m in ("rtn-rot", "gptq-rot"):  # the same method on the randomized-Hadamard-rotated weights (seed 0)
        base = m.removesuffix("-rot")
        config = {"label": f"{base.upper()} int{bits} g128 + rotation",
                  "recipe": {"model.layers.*": {"method": base, "spec": spec, "rotate": True}}}
        return config | ({"calib_windows": calib_windows} if base == "gptq" else {})
    if m == "quip":
        label = "QuIP# E8P" if bits == 2 else f"QuIP# E8P-RVQ{bits}"
        return {"label": label, "recipe": {"model.layers.*": f"quip:{QUIP_SPEC[bits]}"}, "calib_windows": calib_windows}
    raise SystemExit(f"unknown method {m!r}; known: rtn, gptq, awq, rtn-rot, gptq-rot, quip, aqlm (both formats), "
                     f"{', '.join('aqlm-' + x for x in AQLM_FORMATS)}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="rtn,quip")
    p.add_argument("--bits", default="2", help="bit widths for RTN/GPTQ/AWQ (int, g128) and QuIP# (E8P, RVQ3, RVQ4)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval", type=int, default=16, help="evaluation windows of 512 tokens")
    p.add_argument("--results", default=str(DEFAULT_RESULTS / "two_bit"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    protocol = EvalProtocol(part="evaluation", seq_len=512, n_windows=args.eval, pick="spread")
    df = run_sweep(configs(args.methods.split(","), results=args.results,
                                bits=[int(b) for b in args.bits.split(",")]), protocol, args.results)
    cols = ["label", "quantized_bpw", "ppl", "ppl_ref", "kl_mean", "top1", "quant_seconds"]
    print(protocol.describe())
    print(df[cols].to_string(index=False))
    df.drop(columns=["window_nll"]).to_csv(Path(args.results) / "table.csv", index=False)


if __name__ == "__main__":
    main()
