"""Write e81b_reference.json: a digest of the second-stage codebook of quip-sharp's 3-bit E8P, from its source.

quip-sharp (github.com/Cornell-RelaxML/quip-sharp, commit 1d8f873e9a2a8b86b12bb1064c312c5689b77d98) builds 3 bits
per weight as E8P (16 bits per 8 weights) plus a residual stage with 256 codewords (8 bits per 8 weights):
get_e81bgrid in lib/codebook/latticee8_padded12_rvq3bit.py. That module imports its CUDA extension at the top,
so get_e81bgrid is transcribed below line for line (same torch calls). The module's constants are recorded too:
E8P12RVQ3B_codebook has opt_scale 0.98 and opt_resid_scale 2.04; E8P12RVQ4B_codebook (latticee8_padded12_rvq4bit.py,
E8P twice) has opt_scale 1.03 and opt_resid_scale 3.45. qlab's own construction (qlab/core/formats/lattice.py,
``e81b_codebook``) is written differently and tests/core/formats/test_lattice_rvq.py compares it with this digest.

Run from the repository root:  .venv/bin/python tests/data/lattice/make_e81b_reference.py
"""
import hashlib
import json
from pathlib import Path

import torch

SOURCE = dict(repo="Cornell-RelaxML/quip-sharp", commit="1d8f873e9a2a8b86b12bb1064c312c5689b77d98",
              file="lib/codebook/latticee8_padded12_rvq3bit.py", functions="get_e81bgrid")
CONSTANTS = {  # read from the two codebook classes' __init__
    "E8P12RVQ3B": {"opt_scale": 0.98, "opt_resid_scale": 2.04, "file": "lib/codebook/latticee8_padded12_rvq3bit.py"},
    "E8P12RVQ4B": {"opt_scale": 1.03, "opt_resid_scale": 3.45, "file": "lib/codebook/latticee8_padded12_rvq4bit.py"},
}


# ---- transcribed from quip-sharp lib/codebook/latticee8_padded12_rvq3bit.py ----

def get_e81bgrid():
    intr = torch.arange(-4, 4)
    hintr = intr + 1 / 2

    gintr = torch.cartesian_prod(*[intr] * 8)
    ghintr = torch.cartesian_prod(*[hintr] * 8)

    ge8 = torch.concat([gintr, ghintr], dim=0)
    ge8m2 = (ge8.sum(dim=-1) % 2 == 0)
    ge8n = ge8.norm(dim=-1)**2 <= 2

    e8 = ge8[torch.where(ge8m2 * ge8n)[0]]

    norm4 = torch.tensor([
        [2, 0, 0, 0, 0, 0, 0, 0],
        [0, 2, 0, 0, 0, 0, 0, 0],
        [0, 0, 2, 0, 0, 0, 0, 0],
        [0, 0, 0, 2, 0, 0, 0, 0],
        [0, 0, 0, 0, 2, 0, 0, 0],
        [0, 0, 0, 0, 0, 2, 0, 0],
        [0, 0, 0, 0, 0, 0, 2, 0],
        [0, 0, 0, 0, 0, 0, 0, 2],
        [-2, 0, 0, 0, 0, 0, 0, 0],
        [0, -2, 0, 0, 0, 0, 0, 0],
        [0, 0, -2, 0, 0, 0, 0, 0],
        [0, 0, 0, -2, 0, 0, 0, 0],
        [0, 0, 0, 0, -2, 0, 0, 0],
        [0, 0, 0, 0, 0, -2, 0, 0],
        [0, 0, 0, 0, 0, 0, -2, 0],
        #[0, 0, 0, 0, 0, 0, 0, -2],
    ])

    e8 = torch.concat([e8, norm4], dim=0)

    return e8

# ---- end of the transcription ----


def table_digest(table: torch.Tensor) -> str:
    """SHA-256 of a table of multiples of 1/4, stored exactly as int8 (4 x value), row-major."""
    return hashlib.sha256((table.double() * 4).round().to(torch.int8).numpy().tobytes()).hexdigest()


def main():
    grid = get_e81bgrid().double()  # 2 * 8^8 candidate rows of int64 first: ~3.3 GB peak, about a minute here
    rows = sorted(map(tuple, grid.tolist()))
    norms = (grid**2).sum(-1)
    out = dict(
        source=SOURCE, constants=CONSTANTS,
        n_codewords=len(grid), n_distinct=len(set(rows)),
        norm_counts={str(float(v)): int((norms == v).sum()) for v in torch.unique(norms)},
        sha256_code_order=table_digest(grid),
        sha256_sorted_set=table_digest(torch.tensor(rows, dtype=torch.float64)),
    )
    path = Path(__file__).with_name("e81b_reference.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}: {out['n_distinct']} distinct codewords {out['norm_counts']}, "
          f"set {out['sha256_sorted_set'][:16]}...")


if __name__ == "__main__":
    main()
