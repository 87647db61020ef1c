"""llama.cpp's own bytes for every GGUF block format on small fixed inputs, so CI checks qlab byte for byte
without building llama.cpp (``tests/gguf/test_reference_vectors.py``).

Run once, with the llama.cpp peer built (``make llamacpp-peer``), and commit the result:

    .venv/bin/python tests/data/gguf/make_reference_vectors.py   # writes tests/data/gguf/reference_vectors.npz

Re-run it only on purpose (a llama.cpp upgrade that changes its encoders), in its own commit.
The bytes come from ``ggml_quantize_chunk`` in the peer's ``libggml-base.so`` through ctypes
(:func:`qlab.gguf.reference.ggml_quantize`), never from qlab. For each input set and each format of
``qlab.gguf.FORMATS`` it stores the plain encoding and the importance-weighted one (``--imatrix`` path).

Input sets (float32, stored with the bytes, so the test does not depend on a random generator):

* ``gaussian``  8 × 512 standard normal;
* ``outliers``  8 × 512 normal with 1% of values ×20, an all-zero super-block, a constant one, an
  all-positive row, an all-negative row;
* ``heavy``     8 × 512 Student-t with 3 degrees of freedom (heavy tails);
* ``edge``      8 × 512 rows that stress rounding and fp16 scales: tiny (σ=1e-5, subnormal fp16
  scales), large (σ=1e3), one spike in zeros, exact halves, ±1 alternating, repeated ties;
* ``real``      4 × 1536 rows of the embedded model's ffn_down (blk.0 and blk.29), read and dequantized
  from its Q4_1 GGUF with the ``gguf`` package's reader (1536 = 6 super-blocks, so every format fits).

Each set has its own importance vector: gamma(1, 1) per column with 2% of the entries set to 0.
Keys of the .npz: ``input/<set>``, ``imatrix/<set>``, ``<set>/<type>``, ``<set>/<type>/imatrix``, and
``meta`` (a JSON string: peer version, formats, sets).
"""
from __future__ import annotations

import glob
import json
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # the repository, for qlab

from qlab.gguf import FORMATS, reference  # noqa: E402

OUT = HERE / "reference_vectors.npz"
REAL_TENSORS = ("blk.0.ffn_down.weight", "blk.29.ffn_down.weight")


def synthetic_sets(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    gaussian = rng.standard_normal((8, 512))

    outliers = rng.standard_normal((8, 512))
    outliers[rng.random(outliers.shape) < 0.01] *= 20
    outliers[1, :256] = 0.0
    outliers[2, 256:] = 0.37
    outliers[3] = np.abs(outliers[3])
    outliers[4] = -np.abs(outliers[4])

    heavy = rng.standard_t(3, (8, 512))

    edge = np.zeros((8, 512))
    edge[0] = rng.standard_normal(512) * 1e-5
    edge[1] = rng.standard_normal(512) * 1e3
    edge[2, 100] = 3.0
    edge[3] = np.round(rng.standard_normal(512) * 8) / 2
    edge[4] = np.where(np.arange(512) % 2, 1.0, -1.0)
    edge[5] = np.tile(np.arange(-8, 8) + 0.5, 32)
    edge[6] = rng.standard_normal(512) * np.repeat(rng.uniform(0.01, 2, 16), 32)   # blocks of unequal scale
    edge[7] = rng.standard_normal(512) * 1e-3 + 5.0                                # offset from zero
    return {k: v.astype(np.float32) for k, v in
            dict(gaussian=gaussian, outliers=outliers, heavy=heavy, edge=edge).items()}


def real_set() -> np.ndarray:
    """2 rows of each REAL_TENSORS, dequantized by the gguf package (not by qlab)."""
    import gguf

    from qlab.models import embedded_gguf_path

    reader = gguf.GGUFReader(str(embedded_gguf_path()))
    by_name = {t.name: t for t in reader.tensors}
    rows = []
    for name in REAL_TENSORS:
        t = by_name[name]
        w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)      # [rows, 1536] float32
        rows.append(w[[0, w.shape[0] // 2]])
    return np.concatenate(rows).astype(np.float32)


def importance(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + seed)
    imat = rng.gamma(1.0, 1.0, n)
    imat[rng.random(n) < 0.02] = 0.0
    return imat.astype(np.float32)


def peer_version() -> str:
    lib = reference.find_library()
    dist = glob.glob(os.path.join(os.path.dirname(lib), "..", "..", "llama_cpp_python-*.dist-info"))
    return os.path.basename(dist[0]).removesuffix(".dist-info") if dist else "unknown"


def main() -> None:
    if not reference.available():
        raise SystemExit("the llama.cpp peer is needed: run `make llamacpp-peer` (or set QLAB_LLAMACPP_LIB)")
    sets = synthetic_sets()
    sets["real"] = real_set()
    out = {}
    for i, (name, x) in enumerate(sets.items()):
        imat = importance(x.shape[1], i)
        out[f"input/{name}"], out[f"imatrix/{name}"] = x, imat
        for qtype in FORMATS:
            out[f"{name}/{qtype}"] = reference.ggml_quantize(x, qtype)
            out[f"{name}/{qtype}/imatrix"] = reference.ggml_quantize(x, qtype, imatrix=imat)
    meta = dict(peer=peer_version(), function="ggml_quantize_chunk", formats=list(FORMATS), sets=list(sets),
                real_tensors=list(REAL_TENSORS))
    np.savez_compressed(OUT, meta=np.array(json.dumps(meta)), **out)
    print(f"{len(out)} arrays, {meta['peer']} -> {OUT} ({OUT.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
