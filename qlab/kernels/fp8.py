"""FP8 E4M3 quantization of activations, with a dynamic scale per token or per tensor.

E4M3 (OCP FP8, "e4m3fn": no infinities, largest finite value 448) has 3 mantissa bits, so its
relative spacing is 2**-3 near every power of two. A scale maps the largest magnitude onto 448:

    s = max |x| / 448        (over a row for 'token', over the whole tensor for 'tensor')
    q = fp8_e4m3(clamp(x / s, -448, 448))     (round to nearest even; all-zero input gets s = 1)

and x is approximately q * s. The cast must match ``torch.Tensor.to(torch.float8_e4m3fn)`` bit for
bit. Example: x = [1.0, -3.5, 0.3], per tensor: s = 3.5 / 448 = 1/128, x / s = [128, -448, 38.4],
and 38.4 lies between the E4M3 neighbours 36 and 40, so it becomes 40.

A KV cache also quantizes with a *static* scale (vLLM's k_scale / v_scale, from calibration): pass ``scale=``
and values beyond 448 * s saturate. :func:`dequantize_fp8` decodes the codes back, q * s, from their bits:
E4M3 byte = sign | exponent e (4 bits, bias 7) | mantissa m (3 bits), value (1 + m/8) 2**(e-7), or m 2**-9 when
e = 0 (0x7F and 0xFF are NaN).
"""
from __future__ import annotations

import torch

from qlab.core.quant import validate
from qlab.kernels import dispatch

tl = None  # triton.language, bound on first launch (see qlab.kernels.dispatch.Kernel)

FP8_MAX = 448.0
GRANULARITIES = ("token", "tensor")


def quantize_fp8_reference(x: torch.Tensor, granularity: str = "token",
                           scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: (q float8_e4m3fn [M, K], scale fp32 [M] or [1]) for x [M, K]; a given ``scale`` ([1],
    per tensor) is used as it is."""
    x = x.float()
    if scale is None:
        absmax = x.abs().amax(dim=-1) if granularity == "token" else x.abs().amax().reshape(1)
        scale = torch.where(absmax > 0, absmax / FP8_MAX, torch.ones_like(absmax))
    s = scale[:, None] if granularity == "token" else scale
    q = (x / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


@dispatch.kernel(default=dict(BLOCK_K=64),
                 autotune=[dict(BLOCK_K=b, num_warps=w) for b, w in [(256, 2), (512, 4), (1024, 4), (2048, 8)]],
                 key=("K",))
def _absmax_kernel(x_ptr, amax_ptr, K, stride_xm, PER_TOKEN: tl.constexpr, BLOCK_K: tl.constexpr):
    m = tl.program_id(0)
    rk = tl.arange(0, BLOCK_K)
    running = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + m * stride_xm + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
        running = tl.maximum(running, tl.abs(x))
    amax = tl.max(running, axis=0)
    if PER_TOKEN:
        tl.store(amax_ptr + m, amax)
    else:  # every row folds its maximum into one cell (amax >= 0, so a float atomic max is safe)
        tl.atomic_max(amax_ptr, amax)


@dispatch.kernel(default=dict(BLOCK_K=64),
                 autotune=[dict(BLOCK_K=b, num_warps=w) for b, w in [(256, 2), (512, 4), (1024, 4), (2048, 8)]],
                 key=("K",))
def _quantize_kernel(x_ptr, q_ptr, amax_ptr, scale_ptr, K, stride_xm, stride_qm,
                     PER_TOKEN: tl.constexpr, BLOCK_K: tl.constexpr, STATIC: tl.constexpr = False):
    m = tl.program_id(0)
    row = m if PER_TOKEN else 0
    if STATIC:  # a given scale (per tensor), read as it is
        scale = tl.load(scale_ptr + row)
    else:
        amax = tl.load(amax_ptr + row)
        scale = tl.where(amax > 0, tl.div_rn(amax, 448.0), 1.0)
        tl.store(scale_ptr + row, scale)  # per tensor: every program writes the same value
    rk = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + m * stride_xm + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
        v = tl.minimum(tl.maximum(tl.div_rn(x, scale), -448.0), 448.0)
        # Round to the E4M3 grid with exact fp32 arithmetic and write the byte ourselves: the grid
        # spacing near v is 2**(e - 3) for |v| in [2**e, 2**(e+1)), and 2**-9 below 2**-6 (subnormals).
        # (No fp8 type inside the kernel: Triton 3.9's interpreter rounds ties away from zero when
        # casting, and GPUs before sm_89 lack the conversion.)
        bits = v.to(tl.int32, bitcast=True)
        e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # the binade of |v|, floored at the subnormal one
        ulp = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2**(e-3), built from its exponent bits
        t = tl.abs(v) / ulp  # exact: ulp is a power of two
        r = tl.floor(t + 0.5)
        r = tl.where((r - t == 0.5) & (r - 2.0 * tl.floor(r * 0.5) != 0.0), r - 1.0, r)  # ties to even
        # |q| = r * 2**(e-3) with r in [8, 16] (or [0, 16] at e = -6) has the 7-bit code (e + 6) * 8 + r:
        # exponent field e + 7 above the mantissa's 3 bits, r = 16 carrying into the next binade.
        code = (e + 6) * 8 + r.to(tl.int32)
        code = tl.where(bits < 0, code | 0x80, code)  # the sign bit (keeps -0.0, as torch does)
        tl.store(q_ptr + m * stride_qm + k0 + rk, code.to(tl.uint8), mask=k0 + rk < K)


def quantize_fp8(x: torch.Tensor, granularity: str = "token", backend: str | None = None,
                 scale: float | torch.Tensor | None = None):
    """(q float8_e4m3fn [..., K], scale fp32) with a dynamic scale per token (row) or per tensor.

    The scale has shape x.shape[:-1] for 'token' and [1] for 'tensor'; dequantize with q.float() * scale
    (:func:`dequantize_fp8`). ``scale`` (granularity 'tensor' only) is a static scale > 0 used as given.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if scale is not None:
        if granularity != "tensor":
            raise ValueError("a static scale is one per tensor: pass scale= with granularity='tensor'")
        scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device).reshape(1)
        if not (torch.isfinite(scale).all() and scale.item() > 0):
            raise ValueError(f"scale must be a finite float > 0 (absmax / 448 from calibration), got {scale.item()}")
    backend = dispatch.resolve(backend)
    validate(x, "x")  # NaN/Inf would become different codes in torch and in the kernel
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    per_token = granularity == "token"
    if backend == "torch":
        q, scale = quantize_fp8_reference(x2, granularity, scale)
    else:
        m, k = x2.shape
        n_scales = m if per_token else 1
        amax = torch.zeros(n_scales, dtype=torch.float32, device=x.device)
        static = scale is not None
        scale = scale.clone() if static else torch.empty(n_scales, dtype=torch.float32, device=x.device)
        q = torch.empty(x2.shape, dtype=torch.uint8, device=x.device)  # E4M3 bit patterns
        if not static:
            _absmax_kernel.launch(backend, (m,), x2, amax, k, x2.stride(0), PER_TOKEN=per_token)
        _quantize_kernel.launch(backend, (m,), x2, q, amax, scale, k, x2.stride(0), q.stride(0), PER_TOKEN=per_token,
                                STATIC=static)
        q = q.view(torch.float8_e4m3fn)
    return q.reshape(x.shape), scale.reshape(x.shape[:-1]) if per_token else scale


