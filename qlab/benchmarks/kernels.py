"""Benchmark qlab's Triton kernels on a GPU: achieved GB/s and TFLOP/s against the torch baseline
(dequantize, then a dense fp16 matmul) and against the device's roofline, over batch sizes 1..256.

    python -m qlab.benchmarks.kernels                      # every kernel, W 4096 x 4096
    python -m qlab.benchmarks.kernels --n 11008 --k 4096 --batch 1 16 256 --csv runs/kernels.csv
    python -m qlab.benchmarks.kernels --bandwidth 2039 --tflops 312   # datasheet roofline instead of measured

The roofline ceilings are measured on the spot (a large device-to-device copy for bandwidth, a large
fp16 matmul for compute) unless given. On a machine without a CUDA GPU this prints so and exits 0:
the interpreter runs kernels for reading and testing, not for timing.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from qlab.kernels import dispatch
from qlab.study.roofline import Device, matmul_cost

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _bench(fn) -> float:
    """Median milliseconds of fn() (triton.testing.do_bench: needs a GPU driver)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def measure_device(bandwidth_gbs: float | None, peak_tflops: float | None) -> Device:
    """Roofline ceilings: given, or measured with a 1 GiB copy and an 8192^3 fp16 matmul."""
    name = torch.cuda.get_device_name()
    if bandwidth_gbs is None:
        a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
        b = torch.empty_like(a)
        bandwidth_gbs = 2 * a.numel() / (_bench(lambda: b.copy_(a)) * 1e-3) / 1e9  # read + write
        del a, b
    if peak_tflops is None:
        x = torch.randn(8192, 8192, dtype=torch.float16, device="cuda")
        peak_tflops = 2 * 8192**3 / (_bench(lambda: x @ x) * 1e-3) / 1e12
        del x
    return Device(name, bandwidth_gbs, peak_tflops)


def _to_cuda(weight):
    """A copy of a kernel weight dataclass with its tensors on the GPU."""
    moved = {f.name: getattr(weight, f.name).cuda() for f in dataclasses.fields(weight)
             if isinstance(getattr(weight, f.name), torch.Tensor)}
    return dataclasses.replace(weight, **moved)


def _row(kernel, m, ms, flops, nbytes, device, baseline_ms=None) -> dict:
    floor_ms = max(nbytes / (device.bandwidth_gbs * 1e9), flops / (device.peak_tflops * 1e12)) * 1e3
    return {"kernel": kernel, "M": m, "ms": ms, "GB/s": nbytes / (ms * 1e-3) / 1e9,
            "TFLOP/s": flops / (ms * 1e-3) / 1e12, "% of roofline": 100 * floor_ms / ms,
            "speed-up vs torch": (baseline_ms / ms) if baseline_ms else float("nan")}


def bench_matmuls(n: int, k: int, batches, device: Device) -> list[dict]:
    from qlab.kernels.int8 import int8_matmul, quantize_per_token_int8
    from qlab.kernels.nf4 import nf4_dequantize, nf4_gemv, nf4_quantize
    from qlab.kernels.ternary import ternary_matmul, ternary_quantize
    from qlab.kernels.w4a16 import Int4Weight, w4a16_matmul
    from qlab.core.quant import quantize

    W = torch.randn(n, k) * 0.02
    w4 = _to_cuda(Int4Weight.from_quantized(quantize(W, "int4-g128-asym-minmax")))
    nf4 = _to_cuda(nf4_quantize(W))
    tern = _to_cuda(ternary_quantize(W))
    qw, sw = quantize_per_token_int8(W.cuda().half(), backend="triton")
    dense = W.half().cuda()

    def torch_w4a16(x):  # the baseline: expand the weight to fp16 in memory, then cuBLAS
        codes = torch.stack([w4.packed & 15, w4.packed >> 4], 1).reshape(-1)[: n * k].reshape(n, k)
        scale = w4.scale.repeat_interleave(w4.group_size, 1)[:, :k]
        zero = w4.zero.repeat_interleave(w4.group_size, 1)[:, :k]
        return x @ ((codes.half() - zero.half()) * scale.half()).T

    rows = []
    for m in batches:
        x = torch.randn(m, k, dtype=torch.float16, device="cuda")
        fp16 = matmul_cost(m, n, k, bits=16)
        rows.append(_row("fp16 cuBLAS (dense weight)", m, _bench(lambda: x @ dense.T), fp16["flops"], fp16["bytes"], device))
        c = matmul_cost(m, n, k, bits=4, group_size=128, zero_point=True)
        base = _bench(lambda: torch_w4a16(x))
        rows.append(_row("torch dequantize + matmul (int4 g128)", m, base, c["flops"], c["bytes"], device))
        rows.append(_row("triton W4A16 (int4 g128 asym)", m, _bench(lambda: w4a16_matmul(x, w4, backend="triton")),
                         c["flops"], c["bytes"], device, base))
        c8 = matmul_cost(m, n, k, bits=8)
        qx, sx = quantize_per_token_int8(x, backend="triton")
        base8 = _bench(lambda: x @ (qw.half() * sw.half()[:, None]).T)
        rows.append(_row("torch dequantize + matmul (int8)", m, base8, c8["flops"], c8["bytes"], device))
        rows.append(_row("triton W8A8 int8 matmul", m,
                         _bench(lambda: int8_matmul(qx, qw, sx, sw, out_dtype=torch.float16, backend="triton")),
                         c8["flops"], c8["bytes"] - 1 * m * k, device, base8))  # int8 activations: 1 byte each
        c2 = matmul_cost(m, n, k, bits=2)
        base2 = _bench(lambda: x @ tern.dequantize().half().T)
        rows.append(_row("torch dequantize + matmul (ternary)", m, base2, c2["flops"], c2["bytes"], device))
        rows.append(_row("triton ternary matmul", m, _bench(lambda: ternary_matmul(x, tern, backend="triton")),
                         c2["flops"], c2["bytes"], device, base2))
        if m <= 4:
            cn = matmul_cost(m, n, k, bits=4 + 8 / 64)
            base_nf4 = _bench(lambda: x @ nf4_dequantize(nf4, torch.float16, backend="triton").T)
            rows.append(_row("triton NF4 dequantize + matmul", m, base_nf4, cn["flops"], cn["bytes"], device))
            rows.append(_row("triton NF4 GEMV (fused)", m, _bench(lambda: nf4_gemv(x, nf4, backend="triton")),
                             cn["flops"], cn["bytes"], device, base_nf4))
    return rows


