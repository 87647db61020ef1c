import subprocess
import sys
import textwrap

import pytest
import torch

from qlab.kernels import dispatch


def test_explicit_argument_wins_over_environment(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "interpret")
    assert dispatch.resolve("torch") == "torch"


def test_environment_variable_forces_backend(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.resolve() == "torch"


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks Triton on a GPU")
def test_auto_is_torch_without_gpu(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.resolve() == "torch"
    assert dispatch.resolve("auto") == "torch"


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="unknown kernel backend"):
        dispatch.resolve("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_compiled_triton_refused_without_gpu():
    with pytest.raises(RuntimeError, match="none is present"):
        dispatch.resolve("triton")


def _run(code: str) -> str:
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("TRITON_INTERPRET", "QLAB_KERNELS")}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter switch concerns GPU-less machines")
def test_without_triton_then_with_it_in_a_fresh_process():
    """One fresh interpreter (importing torch costs seconds here): first Triton is hidden (a None entry
    in sys.modules makes `import triton` fail), and every kernel module must import and fall back to
    torch; then it is unhidden, and the first interpreted launch must switch TRITON_INTERPRET on
    before importing Triton."""
    pytest.importorskip("triton")
    out = _run("""
        import importlib, os, pkgutil, sys, torch
        import qlab.kernels
        sys.modules["triton"] = None
        for mod in pkgutil.iter_modules(qlab.kernels.__path__):
            importlib.import_module("qlab.kernels." + mod.name)
        from qlab.kernels import dispatch
        from qlab.kernels.hadamard import hadamard_transform
        x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
        print(dispatch.triton_installed(), dispatch.resolve(), hadamard_transform(x, normalize=False).tolist())
        del sys.modules["triton"]
        y = hadamard_transform(x, normalize=False, backend="interpret")
        print(os.environ.get("TRITON_INTERPRET"), y.tolist())
    """)
    assert out.splitlines() == ["False torch [[10.0, -2.0, -4.0, 0.0]]", "1 [[10.0, -2.0, -4.0, 0.0]]"]



def test_as_rows_flattens_leading_dims_and_checks_k():
    x = torch.arange(24.0).reshape(2, 3, 4).transpose(0, 1)  # not contiguous
    rows = dispatch.as_rows(x, 4)
    assert rows.shape == (6, 4) and rows.is_contiguous() and torch.equal(rows, x.reshape(6, 4))
    for bad in (torch.ones(3, 5), torch.tensor(1.0)):
        with pytest.raises(ValueError, match="K = 4"):
            dispatch.as_rows(bad, 4)
