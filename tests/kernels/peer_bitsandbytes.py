"""Cross-check the NF4 kernels against bitsandbytes (a peer library; not part of the pytest run).

bitsandbytes is not a qlab dependency, so run this from a separate environment that has it:

    PYTHONPATH=. /path/to/peer-venv/bin/python tests/kernels/peer_bitsandbytes.py

It quantizes with ``bitsandbytes.functional.quantize_4bit(..., quant_type='nf4', compress_statistics=True)``,
feeds bitsandbytes' own state (its "dynamic" 8-bit map for the absmax, its offset, its NF4 table) to
qlab's kernel through :class:`NF4Weight` (swapping nibbles: bitsandbytes puts the first code in the HIGH
nibble, qlab in the low one), and requires the dequantized weights to agree bit for bit with
``dequantize_4bit``; then the fused GEMV against x @ W^T.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import bitsandbytes.functional as F  # noqa: E402

from qlab.kernels.nf4 import NF4Weight, nf4_dequantize, nf4_gemv  # noqa: E402


def from_bitsandbytes(packed: torch.Tensor, state, shape) -> NF4Weight:
    p = packed.reshape(-1)
    swapped = ((p & 0xF) << 4) | (p >> 4)  # high-nibble-first -> low-nibble-first
    inner = state.state2
    return NF4Weight(swapped, state.code.float(), state.absmax, inner.code.float(), inner.absmax.float(),
                     float(state.offset), tuple(shape), state.blocksize, inner.blocksize)


def main() -> int:
    backend = "triton" if torch.cuda.is_available() else "interpret"
    failures = 0
    for shape in [(64, 128), (37, 131), (300, 96)]:
        W = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0])) * 0.02
        packed, state = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
        ref = F.dequantize_4bit(packed, state).float()
        w = from_bitsandbytes(packed, state, shape)
        ours = nf4_dequantize(w, backend=backend)
        x = torch.randn(2, shape[1])
        gemv_err = (nf4_gemv(x, w, backend=backend) - x @ ref.T).abs().max().item()
        exact = torch.equal(ours, ref)
        failures += not exact or gemv_err > 1e-5
        print(f"{shape}: dequantize bit-exact vs bitsandbytes: {exact} "
              f"(max |diff| {(ours - ref).abs().max().item():.3g}); GEMV max |err| {gemv_err:.3g}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
