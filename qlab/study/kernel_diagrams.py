"""Figures that explain the kernels: the packed bit layout and the tiling of the W4A16 GEMM."""
from __future__ import annotations

import torch


def draw_packed_layout(codes: torch.Tensor, bits: int = 4):
    """Draw a small [N, K] tensor of ``bits``-bit codes and the bytes qlab packs them into, bit by bit.

    Bottom: each byte drawn most significant bit first, as one writes binary. Top: each code W[n, k]
    (stream index e = n * K + k) drawn over the bits it occupies, [bits * e, bits * (e + 1)) of the
    stream; so with 4 bits the even code sits in the LOW nibble, the right half of its byte.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n, k = codes.shape
    flat = codes.reshape(-1).tolist()
    per_byte = 8 // bits
    n_bytes = -(-len(flat) // per_byte)
    colours = plt.get_cmap("tab20").colors
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * n_bytes), 2.8))
    # codes: each box sits right above the bits it occupies (so within a byte, the stream runs right to left)
    for e, c in enumerate(flat):
        b, slot = divmod(e, per_byte)
        x = b * 4.0 + (per_byte - 1 - slot) * bits * 0.5
        ax.add_patch(Rectangle((x, 1.7), bits * 0.5, 0.9, facecolor=colours[e % 20], alpha=0.6, edgecolor="black", lw=0.5))
        ax.text(x + bits * 0.25, 2.35, f"W[{e // k},{e % k}]", ha="center", va="center", fontsize=8)
        ax.text(x + bits * 0.25, 1.95, f"{c}={c:0{bits}b}" if bits > 2 else f"{c:0{bits}b}", ha="center",
                va="center", fontsize=7, family="monospace")
    # bytes: 8 bit cells each, MSB left; bit i of byte b is stream bit 8b + i
    for b in range(n_bytes):
        x0 = b * 4.0
        value = 0
        for i in range(8):
            e = (8 * b + i) // bits
            bit = (flat[e] >> ((8 * b + i) % bits)) & 1 if e < len(flat) else 0
            value |= bit << i
            x = x0 + (7 - i) * 0.5
            ax.add_patch(Rectangle((x, 0.6), 0.5, 0.8, facecolor=colours[e % 20] if e < len(flat) else "white",
                                   alpha=0.6, edgecolor="black", lw=0.5))
            ax.text(x + 0.25, 1.0, str(bit), ha="center", va="center", fontsize=10, family="monospace")
        ax.text(x0 + 2.0, 0.25, f"byte {b} = 0x{value:02X}", ha="center", va="center", fontsize=9)
    ax.text(-0.2, 2.15, "codes", ha="right", va="center", fontsize=9)
    ax.text(-0.2, 1.0, "bytes\n(MSB..LSB)", ha="right", va="center", fontsize=9)
    ax.set_xlim(-1.6, n_bytes * 4.0 + 0.2)
    ax.set_ylim(0, 2.8)
    ax.axis("off")
    ax.set_title(f"{n}x{k} weight, {bits}-bit codes, packed little-endian: code e lives in bits "
                 f"[{bits}e, {bits}e+{bits}) of the stream")
    return fig


def draw_gemm_tiling(m: int = 48, n: int = 96, k: int = 192, block_m: int = 16, block_n: int = 32,
                     block_k: int = 32, group_size: int = 64, tile=(1, 1), k_step: int = 3):
    """The W4A16 GEMM's tiling, drawn as the classic x (left) . W^T (top) = y (bottom right) picture.

    Program ``tile`` = (pid_m, pid_n) owns one BLOCK_M x BLOCK_N tile of y. At step ``k_step`` of
    its K loop it loads a BLOCK_M x BLOCK_K tile of x and a BLOCK_K x BLOCK_N tile of packed codes,
    dequantizes the codes in registers with the scale (and zero) of the group the k-tile lies in,
    and accumulates their product in fp32.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    pm, pn = tile
    k0 = k_step * block_k
    fig, axes = plt.subplots(2, 2, figsize=(9, 8), gridspec_kw=dict(width_ratios=[k, n], height_ratios=[k, m]))
    (ax_txt, ax_w), (ax_x, ax_y) = axes
    panels = [(ax_x, m, k, "x [M, K]  fp16 activations"), (ax_w, k, n, "W^T [K, N]  int4 codes, packed"),
              (ax_y, m, n, "y [M, N]  fp32 accumulators")]
    for ax, rows, cols, title in panels:
        ax.add_patch(Rectangle((0, 0), cols, rows, facecolor="#f2f2f2", edgecolor="black"))
        ax.set_xlim(-1, cols + 1)
        ax.set_ylim(rows + 1, -1)
        ax.set_aspect("equal")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for kk in range(block_k, k, block_k):  # the K loop's steps
        ax_x.axvline(kk, color="white", lw=1)
        ax_w.axhline(kk, color="white", lw=1)
    for g0 in range(0, k, group_size):  # quantization groups run along K
        ax_w.axhline(g0, color="tab:purple", lw=1, ls="--")
        ax_w.text(n + 0.5, g0 + 1, f"group {g0 // group_size}", fontsize=7, color="tab:purple", va="top")
    ax_x.add_patch(Rectangle((0, pm * block_m), k, block_m, facecolor="tab:blue", alpha=0.15))
    ax_w.add_patch(Rectangle((pn * block_n, 0), block_n, k, facecolor="tab:orange", alpha=0.15))
    ax_x.add_patch(Rectangle((k0, pm * block_m), block_k, block_m, facecolor="tab:blue", alpha=0.75))
    ax_w.add_patch(Rectangle((pn * block_n, k0), block_n, block_k, facecolor="tab:orange", alpha=0.75))
    ax_y.add_patch(Rectangle((pn * block_n, pm * block_m), block_n, block_m, facecolor="tab:green", alpha=0.75))
    ax_x.annotate("", (k0 + block_k + 12, pm * block_m - 2), (k0 + block_k, pm * block_m - 2),
                  arrowprops=dict(arrowstyle="->", color="tab:blue"))
    ax_txt.axis("off")
    g = k0 // group_size
    ax_txt.text(0, 0.5, (
        f"program (pid_m={pm}, pid_n={pn})\nowns y[{pm * block_m}:{(pm + 1) * block_m}, "
        f"{pn * block_n}:{(pn + 1) * block_n}]\n\n"
        f"for k0 in range(0, K, {block_k}):   # step {k_step}: k0 = {k0}\n"
        f"  x_tile = load x[rows, k0:k0+{block_k}]\n"
        f"  bytes  = load {block_k}x{block_n} nibbles\n"
        f"           ({block_k * block_n // 2} bytes, not {2 * block_k * block_n})\n"
        f"  s, z   = scale, zero of group {g}\n"
        f"  w_tile = (code - z) * s   # registers\n"
        f"  acc   += x_tile @ w_tile  # tl.dot, fp32\n"
        f"store acc -> y tile\n\n"
        f"BLOCK_K = {block_k} divides the group ({group_size}):\none scale row per k-tile"),
        family="monospace", fontsize=8, va="center", transform=ax_txt.transAxes)
    fig.tight_layout()
    return fig
