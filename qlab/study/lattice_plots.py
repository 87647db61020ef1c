"""Teaching helpers and figures for notebook 11: rotations, lattices and codebooks.

Everything here is a worked example or a small experiment built on the package's own pieces
(``qlab.core.rotations``, ``qlab.core.formats.lattice``, ``qlab.methods.weight.{rtn, gptq, quip, aqlm}``):

* ``e8_decode_steps``     Conway & Sloane's E8 decoder written out step by step (both cosets, parity fix);
* ``e8p_code_steps``      one 16-bit E8P code decoded bit by bit (abs pattern, signs, parity, the +-1/4 shift);
* ``e8p_mse_vs_scale``    the E8P codebook's MSE per dimension on a unit Gaussian against the input RMS;
* ``quantize_rotated``    RTN or GPTQ with or without the two-sided randomized Hadamard rotation;
* ``whole_model_rtn``     the same for RTN on every block Linear of a model, evaluated (ppl, KL, top-1);
* ``rotation_error_table`` where RTN's error lands with and without the rotation (weight, output, loud inputs);
* ``RotatedLinear``       a Linear computed in the rotated basis (x S_U V^T, W', then V S_V): same outputs;
                          ``rotate_linears`` swaps them into a model, ``rotation_exactness`` measures the change;
* ``ldlq_vs_nearest``     BlockLDLQ against plain nearest-point E8P rounding on one layer (proxy loss);
* ``aqlm_group_steps``    one AQLM group rebuilt from its codes;
* ``two_bit_table``       the whole-model 2-bit rows of a sweep folder;
* figures: ``plot_z2_vs_a2``, ``plot_g_estimates``, ``plot_mse_vs_scale``, ``plot_rotation_errors``.

G closed forms (Conway & Sloane, "Sphere Packings, Lattices and Groups", table 2.3): Z 1/12, A2 5/(36 sqrt 3),
D4 0.0766032, E8 929/12960.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from qlab.core.formats.lattice import E8P_SIGN_BIT, e8p_abs_patterns, e8p_nearest
from qlab.core.rotations import RandomizedHadamard
from qlab.core.spec import QuantSpec
from qlab.eval.metrics import evaluate
from qlab.methods.weight.gptq import gptq_group, hessian, output_error
from qlab.methods.weight.quip import E8P_OPT_SCALE, block_ldlq, e8p_quantizer, proxy_loss
from qlab.methods.weight.rtn import rtn_method

G_CLOSED_FORM = {"Z1": 1 / 12, "A2": 5 / (36 * math.sqrt(3)), "D4": 0.0766032, "E8": 929 / 12960}


# ---------------------------------------------------------------- E8 by hand


def e8_decode_steps(x) -> dict:
    """Conway & Sloane's E8 decoder, written out: for each coset c in {0, 1/2} of E8 = D8 u (D8 + 1/2),
    round y = x - c, and if the rounded sum is odd re-round the worst coordinate the other way; keep the coset
    whose point is nearer.

    Returns {"D8": steps, "D8+1/2": steps, "coset": the winner, "point": the E8 point}; steps hold the rounded
    vector, its sum, the worst coordinate (None if the sum was even), the point and its squared distance.
    Example (the paper's): x = (0.1, 0.1, 0.8, 1.3, 2.2, -0.6, -0.7, 0.9): D8 gives (0, 0, 1, 1, 2, 0, -1, 1)
    at 0.65, D8 + 1/2 gives 0.95, so E8's nearest point is the D8 one.
    """
    x = torch.as_tensor(x, dtype=torch.float64)
    if x.shape != (8,):
        raise ValueError(f"x must be one 8-vector, got shape {tuple(x.shape)}")
    out = {}
    for name, c in (("D8", 0.0), ("D8+1/2", 0.5)):
        y = x - c
        f = torch.round(y)
        total = int(f.sum())
        worst = None
        g = f.clone()
        if total % 2:  # odd: move the coordinate that was rounded most wrongly to its other neighbour
            err = y - f
            worst = int(err.abs().argmax())
            g[worst] += 1.0 if err[worst] >= 0 else -1.0
        point = g + c
        out[name] = {"rounded": (f + c).tolist(), "sum": total, "worst": worst, "point": point.tolist(),
                     "distance2": float(((x - point) ** 2).sum())}
    out["coset"] = "D8" if out["D8"]["distance2"] <= out["D8+1/2"]["distance2"] else "D8+1/2"
    out["point"] = out[out["coset"]]["point"]
    return out


# ---------------------------------------------------------------- E8P by hand


def e8p_code_steps(code: int) -> dict:
    """One 16-bit E8P code decoded bit by bit, as ``qlab.core.formats.lattice.e8p_decode`` does in bulk.

    code = abs_index << 8 | s. The high byte picks one of 256 sign-free patterns |u|. The low byte s holds
    the signs: p = parity of popcount(s) is the shift (0: +1/4, 1: -1/4), and s' = s xor p (bit 0 flipped when
    p = 1) has an even popcount; coordinate i is negated when bit E8P_SIGN_BIT[i] of s' is set, and coordinate
    7 once more when the pattern's sum is odd, so u = signed pattern lies in D8 + 1/2 (even sum). The point is
    u + 1/4 or u - 1/4.
    """
    if not isinstance(code, (int, np.integer)) or not 0 <= int(code) < 1 << 16:
        raise ValueError(f"an E8P code is an integer in 0 .. 65535, got {code!r}")
    code = int(code)
    abs_index, s = code >> 8, code & 255
    pattern = e8p_abs_patterns()[abs_index]
    p = bin(s).count("1") % 2
    s_even = s ^ p
    negative = [bool((s_even >> E8P_SIGN_BIT[i]) & 1) for i in range(8)]
    odd_pattern = int(pattern.sum()) % 2 == 1
    if odd_pattern:
        negative[7] = not negative[7]
    u = torch.where(torch.tensor(negative), -pattern, pattern)
    shift = -0.25 if p else 0.25
    return {"code": code, "abs_index": abs_index, "pattern": pattern.tolist(), "sign_byte": s,
            "parity": p, "sign_byte_even": s_even, "sign_bits": [(s_even >> E8P_SIGN_BIT[i]) & 1 for i in range(8)],
            "odd_pattern_flip": odd_pattern, "negative": negative, "u": u.tolist(), "u_sum": float(u.sum()),
            "shift": shift, "point": (u + shift).tolist()}


# ---------------------------------------------------------------- the codebook's MSE against its scale


def e8p_mse_vs_scale(rms_values, n_groups: int = 20_000, seed: int = 0) -> pd.DataFrame:
    """MSE per dimension of E8P on a unit Gaussian, quantized at input RMS r: x -> E8P(r x) / r.

    quip-sharp scales each rotated weight so that its RMS is ``opt_scale`` = 1.03 before rounding; this is the
    curve that number is the minimum of. Returns a table with columns rms, mse (per dimension), se (its
    standard error over the groups).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_groups, 8, generator=g, dtype=torch.float64)
    rows = []
    for r in tqdm(list(rms_values), desc="E8P scale", leave=False):
        if not r > 0:
            raise ValueError(f"rms values must be positive, got {r}")
        points, _ = e8p_nearest(r * x)
        d = ((x - points / r) ** 2).mean(dim=1)  # per group, per dimension
        rows.append({"rms": float(r), "mse": float(d.mean()), "se": float(d.std() / math.sqrt(n_groups))})
    return pd.DataFrame(rows)


