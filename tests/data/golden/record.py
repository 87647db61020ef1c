"""Record qlab's outputs on fixed inputs, so a refactoring can prove it changed nothing.

Run once, *before* a change that must not move any number (the core redesign of issue 10 was the first):

    .venv/bin/python tests/data/golden/record.py        # writes tests/data/golden/golden.pt

``tests/test_golden.py`` recomputes every entry with the current code and asserts equality: small tensors
are stored as they are, whole-model results as SHA-256 digests of their bytes (exact, and small).
Entries: RTN / NF4 / FP8 / ternary ... codes, scales, zero points and bytes on a fixed weight; every GGUF
block format's bytes (with and without an imatrix); GPTQ and AWQ codes on a fixed layer; SmoothQuant's
int8 weights; and, on a tiny random Llama, every whole-model path (recipe walker, GGUF mix, sequential
GPTQ and AWQ, W8A8 with and without SmoothQuant): the dequantized weight of every layer and the logits.
"""
import hashlib
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/ (for golden_cases)

from golden_cases import compute_all  # noqa: E402

if __name__ == "__main__":
    torch.set_num_threads(1)
    out = compute_all()
    torch.save(out, HERE / "golden.pt")
    print(f"{len(out)} entries -> {HERE / 'golden.pt'} ({(HERE / 'golden.pt').stat().st_size:,} bytes)")