def bench_elementwise(k: int, batches, device: Device) -> list[dict]:
    """Quantizers and transforms: memory-bound, so GB/s is the measure."""
    from qlab.kernels.fp8 import quantize_fp8
    from qlab.kernels.hadamard import hadamard_transform
    from qlab.kernels.int8 import quantize_per_token_int8
    from qlab.kernels.kivi import kivi_quantize

    rows = []
    for m in batches:
        x = torch.randn(m * 16, k, dtype=torch.float16, device="cuda")  # 16 tokens per batch entry
        rows.append(_row("int8 per-token quantize", m, _bench(lambda: quantize_per_token_int8(x, backend="triton")),
                         0, x.numel() * 3, device))
        rows.append(_row("fp8 per-token quantize", m, _bench(lambda: quantize_fp8(x, "token", backend="triton")),
                         0, x.numel() * 3, device))
        n = 1 << (k.bit_length() - 1)
        xh = x[:, :n].contiguous()
        rows.append(_row(f"FWHT n={n}", m, _bench(lambda: hadamard_transform(xh, backend="triton")),
                         xh.numel() * (n.bit_length() - 1), xh.numel() * 4, device))
        kv = x[:, :128].reshape(-1, 16, 128).contiguous()  # [heads, T, head_dim]
        rows.append(_row("KIVI 2-bit keys quantize", m, _bench(lambda: kivi_quantize(kv, 2, 16, "key", backend="triton")),
                         0, kv.numel() * 2.25, device))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4096, help="output features of the weight")
    p.add_argument("--k", type=int, default=4096, help="input features of the weight")
    p.add_argument("--batch", type=int, nargs="+", default=list(BATCHES), help="batch sizes M")
    p.add_argument("--bandwidth", type=float, help="DRAM bandwidth in GB/s (default: measured)")
    p.add_argument("--tflops", type=float, help="fp16 tensor peak in TFLOP/s (default: measured)")
    p.add_argument("--csv", help="also write the table to this CSV file")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("qlab.benchmarks.kernels: no CUDA GPU on this machine, nothing to time. The kernels run here "
              "under Triton's interpreter for reading and testing (pytest tests/kernels, notebook 10).")
        return 0
    if not dispatch.triton_installed():
        print("qlab.benchmarks.kernels: Triton is not installed (pip install triton); nothing to time.")
        return 0
    import pandas as pd

    device = measure_device(args.bandwidth, args.tflops)
    print(f"{device.name}: {device.bandwidth_gbs:.0f} GB/s, {device.peak_tflops:.0f} TFLOP/s fp16, "
          f"ridge {device.ridge:.0f} FLOP/byte; W {args.n} x {args.k}")
    rows = bench_matmuls(args.n, args.k, args.batch, device) + bench_elementwise(args.k, args.batch, device)
    table = pd.DataFrame(rows)
    with pd.option_context("display.max_rows", None, "display.width", 200, "display.float_format", "{:.3g}".format):
        print(table.to_string(index=False))
    if args.csv:
        table.to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
