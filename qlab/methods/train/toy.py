"""Two toys for training through a rounding: one weight (the loss landscape, the STE, oscillation) and one
layer (QAT of a linear layer against its float output, fixed or learned steps).

One weight w, quantized as q(w) = s * round(w / s), fitted to a target t with the loss L(w) = (q(w) - t)^2:

* the landscape is a staircase: flat between rounding boundaries (s * (k + 1/2)), so dL/dw = 0 almost
  everywhere, and gradient descent with the true gradient never moves;
* the straight-through estimator (STE) uses dq/dw = 1, so the update is -lr * 2 (q(w) - t): w walks to the
  rounding boundary between the two grid points around t and then oscillates across it (Nagel et al. 2022):
  on one side q is below t and the gradient pushes w up, on the other q is above t and it pushes w down.

    >>> traj = ste_descent(0.1, s=0.25, target=0.6, lr=0.05, steps=60)
    >>> round(traj.w[-1], 3), traj.flips > 0        # ends at the boundary 0.625 between 0.5 and 0.75
    (0.625, True)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qlab.core.quant import fake_quant
from qlab.methods.train.qat import QATLinear


def rounded(w, s: float):
    """q(w) = s * round(w / s) (round half to even, as torch.round)."""
    return s * torch.round(torch.as_tensor(w, dtype=torch.float64) / s)


def landscape(w: torch.Tensor, s: float, target: float) -> dict:
    """The loss of the float weight (w - t)^2 and of the rounded one (q(w) - t)^2 over a grid of w."""
    w = torch.as_tensor(w, dtype=torch.float64)
    return {"w": w, "float": (w - target) ** 2, "rounded": (rounded(w, s) - target) ** 2}


@dataclass
class Trajectory:
    w: list  # the weight after each step (w[0]: the start)
    q: list  # q(w) after each step
    flips: int  # steps where q(w) changed
    flip_backs: int  # steps where q(w) returned to its value of two steps before (oscillation)


def ste_descent(w0: float, s: float, target: float, lr: float, steps: int, estimator: str = "ste") -> Trajectory:
    """Gradient descent on L(w) = (q(w) - t)^2 with autograd, the fake quant written three ways:

    * ``"ste"``:      q = w + (s * round(w / s) - w).detach()   (forward q(w), backward 1)
    * ``"round"``:    q = s * round(w / s)                      (autograd's gradient of round: 0)
    * ``"detached"``: q = (s * round(w / s)).detach()            (no graph: w gets no gradient at all)
    """
    if estimator not in ("ste", "round", "detached"):
        raise ValueError(f"estimator must be 'ste', 'round' or 'detached', got {estimator!r}")
    w = torch.tensor(float(w0), dtype=torch.float64, requires_grad=True)
    ws, qs = [float(w.detach())], [float(rounded(w.detach(), s))]
    for _ in range(steps):
        q_hard = s * torch.round(w / s)
        q = {"ste": w + (q_hard - w).detach(), "round": q_hard, "detached": q_hard.detach()}[estimator]
        loss = (q - target) ** 2
        grad = torch.autograd.grad(loss, w, allow_unused=True)[0] if loss.requires_grad else None
        with torch.no_grad():
            if grad is not None:
                w -= lr * grad
        ws.append(float(w.detach()))
        qs.append(float(rounded(w.detach(), s)))
    flips = sum(a != b for a, b in zip(qs, qs[1:]))
    backs = sum(c == a and b != a for a, b, c in zip(qs, qs[1:], qs[2:]))
    return Trajectory(ws, qs, flips, backs)


def layer_qat(bits: int = 3, learned_scale: bool = False, steps: int = 100, lr: float = 1e-4, seed: int = 0,
              shape=(32, 128), tokens: int = 256) -> dict:
    """QAT of one linear layer: a QATLinear (int ``bits``, per output channel, symmetric; LSQ steps or the
    absmax rule) starts from a float weight W and is trained so that its output matches X W^T on random
    inputs X (Adam). Returns the relative output error of round to nearest (step 0) and after training, the
    losses, and the code flips per step."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(*shape, generator=g) * 0.05
    X = torch.randn(tokens, shape[1], generator=g)
    target = X @ W.T
    linear = torch.nn.Linear(shape[1], shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(W)
    spec = f"int{bits}-channel"
    layer = QATLinear.from_linear(linear, spec, learned_scale=learned_scale)
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    rel = lambda: float(((layer(X) - target).norm() / target.norm()).detach())  # noqa: E731
    rtn = float(((X @ fake_quant(W, spec).T - target).norm() / target.norm()))
    losses, flips, prev = [], [], layer.quantized_weight().codes()
    for _ in range(steps):
        loss = ((layer(X) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        codes = layer.quantized_weight().codes()
        flips.append(int((codes != prev).sum()))
        prev = codes
    return {"rtn_error": rtn, "qat_error": rel(), "losses": losses, "flips": flips, "spec": spec,
            "learned_scale": learned_scale}