def best_uniform_2bit_mse(n: int = 200_000, seed: int = 0) -> tuple[float, float]:
    """(best step, MSE) of the 4-level uniform quantizer {-3/2, -1/2, 1/2, 3/2} * step on a unit Gaussian
    (a golden-section search over the step): the scalar grid at the same 2 bits. Max (1960): 0.1188 at 0.996."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def mse(step):
        q = (torch.floor(x / step).clamp(-2, 1) + 0.5) * step
        return float(((x - q) ** 2).mean())

    lo, hi = 0.5, 1.5
    phi = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = hi - phi * (hi - lo), lo + phi * (hi - lo)
        lo, hi = (lo, b) if mse(a) < mse(b) else (a, hi)
    step = (lo + hi) / 2
    return step, mse(step)


# ---------------------------------------------------------------- rotations around RTN and GPTQ


def quantize_rotated(W: torch.Tensor, H: torch.Tensor | None, method: str, bits: int, rotate: bool, *,
                     group_size: int = 128, seed: int = 0) -> torch.Tensor:
    """W_hat in the original basis: ``method`` ('rtn' or 'gptq') at int``bits``, groups of ``group_size``,
    asymmetric min-max, applied to W, or to W' = V_m S_V W S_U V_n^T (GPTQ with H' = V_n S_U H S_U V_n^T)
    and rotated back: the registry's own path (``rtn_method`` / ``gptq_group`` with ``rotate``), de-quantized.
    float32 result. H may be None for RTN."""
    if method not in ("rtn", "gptq"):
        raise ValueError(f"method must be 'rtn' or 'gptq', got {method!r}")
    if method == "gptq" and H is None:
        raise ValueError("GPTQ needs the Hessian H = (2/N) X^T X of the layer's inputs; got H=None")
    spec = QuantSpec.integer(bits, group_size=group_size, symmetric=False)
    if method == "rtn":
        qt = rtn_method([W.float()], None, spec, rotate=rotate, seed=seed).qweights[0]
    else:
        qt = gptq_group([W.float()], H.float(), spec, rotate=rotate, seed=seed)[0]
    return qt.dequantize().float()


def rotation_sweep(layers: dict, bits=(2, 3, 4), methods=("rtn", "gptq"), seed: int = 0) -> pd.DataFrame:
    """Relative output error ||X (W - W_hat)^T||^2 / ||X W^T||^2 of RTN and GPTQ with and without the rotation.

    ``layers``: name -> (W [out, in], X [tokens, in]) (GPTQ's H is built from X; the error is measured on the
    same X). One row per (layer, method, bits, rotation)."""
    rows = []
    todo = [(n, m, b, r) for n in layers for m in methods for b in bits for r in (False, True)]
    H = {n: hessian(X) for n, (W, X) in layers.items()}
    for name, method, b, rot in tqdm(todo, desc="rotation sweep", leave=False):
        W, X = layers[name]
        W_hat = quantize_rotated(W, H[name], method, b, rot, seed=seed)
        rows.append({"layer": name, "method": method.upper(), "bits": b, "rotation": rot,
                     "rel_output_error": output_error(W, W_hat, X)})
    return pd.DataFrame(rows)


def rotation_error_table(layers: dict, bits: int = 3, group_size: int = 128, seed: int = 0,
                         top: int = 8) -> pd.DataFrame:
    """Where RTN's rounding error lands with and without the rotation: one row per (layer, rotation).

    ``layers``: name -> (W [out, in], H [in, in]), H = (2/N) X^T X of the layer's calibration inputs. With
    dW = W_hat - W (``quantize_rotated``: int``bits``, groups of ``group_size``, asymmetric min-max) and n inputs:

    * weight_error = ||dW||^2 / ||W||^2 and output_error = tr(dW H dW^T) / tr(W H W^T) (= ||X dW^T||^2 / ||X W^T||^2);
    * W_align = tr(W H W^T) / (||W||^2 tr(H) / n) and error_align = tr(dW H dW^T) / (||dW||^2 tr(H) / n): the share
      of H's energy a matrix picks up against a matrix spread evenly over the inputs (1), so that, exactly,
      output_error = weight_error * error_align / W_align. The rotation makes dW even (error_align ~ 1); NaN if dW = 0;
    * top_H: the share of tr(H) on the ``top`` inputs of largest diag(H); top_W and top_error: the mean squared
      column of W and of dW on those inputs, over the mean over all inputs;
    * uniform_ratio: ||dW||^2 over uniform rounding's prediction, sum over groups of size * step^2 / 12 with
      step = (max - min) / (2^bits - 1), in the basis that was quantized: well below 1 only if the weights sat on a
      grid that this one reproduces.
    """
    rows = []
    for name, (W, H) in layers.items():
        W, H = W.double(), H.double()
        n, d = W.shape[1], torch.diag(H)
        loud = torch.argsort(d, descending=True)[:top]

        def trace(M):  # tr(M H M^T)
            return float(torch.einsum("ij,jk,ik->", M, H, M))

        def even(M):  # tr(M H M^T) if M's energy were spread evenly over the inputs
            return float(M.pow(2).sum() * d.sum() / n)

        for rotate in (False, True):
            W_hat = quantize_rotated(W.float(), H.float(), "rtn", bits, rotate, group_size=group_size, seed=seed)
            dW = W_hat.double() - W
            Wq = RandomizedHadamard(*W.shape, seed=seed).weight(W) if rotate else W  # the basis that was rounded
            ranges = [Wq[:, j:j + group_size] for j in range(0, n, group_size)]
            uniform = sum(float((g.amax(1) - g.amin(1)).pow(2).sum()) * g.shape[1] for g in ranges)
            uniform /= 12 * (2**bits - 1) ** 2
            rows.append({"layer": name, "rotation": rotate,
                         "weight_error": float(dW.pow(2).sum() / W.pow(2).sum()), "output_error": trace(dW) / trace(W),
                         "W_align": trace(W) / even(W), "error_align": trace(dW) / even(dW) if dW.any() else math.nan,
                         "top_H": float(d[loud].sum() / d.sum()),
                         "top_W": float(W[:, loud].pow(2).sum(0).mean() / W.pow(2).sum(0).mean()),
                         "top_error": float(dW[:, loud].pow(2).sum(0).mean() / dW.pow(2).sum(0).mean()),
                         "uniform_ratio": float(dW.pow(2).sum()) / uniform})
    return pd.DataFrame(rows)


@torch.no_grad()
def whole_model_rtn(model: nn.Module, windows: torch.Tensor, reference, bits=(2, 3, 4), seed: int = 0,
                    pattern: str = "model.layers.", rotate=(False, True)) -> pd.DataFrame:
    """RTN (int, g128, asym) of every block Linear, evaluated on ``windows`` against ``reference``
    (``qlab.eval.metrics.reference_logprobs``), for each bit width and each entry of ``rotate``: False (no
    rotation), True (every Linear rotated) or a name suffix such as "v_proj" (only those rotated, the rest plain).
    The model's weights are restored afterwards (and on error). One row per (bits, rotation): ppl, KL, top-1."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(pattern)}
    if not linears:
        raise ValueError(f"no nn.Linear named {pattern}*: nothing to quantize")
    original = {n: m.weight.data.clone() for n, m in linears.items()}
    rows = []
    try:
        for b, rot in tqdm([(b, r) for b in bits for r in rotate], desc="whole model RTN", leave=False):
            for n, m in linears.items():
                on = rot if isinstance(rot, bool) else n.endswith(rot)
                m.weight.data = quantize_rotated(original[n], None, "rtn", b, on, seed=seed).to(m.weight.dtype)
            r = evaluate(model, windows, reference, progress=False)
            rows.append({"bits": b, "rotation": rot, "ppl": r["ppl"], "kl_mean": r["kl_mean"], "top1": r["top1"]})
    finally:
        for n, m in linears.items():
            m.weight.data = original[n]
    return pd.DataFrame(rows)


