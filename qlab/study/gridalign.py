"""The embedded checkpoint already sits on a 4-bit grid: Q4_1 re-quantization and alignment.

The SmolLM2-135M GGUF stores every block linear as llama.cpp **Q4_1**: blocks of 32 consecutive
weights of a row, each with an fp16 step ``d`` and an fp16 *float* minimum ``m``,

    d = (max - min) / 15,   q = clamp(round((x - min) / d), 0, 15),   x_hat = q * d + m

(llama.cpp ``quantize_row_q4_1_ref``; 4 bits + 2 x 16 bits / 32 = 5.0 bits per weight).
The float model transformers gives us holds exactly those ``x_hat`` values. Every Q4_1 block
contains its own minimum (code 0) and maximum (code 15), so re-quantizing it Q4_1-style finds
the same ``d`` and ``m`` again and reproduces the weights *exactly*. The usual int4 g32 asymmetric
spec instead uses an *integer* zero point, ``x_hat = d' * (q - z)``: the minimum can only sit at a
multiple of ``d'``, so its grid is shifted against the checkpoint's and rounding error appears
(~8 % relative weight error here). Results on this model that use groups of 32 therefore measure
alignment with the storage grid as much as the quantizer; qlab marks them (``aligned_q4_1``).
"""

from __future__ import annotations

import torch

from qlab.core.error import rel_fro

Q4_1_BLOCK = 32
Q4_1_BITS_PER_WEIGHT = 4 + 2 * 16 / Q4_1_BLOCK  # 5.0


def q4_1_fake_quant(w: torch.Tensor) -> torch.Tensor:
    """Q4_1 quantize + dequantize along the last dim, in blocks of 32, with llama.cpp's own reference
    rounding and fp16 ``d``/``min`` (byte-exact GGUF blocks from :mod:`qlab.gguf`)."""
    from qlab import gguf

    return gguf.quantize(w, "Q4_1").dequantize().to(w.dtype)


def q4_1_nbytes(numel: int) -> float:
    """Storage of ``numel`` weights in Q4_1: 20 bytes per block of 32."""
    return numel / Q4_1_BLOCK * 20


def alignment_report(weights: dict[str, torch.Tensor], spec="int4-g32-asym-minmax") -> list[dict]:
    """Relative Frobenius error of Q4_1-style re-quantization vs ``spec`` for each weight.

    Returns one row per weight: ``name``, ``q4_1_rel_err`` (0.0 on a Q4_1 checkpoint),
    ``q4_1_exact`` (bit-equal), ``spec_rel_err``.
    """
    from qlab.core.quant import fake_quant

    rows = []
    for name, w in weights.items():
        w = w.detach().float()
        w_q41 = q4_1_fake_quant(w)
        rows.append(
            {
                "name": name,
                "q4_1_rel_err": rel_fro(w, w_q41),
                "q4_1_exact": bool(torch.equal(w, w_q41)),
                "spec": str(spec),
                "spec_rel_err": rel_fro(w, fake_quant(w, spec)),
            }
        )
    return rows
