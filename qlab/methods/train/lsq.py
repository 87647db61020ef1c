"""LSQ: Learned Step Size Quantization (Esser et al. 2020), the step ``s`` of a symmetric int grid learned
by gradient descent together with the weights.

With v = x / s and the grid [-Q_N, Q_P] (int4 restricted: Q_N = Q_P = 7), the forward pass is (eq. 1-2)

    x_hat = round(clip(v, -Q_N, Q_P)) * s

and the gradients, round's taken straight through (eq. 3 and the STE):

    d x_hat / d s = -v + round(v)    if -Q_N < v < Q_P          d x_hat / d x = 1    inside
                    -Q_N             if v <= -Q_N                                 0    outside
                    Q_P              if v >= Q_P

The step's gradient is multiplied by g = 1 / sqrt(N * Q_P) (section 2.2, eq. 5), N the number of values
sharing the step (the layer's weights per tensor, as in the paper; a row per channel; the group size per
group), so that the step's update is about as large, relative to s, as a weight's is to its own value.
(The lsq-net reproduction keeps N = all of the tensor's weights even per channel; here N follows the step.)

A worked example (s = 0.5, int4: Q_P = 7): x = 0.3 -> v = 0.6 -> round 1 -> x_hat = 0.5 and
d x_hat / d s = -0.6 + 1 = 0.4; x = 5.0 -> v = 10 -> clipped to 7 -> x_hat = 3.5, d x_hat / d s = 7.

Steps start from the spec's own rule (``qlab.core.quant.qparams``: absmax, mse ...), rather than the
paper's 2 <|v|> / sqrt(Q_P), so that step 0 of training is exactly the RTN model. The forward pass uses
the step rounded to the spec's scale dtype (fp16 by default), the value a quantized tensor stores, so a
trained layer converts to a real quantized tensor without changing a single output bit.
"""
import math

import torch

from qlab.core.formats import IntGrid
from qlab.core.quant import qparams
from qlab.core.spec import SCALE_DTYPES, QuantSpec


def check_lsq_spec(spec) -> QuantSpec:
    """LSQ learns the step of a symmetric integer grid; anything else raises a ValueError saying why."""
    spec = QuantSpec.parse(spec)
    if not isinstance(spec.grid, IntGrid) or not spec.symmetric:
        raise ValueError(f"LSQ learns the step of a symmetric int grid (e.g. 'int4-g128'), not {spec}: a lookup "
                         f"or zero-point grid has no LSQ gradient here; train it with a fixed scale "
                         f"(learned_scale=False, the plain STE)")
    if spec.double_quant:
        raise ValueError(f"LSQ learns float steps; double quantization ('dq') of the steps is not supported ({spec})")
    return spec


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Forward: x exactly. Backward: the gradient times g (LSQ's gradient scaling)."""
    return x.detach() + (x * g - (x * g).detach())


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Forward: round(x) exactly. Backward: 1 (the straight-through estimator)."""
    return x.detach().round() + (x - x.detach())


def lsq_fake_quant(x: torch.Tensor, step: torch.Tensor, q_n: float, q_p: float, g: float) -> torch.Tensor:
    """x_hat = round(clip(x / s, -Q_N, Q_P)) * s with LSQ's gradients (see the module docstring).

    ``x`` is [n_groups, group_len], ``step`` [n_groups] (one s per row).

    >>> x = torch.tensor([[0.3, 5.0]]); s = torch.tensor([0.5], requires_grad=True)
    >>> lsq_fake_quant(x, s, 7, 7, 1.0).sum().backward(); s.grad   # 0.4 + 7
    tensor([7.4000])
    """
    s = grad_scale(step, g)[:, None]
    v = torch.clamp(x / s, -q_n, q_p)
    return round_ste(v) * s


class LSQWeight(torch.nn.Module):
    """The learned steps of one weight under a spec: ``forward(W)`` is its LSQ fake quant.

    ``steps`` holds one step per group of the spec's granularity, initialised from the spec's rule on ``W``.
    ``step()`` is the step as used and stored (rounded to the spec's scale dtype, kept above a tiny floor).
    """

    def __init__(self, weight: torch.Tensor, spec):
        super().__init__()
        self.spec = check_lsq_spec(spec)
        scale, _ = qparams(weight.detach(), self.spec)
        self.steps = torch.nn.Parameter(scale.clone())
        grid = self.spec.grid
        self.q_n, self.q_p = -grid.qmin, grid.qmax
        group_len = self.spec.granularity.to_groups(weight.detach())[0].shape[1]  # N: values per step
        # (a zero-padded last group, e.g. 576 = 4 x 128 + 64, uses the full N; its padding adds 0 to the gradient)
        self.g = 1.0 / math.sqrt(group_len * self.q_p)  # eq. 5

    def step(self) -> torch.Tensor:
        dtype = SCALE_DTYPES[self.spec.scale_dtype]
        floor = torch.finfo(torch.float16).tiny  # a step must stay positive; the smallest normal fp16
        s = self.steps.clamp(min=floor)
        return s.detach().to(dtype).float() + (s - s.detach())  # forward: the stored value; backward: 1

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        gran = self.spec.granularity
        G, _ = gran.to_groups(weight.float())
        x_hat = lsq_fake_quant(G, self.step(), self.q_n, self.q_p, self.g)
        return gran.from_groups(x_hat, tuple(weight.shape)).to(weight.dtype)

    def extra_repr(self):
        return f"{self.spec}, groups={self.steps.numel()}, g={self.g:.4g}"
