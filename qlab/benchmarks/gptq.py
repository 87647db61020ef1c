"""Benchmark: sequential GPTQ (and AWQ) of a whole model, against RTN on the same grid.

    python -m qlab.benchmarks.gptq --spec int4-g64 --calib 32 --eval 16
    python -m qlab.benchmarks.gptq --spec int3-g128-asym-minmax --methods rtn,gptq,awq
    python -m qlab.benchmarks.gptq --spec int4-g128-asym-minmax --calib 128      # the timing job of issue 4
    python -m qlab.benchmarks.gptq --methods rtn,gptq --eval 64                   # is GPTQ's gain real?

Calibration windows are spread over the WikiText-2 calibration articles, evaluation windows over the
other articles (``qlab.models.data``; the windows of notebook 08), perplexity with ``qlab.eval`` (every
position of each window scored). Prints one JSON line per model: spec, method, perplexity, the wall
time of the quantization and, next to RTN, the paired perplexity ratio with its 95% interval over the
windows (``qlab.eval.paired_ppl_ratio``).
"""
import argparse
import copy
import json
import time

import torch

from qlab.models.walker import quantize_model, weight_only
from qlab.models.data import wikitext2_windows
from qlab.eval import evaluate, paired_ppl_ratio
from qlab.models import load_model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default="int4-g128-asym-minmax")
    p.add_argument("--calib", type=int, default=32, help="calibration windows")
    p.add_argument("--eval", type=int, default=16, help="evaluation windows")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--act-order", action="store_true")
    p.add_argument("--methods", default="rtn,gptq", help="comma-separated: float, rtn, gptq, awq")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model()
    n_articles = max(8, args.calib * args.seq_len // 2500)  # enough calibration articles for the windows
    calib = wikitext2_windows(tokenizer, "calibration", args.seq_len, args.calib, n_calibration=n_articles, pick="spread")
    evals = wikitext2_windows(tokenizer, "evaluation", args.seq_len, args.eval, n_calibration=n_articles, pick="spread")
    report = lambda **kw: print(json.dumps(kw), flush=True)  # noqa: E731

    methods = args.methods.split(",")
    unknown = set(methods) - {"float", "rtn", "gptq", "awq"}
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; known: float, rtn, gptq, awq")
    rtn_nll = None
    if "float" in methods:
        report(method="float", ppl=evaluate(model, evals, progress=False)["ppl"])
    if "rtn" in methods:
        rtn_model, size = quantize_model(model, weight_only(args.spec))
        out = evaluate(rtn_model, evals, progress=False)
        rtn_nll = out["window_nll"]
        report(method="rtn", spec=args.spec, ppl=out["ppl"])
        del rtn_model
    entries = {"gptq": {"method": "gptq", "spec": args.spec, "act_order": args.act_order},
               "awq": {"method": "awq", "spec": args.spec}}
    for name in [m for m in methods if m in entries]:
        t0 = time.perf_counter()
        quantized, _ = quantize_model(model, weight_only(entries[name]), calib, progress=True)
        seconds = time.perf_counter() - t0
        out = evaluate(quantized, evals, progress=False)
        vs_rtn = {} if rtn_nll is None else {"vs_rtn": paired_ppl_ratio(out["window_nll"], rtn_nll)}
        report(method=name, spec=args.spec, act_order=args.act_order, calib_windows=args.calib,
               eval_windows=args.eval, seq_len=args.seq_len, seconds=round(seconds, 1), ppl=out["ppl"], **vs_rtn)
        del quantized

if __name__ == "__main__":
    main()
