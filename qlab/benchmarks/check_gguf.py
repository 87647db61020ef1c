"""Whole-model check against llama.cpp (needs the optional peer): ``python -m qlab.benchmarks.check_gguf [MIX ...]``.

For each mix, re-quantizes the embedded model with qlab and with llama.cpp's
``llama_model_quantize`` and reports whether the two files hold the same tensors, byte for byte,
with both timings.
"""
from __future__ import annotations

import argparse
import tempfile
import time

from qlab.gguf import reference
from qlab.gguf.mixes import MIXES


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("mixes", nargs="*", default=list(MIXES))
    ap.add_argument("--src", default=None, help="input .gguf (default: the embedded SmolLM2-135M)")
    args = ap.parse_args(argv)
    if reference.peer_python() is None:
        print("llama.cpp peer not found (make llamacpp-peer)")
        return 2
    if args.src is None:
        from qlab.models import embedded_gguf_path
        args.src = str(embedded_gguf_path())
    failed = 0
    with tempfile.TemporaryDirectory() as work:
        for mix in args.mixes:
            t = time.perf_counter()
            res = reference.compare_with_llama_quantize(args.src, mix, work)
            ok = res["same_order"] and res["same_types"] and res["byte_identical"] == res["n_tensors"]
            failed += not ok
            print(f"{mix:7s} {'OK ' if ok else 'DIFF'} {res['byte_identical']}/{res['n_tensors']} tensors byte-identical "
                  f"({time.perf_counter() - t:.1f} s for both)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