def dequantize_fp8_reference(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Torch reference: q.float() * scale, with ``scale`` of shape q.shape[:-1] (per token) or [1]."""
    s = scale.reshape(*q.shape[:-1], 1) if scale.numel() > 1 else scale.reshape(())
    return (q.float() * s).to(dtype)


@dispatch.kernel(default=dict(BLOCK_K=64),
                 autotune=[dict(BLOCK_K=b, num_warps=w) for b, w in [(256, 2), (512, 4), (1024, 4)]], key=("K",))
def _dequantize_kernel(q_ptr, scale_ptr, out_ptr, K, PER_TOKEN: tl.constexpr, BLOCK_K: tl.constexpr):
    m = tl.program_id(0)
    scale = tl.load(scale_ptr + (m if PER_TOKEN else 0))
    rk = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + rk < K
        code = tl.load(q_ptr + m * K + k0 + rk, mask=mask, other=0).to(tl.int32)
        e = (code >> 3) & 0xF
        frac = code & 0x7
        # (8 + m) 2**(e - 10) for a normal code, m 2**-9 for a subnormal (e = 0): exact in fp32
        ulp = ((tl.maximum(e, 1) - 10 + 127) << 23).to(tl.float32, bitcast=True)
        magnitude = tl.where(e > 0, (frac + 8).to(tl.float32), frac.to(tl.float32)) * ulp
        magnitude = tl.where((e == 15) & (frac == 7), float("nan"), magnitude)
        value = tl.where(code >= 128, -magnitude, magnitude)
        tl.store(out_ptr + m * K + k0 + rk, value * scale, mask=mask)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32, backend: str | None = None):
    """x ~ q * scale for E4M3 codes q [..., K] and the scale :func:`quantize_fp8` returned (x.shape[:-1] or [1])."""
    if q.dtype != torch.float8_e4m3fn:
        raise ValueError(f"q must hold float8_e4m3fn codes, got {q.dtype}")
    per_token = scale.numel() > 1  # one scale: per tensor (or a single token, the same thing)
    if per_token and scale.numel() != q.shape[:-1].numel():
        raise ValueError(f"a per-token scale has shape q.shape[:-1] = {tuple(q.shape[:-1])}, got {tuple(scale.shape)}")
    backend = dispatch.resolve(backend)
    if backend == "torch":
        return dequantize_fp8_reference(q, scale, dtype)
    q2 = q.reshape(-1, q.shape[-1]).contiguous().view(torch.uint8)
    out = torch.empty(q2.shape, dtype=torch.float32, device=q.device)  # cast to dtype by torch: the interpreter's
    _dequantize_kernel.launch(backend, (q2.shape[0],), q2, scale.float().contiguous().reshape(-1), out,  # bf16 cast
                              q2.shape[1], PER_TOKEN=per_token, enable_fp_fusion=False)  # does not round to nearest
    return out.reshape(q.shape).to(dtype)
