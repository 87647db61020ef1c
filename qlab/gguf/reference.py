"""llama.cpp itself, as an optional outside reference (never a dependency of qlab).

``llama-cpp-python`` builds llama.cpp from source into its own venv (``make llamacpp-peer``)::

    python -m venv ../peers/llamacpp          # beside the repository
    CMAKE_ARGS="-DGGML_NATIVE=OFF" ../peers/llamacpp/bin/pip install llama-cpp-python==0.3.36

Two ways in:

* :func:`ggml_quantize` calls ``ggml_quantize_chunk`` from its ``libggml-base.so`` through ctypes,
  in this process (only numpy arrays cross the boundary) -- the byte-exactness oracle;
* :func:`run_in_peer` runs a short script with the peer venv's python (to load a .gguf with
  ``llama_cpp.Llama``, or call ``llama_model_quantize``), for checks that need the whole library.

Set ``QLAB_LLAMACPP_PEER`` (the venv folder), or ``QLAB_LLAMACPP_LIB`` (path to libggml-base.so)
and ``QLAB_LLAMACPP_PYTHON``, to point elsewhere; the default folder is ``peers/llamacpp`` beside the repository.
Everything returns None / raises
:class:`PeerUnavailable` when the peer is absent, so tests can skip cleanly.
"""
from __future__ import annotations

import ctypes
import glob
import json
import os
import subprocess
from functools import lru_cache
from pathlib import Path

import numpy as np

from qlab.gguf.blocks import get_format

_BESIDE_REPO = Path(__file__).resolve().parents[2].parent / "peers" / "llamacpp"
DEFAULT_PEER = os.environ.get("QLAB_LLAMACPP_PEER", str(_BESIDE_REPO))  # the peer venv folder


class PeerUnavailable(RuntimeError):
    pass


@lru_cache(maxsize=1)
def peer_python() -> str | None:
    """The peer venv's python if it can import ``llama_cpp`` (checked once), else None."""
    path = os.environ.get("QLAB_LLAMACPP_PYTHON", os.path.join(DEFAULT_PEER, "bin", "python"))
    if not os.path.exists(path):
        return None
    ok = subprocess.run([path, "-c", "import llama_cpp, numpy"], capture_output=True).returncode == 0
    return path if ok else None


def find_library() -> str | None:
    """Path of llama.cpp's libggml-base.so, or None."""
    env = os.environ.get("QLAB_LLAMACPP_LIB")
    if env:
        return env if os.path.exists(env) else None
    hits = sorted(glob.glob(os.path.join(DEFAULT_PEER, "lib", "python3*", "site-packages", "llama_cpp", "lib",
                                         "libggml-base.so*")))
    return hits[0] if hits else None


@lru_cache(maxsize=1)
def _lib():
    path = find_library()
    if path is None:
        raise PeerUnavailable("llama.cpp peer not found: set QLAB_LLAMACPP_LIB or run `make llamacpp-peer`")
    lib = ctypes.CDLL(path)
    f = lib.ggml_quantize_chunk
    f.restype = ctypes.c_size_t
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                  ctypes.c_int64, ctypes.c_void_p]
    return lib


def available() -> bool:
    try:
        _lib()
        return True
    except (PeerUnavailable, OSError):
        return False


