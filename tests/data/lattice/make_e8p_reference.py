"""Write e8p_reference.json: a digest of quip-sharp's E8P codebook, rebuilt from its own source.

quip-sharp (github.com/Cornell-RelaxML/quip-sharp, commit 1d8f873e9a2a8b86b12bb1064c312c5689b77d98) builds the
codebook in lib/codebook/latticee8_padded12.py with get_norm12, get_packed_abs_grid and get_full_grid. That
module imports its CUDA extension (quiptools_cuda) at the top, so it cannot be imported here; the three
functions below are those functions transcribed line for line (same torch calls, same loops), with only the
module constant _E8P_CODESZ = 8 inlined. qlab's own construction (qlab/core/formats/lattice.py) is written
differently (itertools + a closed-form sign rule) and tests/core/formats/test_lattice.py compares it with the
digest written here.

Run from the repository root:  .venv/bin/python tests/data/lattice/make_e8p_reference.py
"""
import hashlib
import json
from pathlib import Path

import torch

SOURCE = dict(repo="Cornell-RelaxML/quip-sharp", commit="1d8f873e9a2a8b86b12bb1064c312c5689b77d98",
              file="lib/codebook/latticee8_padded12.py", functions="get_norm12, get_packed_abs_grid, get_full_grid")


# ---- transcribed from quip-sharp lib/codebook/latticee8_padded12.py ----

def get_norm12():
    # 29 elements of norm 12 in E8 + 1/4
    return torch.tensor([
        [3, 1, 1, 1, 3, 3, 3, 3],
        [1, 3, 1, 1, 3, 3, 3, 3],
        [1, 1, 3, 1, 3, 3, 3, 3],
        [1, 1, 1, 3, 3, 3, 3, 3],
        [3, 3, 3, 1, 3, 3, 1, 1],
        [3, 3, 3, 1, 3, 1, 3, 1],
        [3, 3, 3, 1, 1, 3, 3, 1],
        [3, 3, 3, 1, 3, 1, 1, 3],
        [3, 3, 3, 1, 1, 3, 1, 3],
        [3, 3, 3, 1, 1, 1, 3, 3],
        [3, 3, 1, 3, 3, 3, 1, 1],
        [3, 3, 1, 3, 3, 1, 3, 1],
        [3, 3, 1, 3, 1, 3, 3, 1],
        [3, 3, 1, 3, 3, 1, 1, 3],
        [3, 3, 1, 3, 1, 3, 1, 3],
        [3, 3, 1, 3, 1, 1, 3, 3],
        [3, 1, 3, 3, 3, 3, 1, 1],
        [3, 1, 3, 3, 3, 1, 3, 1],
        [3, 1, 3, 3, 1, 3, 3, 1],
        [3, 1, 3, 3, 3, 1, 1, 3],
        [3, 1, 3, 3, 1, 3, 1, 3],
        [1, 3, 3, 3, 1, 1, 3, 3],
        [1, 3, 3, 3, 3, 3, 1, 1],
        [1, 3, 3, 3, 3, 1, 3, 1],
        [1, 3, 3, 3, 1, 3, 3, 1],
        [1, 3, 3, 3, 3, 1, 1, 3],
        [1, 3, 3, 3, 1, 3, 1, 3],
        [1, 1, 3, 3, 1, 3, 3, 3],
        [3, 3, 1, 1, 3, 3, 3, 1],
    ]) / 2


def get_packed_abs_grid():
    intr = torch.arange(-4, 4)
    d8 = torch.cartesian_prod(*[intr] * 8).float() + 1 / 2
    d8m2 = (d8.sum(dim=-1) % 2 == 0)
    d8n = d8.norm(dim=-1)**2 <= 10
    d8abs = torch.unique(d8[sorted(torch.where(d8m2 * d8n)[0])].abs(), dim=0)
    norm12 = get_norm12()
    cba = torch.concat([d8abs, norm12], dim=0)
    cba = cba[:, [0, 2, 4, 6, 1, 3, 5, 7]]
    cba[:, 7] *= (1 - 2 * (cba.sum(1) % 2))
    cba = cba * 2 + 8
    cba = cba.to(torch.int32)
    acc = cba[:, 0]
    for i in range(7):
        acc = acc | (cba[:, (i + 1)] << ((i + 1) * 4))
    return acc


def get_abs_grid():
    intr = torch.arange(-4, 4)
    d8 = torch.cartesian_prod(*[intr] * 8).float() + 1 / 2
    d8m2 = (d8.sum(dim=-1) % 2 == 0)
    d8n = d8.norm(dim=-1)**2 <= 10
    d8abs = torch.unique(d8[sorted(torch.where(d8m2 * d8n)[0])].abs(), dim=0)
    norm12 = get_norm12()
    cba = torch.concat([d8abs, norm12], dim=0)
    return cba


def get_full_grid(packed_abs_grid):
    synth_codebook = torch.zeros(1 << 16, 8)
    parity_idx = []
    shuffle_map = [0, 4, 1, 5, 2, 6, 3, 7]
    for c in range(1 << 16):
        signs = c & 255
        abs = c >> 8
        parity = 0
        for i in range(8):
            parity = parity ^ ((signs >> i) & 1)
        signs = signs ^ parity
        abs_code = packed_abs_grid[abs].item()
        for i in range(8):
            ii = shuffle_map[i]
            synth_codebook[c, i] = (((abs_code >> (4 * ii)) & 15) - 8) * 0.5
            if ((signs >> ii) & 1):
                synth_codebook[c, i] *= -1
        if parity:
            synth_codebook[c, :] -= 0.25
            parity_idx.append(c)
        else:
            synth_codebook[c, :] += 0.25
    return synth_codebook, torch.arange(1 << 16), parity_idx

# ---- end of the transcription ----


def table_digest(table: torch.Tensor) -> str:
    """SHA-256 of a table of multiples of 1/4, stored exactly as int8 (4 x value), row-major."""
    return hashlib.sha256((table * 4).round().to(torch.int8).numpy().tobytes()).hexdigest()


def sorted_rows(table: torch.Tensor) -> torch.Tensor:
    """The rows in lexicographic order (a canonical form of the set)."""
    return torch.tensor(sorted(map(tuple, table.tolist())), dtype=table.dtype)


def main():
    packed = get_packed_abs_grid()
    grid, _, parity_idx = get_full_grid(packed)
    abs_grid = get_abs_grid()
    out = dict(
        source=SOURCE,
        n_codewords=len(grid), n_distinct=len(set(map(tuple, grid.tolist()))), n_parity=len(parity_idx),
        sha256_code_order=table_digest(grid),
        sha256_sorted_set=table_digest(sorted_rows(grid)),
        abs_patterns_times_2=["".join(str(int(2 * v)) for v in row) for row in abs_grid.tolist()],
        packed_abs_grid=[int(v) & 0xFFFFFFFF for v in packed.tolist()],  # as unsigned 32-bit words
    )
    path = Path(__file__).with_name("e8p_reference.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}: {out['n_distinct']} distinct codewords, set {out['sha256_sorted_set'][:16]}...")


if __name__ == "__main__":
    main()