class RotatedLinear(nn.Module):
    """A Linear computed in the rotated basis: y = ((x S_U V_n^T) W'^T) V_m S_V + b with W' = V_m S_V W S_U V_n^T.

    With W' unquantized this is the same function as the original Linear up to round-off; QuIP# stores a
    quantized W' and applies the two small Hadamard transforms on the fly."""

    def __init__(self, linear: nn.Linear, seed: int = 0):
        super().__init__()
        self.R = RandomizedHadamard(linear.out_features, linear.in_features, seed=seed)
        self.weight = nn.Parameter(self.R.weight(linear.weight.data.double()).to(linear.weight.dtype),
                                   requires_grad=False)
        self.bias = linear.bias

    def forward(self, x):
        y = self.R.output(nn.functional.linear(self.R.input(x), self.weight))
        return y if self.bias is None else y + self.bias


@torch.no_grad()
def rotation_exactness(model: nn.Module, ids: torch.Tensor, pattern: str = "model.layers.", seed: int = 0) -> dict:
    """Run a float64 copy of ``model`` on token ids [batch, seq] before and after ``rotate_linears`` (nothing
    quantized) and return the largest changes of the residual stream (every layer's hidden state) and of the
    logits, with the number of rotated Linears. The model itself is left as it was.

    Note: Llama's RMSNorm computes in float32 and casts back, so a change far below float32's resolution
    (1e-13 here) is usually rounded away before the logits; the hidden states show the float64 round-off."""
    m = copy.deepcopy(model).double()
    before = m(input_ids=ids, output_hidden_states=True)
    n = rotate_linears(m, pattern, seed=seed)
    after = m(input_ids=ids, output_hidden_states=True)
    hidden = max(float((a - b).abs().max()) for a, b in zip(before.hidden_states, after.hidden_states))
    scale = max(float(a.abs().max()) for a in before.hidden_states)
    del m
    return {"n_rotated": n, "max_hidden_diff": hidden, "max_hidden": scale,
            "max_logit_diff": float((before.logits - after.logits).abs().max()),
            "max_logit": float(before.logits.abs().max())}


