"""The roofline: why a batch-1 matmul is bound by memory bandwidth, and what 4-bit weights buy.

A kernel that does F floating-point operations and moves B bytes between DRAM and the chip needs at
least

    t >= max(B / bandwidth, F / peak)          (Williams, Waterman & Patterson 2009)

so its attainable throughput is min(peak, bandwidth * I), with arithmetic intensity I = F / B
(FLOP per byte). For y = x W^T with x [M, K] and W [N, K] stored at b bits per weight:

    F = 2 M N K,    B ~ N K b / 8  (+ scales)  +  2 M K  +  2 M N     (fp16 activations)

At M = 1, fp16 weights give I ~ 1 FLOP/byte, far below a GPU's ridge point peak / bandwidth
(~150 FLOP/byte on an A100): the GEMV waits on memory, and 4-bit weights, a quarter of the bytes,
make it up to ~4x faster. As M grows, I grows ~M (fp16) or ~4M (int4) until the ridge, where
compute takes over and the weight format no longer sets the speed.
"""
from __future__ import annotations

from dataclasses import dataclass
import math


@dataclass(frozen=True)
class Device:
    name: str
    bandwidth_gbs: float  # DRAM bandwidth, GB/s (1e9 bytes)
    peak_tflops: float  # dense fp16 tensor-core throughput with fp32 accumulation, TFLOP/s

    @property
    def ridge(self) -> float:
        """The arithmetic intensity (FLOP/byte) where memory time equals compute time."""
        return self.peak_tflops * 1e12 / (self.bandwidth_gbs * 1e9)


# Vendor datasheet numbers (dense, no sparsity).
DEVICES = {d.name: d for d in [
    Device("A100-SXM-80GB", 2039, 312),
    Device("H100-SXM", 3350, 989),
    Device("L4", 300, 121),
    Device("RTX-4090", 1008, 165),
    Device("T4", 320, 65),
]}


def weight_bytes(n: int, k: int, bits: float, group_size: int | None = None, scale_bytes: int = 2,
                 zero_point: bool = False) -> float:
    """Bytes of an [N, K] weight at ``bits`` per weight, plus one scale (and zero) per group."""
    total = n * k * bits / 8
    if group_size:
        groups = n * math.ceil(k / group_size)
        total += groups * scale_bytes + (groups * bits / 8 if zero_point else 0)
    return total


def matmul_cost(m: int, n: int, k: int, bits: float = 16, group_size: int | None = None,
                zero_point: bool = False, act_bytes: int = 2) -> dict:
    """FLOPs, bytes (each operand read or written once) and intensity of y = x W^T."""
    flops = 2 * m * n * k
    nbytes = weight_bytes(n, k, bits, group_size, zero_point=zero_point) + act_bytes * (m * k + m * n)
    return dict(flops=flops, bytes=nbytes, intensity=flops / nbytes)


def roofline_seconds(flops: float, nbytes: float, device: Device) -> float:
    """The least time the roofline allows: max(bytes / bandwidth, flops / peak)."""
    return max(nbytes / (device.bandwidth_gbs * 1e9), flops / (device.peak_tflops * 1e12))


def attainable_tflops(intensity: float, device: Device) -> float:
    return min(device.peak_tflops, device.bandwidth_gbs * 1e9 * intensity / 1e12)


WEIGHT_FORMATS = {"fp16": dict(bits=16), "int8 (per channel)": dict(bits=8),
                  "int4 g128": dict(bits=4, group_size=128), "int4 g32 asym": dict(bits=4, group_size=32, zero_point=True),
                  "2-bit (ternary)": dict(bits=2)}


def plot_roofline(device: Device, n: int = 4096, k: int = 4096, batch_sizes=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                  formats: dict | None = None, highlight_m: int | None = None):
    """Two panels for y = x W^T on ``device``: left, the roofline with one point per (weight format,
    batch size M); right, the least time the roofline allows against M. Returns the figure."""
    import matplotlib.pyplot as plt

    formats = formats or WEIGHT_FORMATS
    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(12, 4.5))
    lo, hi = 0.3, 8 * device.ridge
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.loglog(xs, [attainable_tflops(x, device) for x in xs], color="black", lw=2, label=f"{device.name} roofline")
    ax.axvline(device.ridge, color="grey", ls=":", lw=1)
    ax.annotate(f"ridge {device.ridge:.0f} FLOP/B", (device.ridge, device.peak_tflops / 30), rotation=90,
                fontsize=8, ha="right", color="grey")
    for name, fmt in formats.items():
        costs = [matmul_cost(m, n, k, **fmt) for m in batch_sizes]
        pts = [c["intensity"] for c in costs]
        line, = ax.loglog(pts, [attainable_tflops(p, device) for p in pts], "o", ms=4, label=name)
        us = [roofline_seconds(c["flops"], c["bytes"], device) * 1e6 for c in costs]
        ax_t.loglog(batch_sizes, us, "o-", ms=4, color=line.get_color(), label=name)
        if highlight_m is not None:
            c = matmul_cost(highlight_m, n, k, **fmt)
            ax.loglog([c["intensity"]], [attainable_tflops(c["intensity"], device)], "*", ms=15,
                      color=line.get_color(), mec="black")
            ax_t.loglog([highlight_m], [roofline_seconds(c["flops"], c["bytes"], device) * 1e6], "*", ms=15,
                        color=line.get_color(), mec="black")
    ax.set(xlabel="arithmetic intensity (FLOP / byte)", ylabel="attainable TFLOP/s (upper bound)",
           title=f"roofline bound, W {n}x{k}, M = {batch_sizes[0]}..{batch_sizes[-1]}")
    ax_t.set(xlabel="batch size M (tokens)", ylabel="least time per matmul (us, lower bound)",
             title="time bound: flat (memory) until the ridge, then compute")
    if highlight_m is not None:
        ax_t.axvline(highlight_m, color="grey", ls=":", lw=1)
        ax.plot([], [], "*", ms=12, color="white", mec="black", label=f"batch size M = {highlight_m}")
    for a in (ax, ax_t):
        a.grid(True, which="both", alpha=0.3)
    # one legend outside the panels, so that no point (the stars at M = 1 sit in the corners) is hidden
    fig.legend(*ax.get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=4, fontsize=8,
               frameon=False)
    fig.suptitle(f"{device.name}: bounds from datasheet bandwidth {device.bandwidth_gbs:g} GB/s and peak "
                 f"{device.peak_tflops:g} TFLOP/s, not measurements", fontsize=9, y=1.0)
    fig.tight_layout()
    return fig
