"""qlab's GGUF encoders against llama.cpp's bytes, stored once in tests/data/gguf (no peer needed).

``tests/data/gguf/make_reference_vectors.py`` recorded what llama.cpp's ``ggml_quantize_chunk`` writes
for every format, with and without an imatrix, on Gaussian, outlier, heavy-tailed, edge-case and real
model rows. Every run recomputes those bytes with qlab and asserts they are identical: a change to a
scale search that moves one byte fails here, where an RMS bound would not notice.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from qlab.gguf import FORMATS, get_format

VECTORS = Path(__file__).resolve().parents[1] / "data" / "gguf" / "reference_vectors.npz"


@pytest.fixture(scope="module")
def vectors():
    with np.load(VECTORS) as f:
        return {k: f[k] for k in f.files}


def meta():
    with np.load(VECTORS) as f:
        return json.loads(str(f["meta"]))


SETS = meta()["sets"]


def test_vectors_cover_every_format_and_set(vectors):
    assert meta()["formats"] == list(FORMATS)
    assert SETS == ["gaussian", "outliers", "heavy", "edge", "real"]
    expected = {f"{s}/{q}{suffix}" for s in SETS for q in FORMATS for suffix in ("", "/imatrix")}
    expected |= {f"{kind}/{s}" for s in SETS for kind in ("input", "imatrix")} | {"meta"}
    assert set(vectors) == expected


def _mismatch(ours: np.ndarray, ref: np.ndarray, type_size: int) -> str:
    blocks = np.flatnonzero((ours.reshape(-1, type_size) != ref.reshape(-1, type_size)).any(axis=1))
    return f"{len(blocks)} of {ref.size // type_size} blocks differ (first: block {blocks[0]})"


@pytest.mark.parametrize("imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("qtype", list(FORMATS))
@pytest.mark.parametrize("dataset", SETS)
def test_bytes_equal_llamacpp(vectors, dataset, qtype, imatrix):
    x = vectors[f"input/{dataset}"]
    ref = vectors[f"{dataset}/{qtype}" + ("/imatrix" if imatrix else "")]
    fmt = get_format(qtype)
    ours = fmt.quantize_rows(x, imatrix=vectors[f"imatrix/{dataset}"] if imatrix else None)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype == np.uint8
    assert np.array_equal(ours, ref), _mismatch(ours, ref, fmt.type_size)


@pytest.mark.parametrize("dataset", SETS)
def test_stored_vectors_are_still_what_the_peer_writes(vectors, dataset, peer):
    """With the peer built: the stored bytes are the current llama.cpp's (a stale file would show here)."""
    x, imat = vectors[f"input/{dataset}"], vectors[f"imatrix/{dataset}"]
    for qtype in FORMATS:
        assert np.array_equal(peer.ggml_quantize(x, qtype), vectors[f"{dataset}/{qtype}"])
        assert np.array_equal(peer.ggml_quantize(x, qtype, imatrix=imat), vectors[f"{dataset}/{qtype}/imatrix"])