def ggml_quantize(rows: np.ndarray, qtype: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's bytes for ``rows [R, n]`` (float32) in ``qtype``: ``[R, bytes_per_row]`` uint8."""
    fmt = get_format(qtype)
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    R, n = rows.shape
    fmt.check_row(n)
    out = np.zeros((R, n // fmt.block_size * fmt.type_size), np.uint8)
    imat = None
    if imatrix is not None:
        imat = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if imat.shape[0] != n:
            raise ValueError(f"imatrix has {imat.shape[0]} entries, rows have {n}")
    written = _lib().ggml_quantize_chunk(int(fmt.ggml_type), rows.ctypes.data, out.ctypes.data, 0, R, n,
                                         None if imat is None else imat.ctypes.data)
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out


def run_in_peer(script: str, *args: str, timeout: float = 600) -> dict:
    """Run ``script`` with the peer's python (argv = args); it must print one JSON object last."""
    py = peer_python()
    if py is None:
        raise PeerUnavailable("llama-cpp-python peer venv not found (QLAB_LLAMACPP_PYTHON)")
    res = subprocess.run([py, "-c", script, *args], capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"peer script failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


_LOAD_AND_SCORE = r"""
import json, sys, numpy as np
from llama_cpp import Llama
path, text, n_gen = sys.argv[1], sys.argv[2], int(sys.argv[3])
llm = Llama(model_path=path, n_ctx=512, logits_all=True, verbose=False, n_threads=2)
toks = llm.tokenize(text.encode(), add_bos=False)[:256]
llm.eval(toks)
logits = np.array(llm.scores[:len(toks)], dtype=np.float64)
logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
nll = -np.mean([logp[i, toks[i + 1]] for i in range(len(toks) - 1)])
llm.reset()
out = llm.create_completion(text[:80], max_tokens=n_gen, temperature=0.0)
print(json.dumps(dict(n_tokens=len(toks), nll=float(nll), ppl=float(np.exp(nll)), generation=out["choices"][0]["text"])))
"""


def llamacpp_perplexity(path: str, text: str, n_gen: int = 16) -> dict:
    """Load a .gguf in llama.cpp, score ``text`` (≤ 256 tokens) and greedily continue its start.

    Returns ``dict(n_tokens, nll, ppl, generation)``.
    """
    return run_in_peer(_LOAD_AND_SCORE, str(path), text, str(n_gen))


_MODEL_QUANTIZE = r"""
import json, sys, ctypes, llama_cpp
src, dst, ftype = sys.argv[1], sys.argv[2], int(sys.argv[3])
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = ftype
params.allow_requantize = True
params.nthread = 2
rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
print(json.dumps(dict(rc=int(rc))))
"""


def llamacpp_model_quantize(src: str, dst: str, mix: str) -> None:
    """``llama-quantize src dst MIX`` through the peer (allow_requantize on)."""
    from qlab.gguf.mixes import FILE_TYPE

    res = run_in_peer(_MODEL_QUANTIZE, str(src), str(dst), str(FILE_TYPE[mix]))
    if res["rc"] != 0:
        raise RuntimeError(f"llama_model_quantize returned {res['rc']}")


def compare_with_llama_quantize(src: str, mix: str, workdir: str) -> dict:
    """Quantize ``src`` with ``mix`` in qlab and in llama.cpp; compare the two files tensor by tensor.

    Returns ``dict(n_tensors, same_order, same_types, byte_identical, qlab_path, llamacpp_path)``.
    """
    import torch

    from qlab.gguf.files import load_tensors, quantize_gguf

    ours, theirs = os.path.join(workdir, f"qlab-{mix}.gguf"), os.path.join(workdir, f"llamacpp-{mix}.gguf")
    quantize_gguf(src, ours, mix, progress=False)
    llamacpp_model_quantize(src, theirs, mix)
    a, b = load_tensors(ours), load_tensors(theirs)
    same = 0
    for name in b:
        x, y = a.get(name), b[name]
        if isinstance(y, torch.Tensor):
            same += isinstance(x, torch.Tensor) and torch.equal(x, y)
        else:
            same += x is not None and not isinstance(x, torch.Tensor) and x.qtype == y.qtype \
                and np.array_equal(x.data, y.data)
    return dict(n_tensors=len(b), same_order=list(a) == list(b),
                same_types=all(getattr(a.get(n), "qtype", None) == getattr(b[n], "qtype", None) for n in b),
                byte_identical=int(same), qlab_path=ours, llamacpp_path=theirs)
