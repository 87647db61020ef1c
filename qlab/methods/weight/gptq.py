"""GPTQ (Frantar et al. 2023): quantize a weight one column at a time, pushing each column's error
onto the columns not yet quantized, weighted by the inverse Hessian of the layer's squared error.

The layer objective for a Linear ``W [out, in]`` on calibration inputs ``X [n, in]`` is

    || X W^T - X W_hat^T ||^2  =  (n / 2) tr( (W - W_hat) H (W - W_hat)^T ),    H = (2 / n) X^T X   (eq. 1)

Each row is an independent quadratic problem with the same H. Optimal Brain Quantization (eq. 2-3):
quantizing weight ``q`` to ``quant(w_q)`` costs ``(w_q - quant(w_q))^2 / [H^-1]_qq`` and the best
compensation of the remaining weights F is

    delta_F = - (w_q - quant(w_q)) / [H^-1]_qq  *  (H^-1)_{:, q}                                  (eq. 3)

GPTQ's three insights: (1) quantize all rows in the *same* column order, so H^-1 is shared;
(2) the rows of H^-1 needed along the sweep are exactly the rows of the upper Cholesky factor
``Hinv = chol(H^-1)^T`` (eq. 5), so no inverse has to be updated; (3) the error updates of a block of
B columns are applied lazily to the rest of the matrix in one matmul (block 128).

Practicalities from the reference code (IST-DASLab/gptq): dampening ``percdamp * mean(diag H)`` added
to the diagonal; inputs that never fire (diag H = 0) get H_jj = 1 and a zero weight column; optional
act-order (columns by decreasing diag H, the "most active" inputs first) with *static* groups, so the
groups stay contiguous in the original order and the result is an ordinary grouped tensor.

Tiny worked example (``percdamp=0``, one row, int4 with scale 1, H = [[1, .5], [.5, 1]]):
W = [3.4, 1.4]. Column 0 rounds to 3 (error 0.4); the update adds 0.5 * 0.4 to column 1: 1.6 -> 2.
GPTQ gives [3, 2] (proxy error 0.28) where round-to-nearest gives [3, 1] (0.48).
"""
from dataclasses import dataclass, replace
import math

import torch

from qlab.core.granularity import PerChannel, PerTensor
from qlab.core.quant import qparams, quantize, validate
from qlab.core.rotations import RandomizedHadamard
from qlab.core.spec import QuantSpec
from qlab.core.tensor import QuantizedTensor, RotatedTensor
from qlab.methods.base import QuantResult
from qlab.core.scales import fake_quant_groups


def hessian(X: torch.Tensor) -> torch.Tensor:
    """H = (2 / n) X^T X for inputs X [..., in] (all leading dims are tokens), in float32 accumulated in float64."""
    if X.dim() == 0 or X.numel() == 0:
        raise ValueError(f"H needs at least one calibration input; got X of shape {tuple(X.shape)}")
    X = X.reshape(-1, X.shape[-1]).double()
    return (2.0 / X.shape[0] * X.T @ X).float()


def gram(X: torch.Tensor, block: int = 256) -> torch.Tensor:
    """X^T X for X [tokens, in], computing only the blocks on and above the diagonal (``block`` rows at a
    time) and mirroring them below it: for 1536 inputs about 60% of the time of ``X.T @ X``. Every entry is
    still one dot product over the tokens: with MKL and a block that is a multiple of 64, the same bits."""
    G = X.new_empty(X.shape[1], X.shape[1])
    for i in range(0, X.shape[1], block):
        rows = X[:, i:i + block].T @ X[:, i:]  # G[i:i+block, i:]
        G[i:i + block, i:] = rows
        G[i + block:, i:i + block] = rows[:, block:].T
    return G