def rotate_linears(model: nn.Module, pattern: str = "model.layers.", seed: int = 0) -> int:
    """Replace every nn.Linear whose name starts with ``pattern`` by its RotatedLinear, in place. Returns the
    count."""
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(pattern)]
    if not targets:
        raise ValueError(f"no nn.Linear named {pattern}*: nothing to rotate")
    for name, lin in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, RotatedLinear(lin, seed=seed))
    return len(targets)


# ---------------------------------------------------------------- BlockLDLQ against nearest rounding


def ldlq_vs_nearest(W: torch.Tensor, X: torch.Tensor, seed: int = 0, sigma: float = 0.01) -> dict:
    """QuIP# E8P on one layer two ways: nearest-point rounding of each group of 8, and BlockLDLQ (g = 8).

    Both use the same rotation and scale (RMS(W') / 1.03). Returns the proxy losses tr(E H E^T) (H = 2/N X^T X,
    in the rotated basis, where it is the same number as in the original one) and the relative output errors."""
    H = hessian(X).double()
    R = RandomizedHadamard(*W.shape, seed=seed)
    Wr, Hr = R.weight(W.double()), R.hessian(H)
    scale = float(Wr.pow(2).mean().sqrt()) / E8P_OPT_SCALE
    nearest, _ = e8p_nearest((Wr / scale).reshape(-1, 8))
    W_near = nearest.reshape(Wr.shape) * scale
    W_ldlq = block_ldlq(Wr / scale, Hr, e8p_quantizer, g=8, sigma=sigma)[0] * scale
    out = {}
    for name, Wq in (("nearest", W_near), ("BlockLDLQ", W_ldlq)):
        out[name] = {"proxy_loss": proxy_loss(Wr, Wq, Hr) / proxy_loss(Wr, torch.zeros_like(Wr), Hr),
                     "rel_output_error": output_error(W, R.weight_inverse(Wq).float(), X)}
    return out


