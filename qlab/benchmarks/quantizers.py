"""qlab's encoders and decoders timed against the tool a user would otherwise pick, on the same tensors.

    python -m qlab.benchmarks.quantizers                 # 4096 x 4096 Gaussian + a real layer, 1 and 2 threads
    python -m qlab.benchmarks.quantizers --size 1024 --repeats 3 --threads 1

Each row times one operation of qlab and of its peer, interleaved (qlab, peer, qlab, peer, ...; best of
``--repeats``), and checks that both produce the same bytes or values where the formats are the same. Every
peer does the whole job qlab does (its column says which): scales included, codes packed as qlab packs them.

* plain torch, always present: int8 per channel (absmax scale, divide, round, clamp, cast), int4 g128
  asymmetric (min/max, round, pack two nibbles per byte), FP8 E4M3 per tensor (absmax scale, divide,
  torch's own cast), and their decoders (codes to float, times the stored scale);
* bitsandbytes' ``quantize_4bit`` / ``dequantize_4bit`` (NF4, blocks of 64, fp32 absmax: qlab's
  'nf4-sfp32'), imported from the PTQ peers' venv (``make ptq-peers``; the same torch) into this process;
* llama.cpp's ``ggml_quantize_chunk`` (through ``qlab.gguf.reference``, when ``make llamacpp-peer`` has
  built it; single-threaded in llama.cpp whatever the thread count): the GGUF block formats, whose qlab
  encoders (numba loops, ``qlab.gguf.search``) are single-threaded too;
* the gguf package's decoder for the GGUF formats (numpy), whose float32 values qlab's decoders give bit for bit.

A peer that is absent is reported as absent. The ratio is qlab's time over the peer's: below 1, qlab is faster.
``--ops`` keeps the rows whose name contains one of its comma-separated words (``--ops int8,FP8,Q4_1``).
"""
from __future__ import annotations

import argparse
import glob
import os
from pathlib import Path
import sys
import time

import numpy as np
import torch

GGUF_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# the PTQ peers' venv, where qlab.benchmarks.peers finds it too
PTQ_PEER = Path(os.environ.get("QLAB_PTQ_PEER", Path(__file__).resolve().parents[2].parent / "peers" / "ptq"))


def best_of(fns: dict, repeats: int) -> dict:
    """{name: best seconds} of each function, run interleaved ``repeats`` times (after one warm-up call)."""
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


# ---- the plain-torch peers (what a user writes without qlab) ------------------------------------------

def torch_int8_channel(W):
    scale = (W.abs().amax(dim=1, keepdim=True) / 127).half()  # stored fp16, rounded with what is stored
    return torch.round(W / scale.float()).clamp(-127, 127).to(torch.int8), scale


def torch_int4_g128_asym(W, g=128):
    G = W.reshape(W.shape[0], -1, g)
    lo, hi = G.amin(-1, keepdim=True).clamp(max=0), G.amax(-1, keepdim=True).clamp(min=0)
    raw = (hi - lo) / 15
    zero = torch.round(-lo / raw).clamp(0, 15)
    scale = raw.half().float()  # stored fp16, rounded with what is stored
    q = torch.round(G / scale + zero).clamp(0, 15).to(torch.uint8).reshape(W.shape[0], -1)
    return q[:, 0::2] | (q[:, 1::2] << 4), scale, zero


def torch_int4_g128_asym_decode(packed, scale, zero, shape, g=128):
    q = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(shape[0], -1, g).float()
    return ((q - zero) * scale).reshape(shape)


def torch_fp8_tensor(W):
    scale = W.abs().max() / 448
    return (W / scale).to(torch.float8_e4m3fn), scale


def bitsandbytes_functional():
    """``bitsandbytes.functional`` from the PTQ peers' venv, imported into this process (its torch is
    qlab's, pinned by ``make ptq-peers``) so that it runs interleaved with qlab; None when it is absent."""
    sites = sorted(glob.glob(str(PTQ_PEER / "lib" / "python3*" / "site-packages")))
    if not sites or not (Path(sites[0]) / "bitsandbytes").is_dir():
        return None
    sys.path.append(sites[0])  # last: everything qlab's venv has comes from there
    try:
        import bitsandbytes.functional as F
        return F
    except Exception:  # a broken or mismatched peer counts as absent
        return None
    finally:
        sys.path.remove(sites[0])


def rows(size: int, real: bool):
    """(label, W): a size x size Gaussian weight, or a real layer of the embedded model (its GGUF, no load)."""
    if not real:
        return f"gaussian {size}x{size}", torch.randn(size, size, generator=torch.Generator().manual_seed(0))
    import gguf

    from qlab.models import embedded_gguf_path

    reader = gguf.GGUFReader(embedded_gguf_path())
    t = next(t for t in reader.tensors if t.name == "blk.10.ffn_down.weight")
    W = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
    return f"real {tuple(W.shape)} (blk.10.ffn_down)", W