class HessianAccumulator:
    """Running H = (2 / n) sum_t x_t x_t^T over batches of inputs, as in the reference ``add_batch``.

    >>> acc = HessianAccumulator(2); acc.add(torch.tensor([[1., 0.], [1., 2.]])); acc.H
    tensor([[2., 2.],
            [2., 4.]])
    """

    def __init__(self, in_features: int):
        self.XtX = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor):
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.XtX += gram(x).double()  # one batch in float32, the running sum in float64
        self.n += x.shape[0]

    @property
    def H(self) -> torch.Tensor:
        if self.n == 0:
            raise ValueError("no calibration inputs were added")
        return (2.0 / self.n * self.XtX).float()


@dataclass
class GPTQSweep:
    """Everything a sweep produced, in the ORIGINAL column order.

    W_hat:      the quantized weight (dequantized values), [out, in]
    scale, zero_point: one per group, shaped as ``spec.granularity.scale_shape`` ([out, n_groups] for g)
    losses:     per column, sum over rows of (w - q)^2 / (2 [Hinv]_ii^2): the OBQ cost of each column
    err:        per column, the scaled errors (w - q) / [Hinv]_ii fed forward, [out, in]
    perm:       the column order of the sweep (arange unless act-order)
    """

    W_hat: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    losses: torch.Tensor
    err: torch.Tensor
    perm: torch.Tensor


def _column_groups(spec: QuantSpec, shape) -> int:
    """How many consecutive input columns share a scale (per row); raise for granularities GPTQ cannot sweep."""
    try:
        return spec.granularity.columns_per_scale(tuple(shape))
    except ValueError as e:
        raise ValueError(f"GPTQ sweeps the input columns of a [out, in] weight: {e}") from None


def _qparams(Wg: torch.Tensor, spec: QuantSpec):
    """Scale and zero point (or float minimum) per row of a slice of columns, chosen with the spec's own
    rule (and its scale storage dtype, so that the sweep rounds with exactly the scales that will be stored)."""
    gran = PerChannel(0) if spec.granularity.per_row(tuple(Wg.shape)) else PerTensor()
    scale, zp = qparams(Wg, replace(spec, granularity=gran))
    scale = scale.expand(Wg.shape[0]).clone()
    return scale, None if zp is None else zp.expand(Wg.shape[0]).clone()