# ---------------------------------------------------------------- AQLM by hand


def aqlm_group_steps(t, row: int, group: int) -> dict:
    """One AQLM group rebuilt from its codes: W[row, group*d:(group+1)*d] = scale[row] * sum_m C_m[codes[m, row, g]]
    with g = group.

    ``t`` is a CodebookTensor (``qlab.methods.weight.aqlm.aqlm_quantize``). Returns the codes, the codebook
    vectors, their sum, the scale and the rebuilt group."""
    M, K, d = t.codebooks.shape
    out, inp = t.shape
    if not (0 <= row < out and 0 <= group < inp // d):
        raise ValueError(f"row must be in 0 .. {out - 1} and group in 0 .. {inp // d - 1}, got {row}, {group}")
    codes = [int(t.codes[m, row, group]) for m in range(M)]
    vectors = [t.codebooks[m, c].float() for m, c in enumerate(codes)]
    total = sum(vectors)
    scale = 1.0 if t.scale is None else float(t.scale[row])
    return {"codes": codes, "vectors": [v.tolist() for v in vectors], "sum": total.tolist(), "scale": scale,
            "group": (scale * total).tolist()}


def distinct_group_values(codebooks: torch.Tensor) -> int:
    """How many distinct d-vectors sum_m C_m[c_m] the codebooks [M, K, d] can make (at most K^M): the count
    behind an "effective" bit rate log2(count) / d per weight."""
    M, K, d = codebooks.shape
    if K ** M > 1 << 24:
        raise ValueError(f"{K}^{M} sums are too many to enumerate here")
    sums = torch.zeros(1, d, dtype=codebooks.dtype)
    for m in range(M):
        sums = (sums[:, None, :] + codebooks[m][None, :, :]).reshape(-1, d)
    return int(torch.unique(sums, dim=0).shape[0])


# ---------------------------------------------------------------- results


def two_bit_table(folder) -> pd.DataFrame:
    """The rows of a sweep folder (one JSON per configuration), as label, bits per weight (quantized Linears),
    perplexity, its float reference, KL, top-1, quantization seconds; sorted by perplexity. Empty if none."""
    rows = []
    for path in sorted(Path(folder).glob("*.json")):
        r = json.loads(path.read_text())
        rows.append({k: r.get(k) for k in ("label", "quantized_bpw", "ppl", "ppl_ref", "kl_mean", "top1",
                                           "quant_seconds", "calib_windows", "protocol")})
    cols = ["label", "quantized_bpw", "ppl", "ppl_ref", "kl_mean", "top1", "quant_seconds", "calib_windows", "protocol"]
    return pd.DataFrame(rows, columns=cols).sort_values("ppl", ignore_index=True)


# ---------------------------------------------------------------- figures


def _hexagon(center, r):
    ang = np.deg2rad(30 + 60 * np.arange(7))
    return center[0] + r * np.cos(ang), center[1] + r * np.sin(ang)


def plot_z2_vs_a2(G: dict | None = None, extent: float = 2.6, seed: int = 0):
    """Z^2 and the hexagonal lattice A2 side by side, both at one point per unit area: the points, their
    Voronoi cells (squares, hexagons), and a few random points joined to their nearest lattice point.
    ``G``: name -> (estimate, standard error), written into the titles."""
    a = math.sqrt(2 / math.sqrt(3))  # A2's minimal distance at unit area (a^2 sqrt(3) / 2 = 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 5), layout="constrained")
    rng = np.random.default_rng(seed)
    probes = rng.uniform(-1.4, 1.4, size=(12, 2))
    k = np.arange(-5, 6)
    for ax, name in zip(axes, ("Z2", "A2")):
        if name == "Z2":
            pts = np.array([(i, j) for i in k for j in k], dtype=float)
            for p in pts:
                ax.add_patch(plt.Rectangle(p - 0.5, 1, 1, fill=False, lw=0.6, color="0.6"))
        else:
            pts = np.array([(a * (i + j / 2), a * j * math.sqrt(3) / 2) for i in k for j in k])
            for p in pts:
                ax.plot(*_hexagon(p, a / math.sqrt(3)), lw=0.6, color="0.6")
        pts = pts[(np.abs(pts) <= extent + 1).all(1)]
        ax.scatter(pts[:, 0], pts[:, 1], s=18, color="C0", zorder=3)
        near = pts[np.argmin(((probes[:, None, :] - pts[None]) ** 2).sum(-1), axis=1)]
        ax.scatter(probes[:, 0], probes[:, 1], s=14, color="C3", marker="x", zorder=4)
        for p, q in zip(probes, near):
            ax.plot([p[0], q[0]], [p[1], q[1]], color="C3", lw=0.8)
        title = {"Z2": "Z² (square cells)", "A2": "A2 (hexagonal cells)"}[name]
        if G and name in G:
            est, se = G[name]
            title += f"\nG = {est:.4f} ± {se:.4f} (closed form {G_CLOSED_FORM.get(name, 1 / 12):.4f})"
        ax.set(xlim=(-extent, extent), ylim=(-extent, extent), aspect="equal", title=title)
    fig.suptitle("one point per unit area; red: random points and their nearest lattice point")
    return fig


def plot_g_estimates(table: pd.DataFrame, ax=None):
    """Monte Carlo G (columns lattice, G, se) with 2-sigma error bars, against the closed forms (columns
    closed_form) and the 1/12 of scalar rounding."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 3.8), layout="constrained")
    y = np.arange(len(table))
    ax.errorbar(table["G"], y, xerr=2 * table["se"], fmt="o", color="C0", capsize=4, label="Monte Carlo ± 2 s.e.")
    ax.scatter(table["closed_form"], y, marker="|", s=300, color="C3", label="closed form", zorder=3)
    ax.axvline(1 / 12, color="0.5", ls="--", lw=0.8, label="1/12 (scalar rounding)")
    ax.set_yticks(y, table["lattice"])
    ax.set(xlabel="normalized second moment G (MSE per dimension at unit density)",
           title="G by Monte Carlo against the closed forms")
    ax.legend(loc="lower left", fontsize=8)
    return ax.figure


def plot_mse_vs_scale(df: pd.DataFrame, chosen: float, references: dict, ax=None):
    """E8P's MSE per dimension on a unit Gaussian against the input RMS (``e8p_mse_vs_scale``), the chosen RMS
    marked, and horizontal reference levels (``references``: label -> MSE)."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    ax.errorbar(df["rms"], df["mse"], yerr=2 * df["se"], fmt="-o", ms=3, color="C0", label="E8P (2 bits)")
    ax.axvline(chosen, color="C0", ls=":", lw=1, label=f"chosen RMS {chosen:.2f}")
    for (label, v), c in zip(references.items(), ("C1", "C2", "C3", "C4")):
        ax.axhline(v, color=c, ls="--", lw=0.9, label=f"{label}: {v:.4f}")
    ax.set(xlabel="RMS of the scaled input (r in E8P(r x) / r)", ylabel="MSE per dimension",
           title="E8P on a unit Gaussian: error against scale")
    ax.legend(fontsize=8)
    return ax.figure


def plot_rotation_errors(df: pd.DataFrame):
    """Relative output error (log) against bits, one panel per method, one line per layer, solid with the
    rotation and dashed without (``rotation_sweep``'s table)."""
    methods = list(dict.fromkeys(df["method"]))
    fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 4), sharey=True, layout="constrained")
    axes = np.atleast_1d(axes)
    layers = list(dict.fromkeys(df["layer"]))
    for ax, method in zip(axes, methods):
        for i, layer in enumerate(layers):
            for rot, ls in ((False, "--"), (True, "-")):
                d = df[(df.method == method) & (df.layer == layer) & (df.rotation == rot)].sort_values("bits")
                ax.plot(d["bits"], d["rel_output_error"], ls, marker="o", ms=4, color=f"C{i}",
                        label=layer.removeprefix("model.layers.") if rot else None)
        ax.set(yscale="log", xlabel="bits (int, g128, asym)", title=method, xticks=sorted(set(df["bits"])))
    axes[0].set_ylabel("relative output error ||X(W - Ŵ)ᵀ||² / ||XWᵀ||²")
    handles, labels = axes[-1].get_legend_handles_labels()
    styles = [plt.Line2D([], [], color="k", ls=ls, label=lab) for ls, lab in (("-", "rotated"), ("--", "as stored"))]
    axes[-1].legend(handles=handles + styles, fontsize=7, loc="upper right")
    return fig