def measure(W: torch.Tensor, repeats: int, gguf_types=GGUF_TYPES, ops=None) -> list[dict]:
    """One dict per row (op, qlab_ms, peer, peer_ms, ratio, same); ``ops``: keep the rows whose op contains
    one of these words."""
    from qlab import quantize
    from qlab import gguf as qg
    from qlab.gguf import reference

    out = []

    def wanted(op):
        return ops is None or any(word in op for word in ops)

    def row(op, qlab_fn, peer, peer_fn, same):
        if not wanted(op):
            return
        if peer_fn is None:
            t = best_of({"qlab": qlab_fn}, repeats)
            out.append(dict(op=op, qlab_ms=1e3 * t["qlab"], peer=peer + " (absent)", peer_ms=None, ratio=None, same=None))
            return
        t = best_of({"qlab": qlab_fn, "peer": peer_fn}, repeats)
        out.append(dict(op=op, qlab_ms=1e3 * t["qlab"], peer=peer, peer_ms=1e3 * t["peer"],
                        ratio=t["qlab"] / t["peer"], same=same))

    qt = quantize(W, "int8-channel")
    q8, s8 = torch_int8_channel(W)
    row("int8 per channel: encode", lambda: quantize(W, "int8-channel"), "torch (absmax, divide, round, cast)",
        lambda: torch_int8_channel(W), bool(torch.equal(qt.values().to(torch.int8), q8)))
    row("int8 per channel: decode", qt.dequantize, "torch (cast, times scale)", lambda: q8.float() * s8.float(),
        bool(torch.equal(qt.dequantize(), q8.float() * s8.float())))
    if W.shape[1] % 128 == 0:
        qt4 = quantize(W, "int4-g128-asym-minmax")
        packed, s4, z4 = torch_int4_g128_asym(W)
        row("int4 g128 asym: encode", lambda: quantize(W, "int4-g128-asym-minmax"), "torch (min/max, round, pack)",
            lambda: torch_int4_g128_asym(W), bool(torch.equal(qt4.packed, packed.reshape(-1))))
        decode4 = lambda: torch_int4_g128_asym_decode(packed, s4, z4, W.shape)  # noqa: E731
        row("int4 g128 asym: decode", qt4.dequantize, "torch (unpack, minus zero, times scale)", decode4,
            bool(torch.equal(qt4.dequantize(), decode4())))
    qf8 = quantize(W, "fp8_e4m3")
    f8, sf8 = torch_fp8_tensor(W)
    row("FP8 E4M3 per tensor: encode", lambda: quantize(W, "fp8_e4m3"), "torch (absmax, divide, cast)",
        lambda: torch_fp8_tensor(W), bool(torch.equal(qf8.values(), f8.float())))
    row("FP8 E4M3 per tensor: decode", qf8.dequantize, "torch (cast, times scale)", lambda: f8.float() * sf8,
        bool(torch.equal(qf8.dequantize(), f8.float() * sf8)))
    if wanted("NF4"):
        nf4_rows(W, row)
    arr = W.numpy()
    lib = reference.available()
    for qtype in gguf_types:
        if W.shape[1] % qg.get_format(qtype).block_size or not (wanted(f"{qtype}: encode") or wanted(f"{qtype}: decode")):
            continue
        ours = qg.quantize(W, qtype)
        peer_fn = (lambda q=qtype: reference.ggml_quantize(arr, q)) if lib else None
        same = bool(np.array_equal(ours.data.reshape(-1), reference.ggml_quantize(arr, qtype).reshape(-1))) if lib else None
        row(f"{qtype}: encode", lambda q=qtype: qg.quantize(W, q), "llama.cpp ggml_quantize_chunk", peer_fn, same)
        decode = _gguf_decode(ours)
        row(f"{qtype}: decode", ours.dequantize, "gguf package dequantize", decode,
            bool(np.array_equal(ours.dequantize().numpy().reshape(-1), decode().reshape(-1))))
    return out


def nf4_rows(W, row):
    """NF4 in blocks of 64 with fp32 absmax against bitsandbytes (first code in the high nibble there)."""
    from qlab import quantize

    F = bitsandbytes_functional()
    qt = quantize(W, "nf4-sfp32")
    if F is None:
        row("NF4 b64: encode", lambda: quantize(W, "nf4-sfp32"), "bitsandbytes (make ptq-peers)", None, None)
        row("NF4 b64: decode", qt.dequantize, "bitsandbytes (make ptq-peers)", None, None)
        return
    encode = lambda: F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=False)  # noqa: E731
    packed, state = encode()
    p = packed.reshape(-1)
    same = torch.equal(((p & 0xF) << 4) | (p >> 4), qt.packed) and torch.equal(state.absmax, qt.scales().reshape(-1))
    row("NF4 b64: encode", lambda: quantize(W, "nf4-sfp32"), "bitsandbytes quantize_4bit", encode, same)
    decode = lambda: F.dequantize_4bit(packed, state)  # noqa: E731
    row("NF4 b64: decode", qt.dequantize, "bitsandbytes dequantize_4bit", decode, torch.equal(qt.dequantize(), decode()))


def _gguf_decode(t):
    import gguf

    T = gguf.GGMLQuantizationType[t.qtype]
    return lambda: gguf.quants.dequantize(t.data, T)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    p.add_argument("--no-real", action="store_true", help="skip the embedded model's layer")
    p.add_argument("--ops", help="comma-separated words: keep the rows whose name contains one (e.g. int8,FP8,Q4_1)")
    args = p.parse_args(argv)
    ops = args.ops.split(",") if args.ops else None
    import pandas as pd

    tensors = [rows(args.size, real=False)] + ([] if args.no_real else [rows(args.size, real=True)])
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for label, W in tensors:
            df = pd.DataFrame(measure(W, args.repeats, ops=ops))
            print(f"\n== {label}, torch threads: {threads} (llama.cpp's quantize and qlab's GGUF encoders: "
                  f"1 thread; gguf decode: numpy)")
            print(df.to_string(index=False, float_format=lambda v: f"{v:.3g}"))


if __name__ == "__main__":
    main()