def _inverse_hessian_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Hinv = upper Cholesky factor of (H + damp I)^-1, damp = percdamp * mean(diag H)."""
    H = H.clone()
    idx = torch.arange(H.shape[0])
    H[idx, idx] += percdamp * torch.mean(torch.diag(H))
    L, info = torch.linalg.cholesky_ex(H)
    if info != 0:
        raise ValueError(f"H + damp I is not positive definite (percdamp={percdamp}); increase percdamp")
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def gptq_sweep(W: torch.Tensor, H: torch.Tensor, spec, *, block_size: int = 128, percdamp: float = 0.01,
               act_order: bool = False, perm: torch.Tensor | None = None) -> GPTQSweep:
    """Run the GPTQ sweep (Algorithm 1) and return the quantized weight, its scales and the per-column losses.

    ``perm`` (for exploring why the order matters) sweeps the columns in any given order; like act-order
    it uses static groups. ``act_order=True`` is ``perm = argsort(diag H, descending)``.
    """
    spec = QuantSpec.parse(spec)
    validate(W, "weight")
    validate(H, "Hessian")
    if W.dim() != 2:
        raise ValueError(f"GPTQ quantizes a 2-d weight [out, in], got shape {tuple(W.shape)}")
    rows, columns = W.shape
    if H.shape != (columns, columns):
        raise ValueError(f"H must be [{columns}, {columns}] for a weight with {columns} input columns, got {tuple(H.shape)}")
    if spec.double_quant:
        raise ValueError("GPTQ with double-quantized scales is not supported; quantize the scales afterwards")
    if block_size < 1 or percdamp < 0:
        raise ValueError("block_size must be >= 1 and percdamp >= 0")
    group = _column_groups(spec, W.shape)
    grid = spec.grid

    dtype = torch.promote_types(W.dtype, torch.float32)  # float32, or float64 if W is float64
    W = W.detach().to(dtype).clone()
    H = H.detach().to(dtype).clone()
    dead = torch.diag(H) == 0  # inputs that never fired in calibration: no information about their error
    H[dead, dead] = 1  # decoupled from the rest, so those columns round to nearest (the reference zeroes them,
    #                    which is wrong the day they fire)

    if perm is not None and (act_order or sorted(perm.tolist()) != list(range(columns))):
        raise ValueError("perm must be a permutation of the input columns (and excludes act_order)")
    if perm is None:
        perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(columns)
    reordered = not torch.equal(perm, torch.arange(columns))

    n_groups = math.ceil(columns / group)
    scale = torch.zeros(rows, n_groups, dtype=dtype)
    zero_point = None if spec.symmetric else torch.zeros(rows, n_groups, dtype=dtype)
    static = reordered or group == columns
    if static:  # scales from the (not yet updated) weight, up front: groups stay contiguous in the original order
        for g in range(n_groups):
            scale[:, g], zp = _qparams(W[:, g * group:(g + 1) * group], spec)
            if zp is not None:
                zero_point[:, g] = zp

    W, H = W[:, perm], H[perm][:, perm]
    Hinv = _inverse_hessian_cholesky(H, percdamp)

    order = perm.tolist()
    Q = torch.zeros_like(W)
    Err = torch.zeros_like(W)
    Losses = torch.zeros_like(W)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not static and col % group == 0:  # a new group: choose its scale on the updated weights
                end = min(col + group, columns)
                Wg = W1[:, i:end - i1]
                if end > i2:  # the group runs past this block: apply the pending block updates first
                    Wg = torch.cat([Wg, W[:, i2:end] - Err1[:, :i] @ Hinv[i1:col, i2:end]], dim=1)
                s, zp = _qparams(Wg, spec)
                scale[:, col // group] = s
                if zp is not None:
                    zero_point[:, col // group] = zp
            g = order[col] // group
            s = scale[:, g]
            zp = None if zero_point is None else zero_point[:, g]
            w = W1[:, i]
            if spec.float_min:  # zero_point holds the float minima: x_hat = s q + minimum
                q = fake_quant_groups(w[:, None], s, None, grid, zp)[:, 0]
            else:
                q = fake_quant_groups(w[:, None], s, zp, grid)[:, 0]  # grid.round(w / s + zp), back to values
            err = (w - q) / Hinv1[i, i]
            Q[:, col] = q
            Err1[:, i] = err
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)  # eq. 3 within the block: W -= err * Hinv[i, i:]
        Err[:, i1:i2] = Err1
        Losses[:, i1:i2] = Err1**2 / 2  # (w - q)^2 / (2 [Hinv]_ii^2)
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of everything after the block

    inv = torch.argsort(perm)
    scale_shape = spec.granularity.scale_shape((rows, columns))
    return GPTQSweep(
        W_hat=Q[:, inv],
        scale=scale.reshape(scale_shape) if scale_shape else scale[0, 0],
        zero_point=None if zero_point is None else (zero_point.reshape(scale_shape) if scale_shape else zero_point[0, 0]),
        losses=Losses[:, inv].sum(dim=0),
        err=Err[:, inv],
        perm=perm,
    )


def _offset(spec, zero_point) -> dict:
    """The sweep's per-group offsets as quantize's keyword: integer zero points, or float minima ('fmin')."""
    return {"minimum": zero_point} if spec.float_min else {"zero_point": zero_point}


def gptq(W, H: torch.Tensor, spec, *, block_size: int = 128, percdamp: float = 0.01,
         act_order: bool = False) -> QuantizedTensor:
    """GPTQ-quantize ``W`` (a tensor [out, in] or an nn.Linear) given its Hessian ``H = (2/n) X^T X``.

    Returns the same ``QuantizedTensor`` as round-to-nearest: ``quantize(W_hat, spec, scale, zero_point)``
    of the sweep's final weight, whose codes are exactly the ones the sweep chose.
    """
    W = W.weight.data if isinstance(W, torch.nn.Linear) else W
    spec = QuantSpec.parse(spec)
    sweep = gptq_sweep(W, H, spec, block_size=block_size, percdamp=percdamp, act_order=act_order)
    # re-quantize the float32 W_hat (a bf16 copy could round to a neighbouring code), keep W's dtype
    qt = quantize(sweep.W_hat, spec, scale=sweep.scale, **_offset(spec, sweep.zero_point))
    qt.dtype = W.dtype
    return qt


def gptq_shared(weights: list, H: torch.Tensor, spec, *, block_size: int = 128, percdamp: float = 0.01,
                act_order: bool = False) -> list:
    """GPTQ for several Linears that read the same input (q/k/v, gate/up) and so share one H.

    Every row of a weight is its own least-squares problem with the same H (insight 1 above), so the rows
    of all the weights can be stacked and swept together: one Cholesky factor and one column loop instead of
    one per Linear, and the same codes, scales and zero points as quantizing each Linear on its own.
    Returns one QuantizedTensor per weight, in order.
    """
    weights = [w.weight.data if isinstance(w, torch.nn.Linear) else w for w in weights]
    if not weights or any(w.dim() != 2 or w.shape[1] != weights[0].shape[1] for w in weights):
        raise ValueError(f"weights sharing an input must be 2-d with the same input width, got "
                         f"{[tuple(w.shape) for w in weights]}")
    spec = QuantSpec.parse(spec)
    if not spec.granularity.per_row(tuple(weights[0].shape)) and len(weights) > 1:
        raise ValueError(f"{spec.granularity} scales span rows: stacking weights would share them; quantize them one by one")
    stacked = torch.cat([w.detach().to(torch.promote_types(w.dtype, torch.float32)) for w in weights])
    sweep = gptq_sweep(stacked, H, spec, block_size=block_size, percdamp=percdamp, act_order=act_order)
    out, start = [], 0
    for w in weights:
        rows = slice(start, start + w.shape[0])
        per_row = lambda t: t.reshape(stacked.shape[0], -1)[rows]  # noqa: E731  (groups and blocks never straddle rows)
        zp = None if sweep.zero_point is None else per_row(sweep.zero_point)
        qt = quantize(sweep.W_hat[rows], spec, scale=per_row(sweep.scale), **_offset(spec, zp))
        qt.dtype = w.dtype
        out.append(qt)
        start += w.shape[0]
    return out


def gptq_group(weights: list, H: torch.Tensor, spec, *, rotate: bool = False, seed: int = 0, block_size: int = 128,
               percdamp: float = 0.01, act_order: bool = False) -> list:
    """GPTQ of Linears that read one input, given its H: one sweep over their stacked rows (``gptq_shared``)
    when the scales are per row, or one sweep each (per-tensor scales). One QTensor per weight, in order.

    ``rotate``: quantize each W' = V_m S_V W S_U V_n^T (float32) against H' = V_n S_U H S_U V_n^T and return
    ``RotatedTensor``s (QuIP's incoherence processing around GPTQ). One ``seed`` draws the same S_U for every
    weight of the group (``RandomizedHadamard`` draws S_U first), so H is rotated once and the input once.
    """
    weights = [w.weight.data if isinstance(w, torch.nn.Linear) else w for w in weights]
    spec = QuantSpec.parse(spec)
    kw = dict(block_size=block_size, percdamp=percdamp, act_order=act_order)
    if rotate:
        rotations = [RandomizedHadamard(*W.shape, seed=seed) for W in weights]  # refuse widths with no Hadamard
        Hr = rotations[0].hessian(H.double()).float()
        rotated = [R.weight(W.double()).to(torch.promote_types(W.dtype, torch.float32))
                   for R, W in zip(rotations, weights)]
        inner = gptq_group(rotated, Hr, spec, **kw)
        return [RotatedTensor.of(q, R, W.dtype) for q, R, W in zip(inner, rotations, weights)]
    if spec.granularity.per_row(tuple(weights[0].shape)):
        return gptq_shared(weights, H, spec, **kw)
    return [gptq(W, H, spec, **kw) for W in weights]


def gptq_method(weights, X, spec, names=None, *, rotate: bool = False, seed: int = 0, block_size: int = 128,
                percdamp: float = 0.01, act_order: bool = False) -> QuantResult:
    """The registry's GPTQ: H = (2/n) X^T X accumulated over the calibration batches (as the reference's
    ``add_batch``), then ``gptq_group`` (``rotate``: in the randomized Hadamard basis, with H rotated too)."""
    if not X:
        raise ValueError("GPTQ needs calibration inputs X")
    acc = HessianAccumulator(weights[0].shape[1])
    for x in X:
        acc.add(x)
    return QuantResult(gptq_group(weights, acc.H, spec, rotate=rotate, seed=seed, block_size=block_size,
                                  percdamp=percdamp, act_order=act_order))


# --- Measuring a sweep: the layer's output error, and how it depends on the column order -----------------


def output_error(W, W_hat, X: torch.Tensor) -> float:
    """Relative output error of a quantized layer on inputs X [n, in]: the objective of eq. 1, normalised,

        || X (W - W_hat)^T ||^2 / || X W^T ||^2   =   tr(D H D^T) / tr(W H W^T),   D = W - W_hat, H = hessian(X).

    ``W`` and ``W_hat`` may also be lists of weights that read the same X (q/k/v): numerators and
    denominators are then summed over the list. Example: X = I gives ||W - W_hat||_F^2 / ||W||_F^2.
    """
    Ws, W_hats = (W, W_hat) if isinstance(W, (list, tuple)) else ([W], [W_hat])
    if len(Ws) != len(W_hats) or any(a.shape != b.shape for a, b in zip(Ws, W_hats)):
        raise ValueError("W and W_hat must have the same shapes")
    X = X.reshape(-1, X.shape[-1]).float()
    num = sum(float((X @ (A.float() - B.float()).T).double().pow(2).sum()) for A, B in zip(Ws, W_hats))
    den = sum(float((X @ A.float().T).double().pow(2).sum()) for A in Ws)
    return num / den


def column_orders(H: torch.Tensor, seed: int = 0) -> dict:
    """Four orders in which to sweep the columns: natural (None), act-order (diag H descending, GPTQ's
    choice: the most active inputs first, while many columns remain to absorb their error), a seeded
    random permutation, and reverse act-order (diag H ascending, the least active first)."""
    d = torch.diag(H)
    return {
        "natural": None,
        "act-order (diag H descending)": torch.argsort(d, descending=True),
        "random": torch.randperm(len(d), generator=torch.Generator().manual_seed(seed)),
        "reverse (diag H ascending)": torch.argsort(d),
    }


def compare_orders(W: torch.Tensor, H: torch.Tensor, spec, inputs: dict, orders: dict | None = None,
                   percdamp: float = 0.01):
    """Relative output error (``output_error``) of GPTQ swept in each column order, and of RTN (the last
    row, no error feedback), on each input set. ``inputs``: {set name: X [n, in]}, e.g. calibration and
    held-out tokens; ``orders``: {name: perm or None} (default ``column_orders(H)``).
    Returns a DataFrame, one row per order, one column per input set."""
    import pandas as pd

    from qlab.methods.weight.rtn import rtn

    spec = QuantSpec.parse(spec)
    orders = column_orders(H) if orders is None else orders
    W_hats = {name: gptq_sweep(W, H, spec, percdamp=percdamp, perm=perm).W_hat for name, perm in orders.items()}
    W_hats["RTN (no feedback)"] = rtn(W, spec).dequantize()
    rows = {name: {s: output_error(W, W_hat, X) for s, X in inputs.items()} for name, W_hat in W_hats.items()}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("order")
