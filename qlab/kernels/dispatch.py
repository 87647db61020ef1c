"""Where a kernel runs: compiled Triton on a GPU, Triton's interpreter on a CPU, or plain torch.

Every kernel in ``qlab.kernels`` comes as a pair: a Triton kernel and a torch reference that computes
the same thing. One decision picks between them, in this order:

1. the ``backend=`` argument of the call, if given;
2. the environment variable ``QLAB_KERNELS`` (``torch``, ``triton``, ``interpret`` or ``auto``);
3. ``auto``: compiled Triton when Triton is installed and a CUDA device is present, else torch.

``interpret`` runs the very same kernel source under ``triton.runtime.interpreter`` (numpy on the
CPU): slow, but it is how a kernel can be read, stepped through and tested without a GPU.

Triton is imported lazily, so qlab works without it. On a machine without a GPU, Triton 3.9 must
see ``TRITON_INTERPRET=1`` *before* it is first imported; :func:`import_triton` sets it when no
CUDA device is present and nobody has imported Triton yet.

Kernels are written as plain functions and wrapped with :class:`Kernel`, which jit-compiles them
for the GPU (optionally autotuned) or wraps them for the interpreter (with one fixed launch
configuration: ``@triton.autotune`` needs a GPU driver) on first use.
"""
import importlib.util
import os
import sys

import torch

ENV_VAR = "QLAB_KERNELS"
BACKENDS = ("torch", "triton", "interpret")
OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")  # compiler options, not kernel arguments


def triton_installed() -> bool:
    if "triton" in sys.modules:  # imported already (or blocked with None)
        return sys.modules["triton"] is not None
    return importlib.util.find_spec("triton") is not None


def import_triton():
    """Import Triton, switching on its interpreter first when there is no GPU to compile for."""
    if not triton_installed():
        raise RuntimeError("Triton is not installed; use backend='torch' (pip install triton)")
    if "triton" not in sys.modules and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton

    return triton


def resolve(backend: str | None = None) -> str:
    """The backend a call will use: 'torch', 'triton' or 'interpret' (see the module docstring)."""
    choice = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    choice = choice.strip().lower() or "auto"
    if choice == "auto":
        return "triton" if triton_installed() and torch.cuda.is_available() else "torch"
    if choice not in BACKENDS:
        raise ValueError(f"unknown kernel backend {choice!r}; choose one of {', '.join(BACKENDS + ('auto',))}")
    if choice != "torch" and not triton_installed():
        raise RuntimeError(f"backend {choice!r} needs Triton, which is not installed")
    if choice == "triton" and not torch.cuda.is_available():
        raise RuntimeError("backend 'triton' compiles for a GPU and none is present; use 'interpret' on a CPU")
    return choice


class Kernel:
    """A Triton kernel written as a plain function, compiled on first use for the chosen backend.

    ``default`` is the launch configuration (block sizes, ``num_warps``) used by the interpreter and
    by the GPU when no ``autotune`` list is given; ``autotune`` is a list of such dicts tried on the
    GPU, keyed on the argument names in ``key``. The kernel's module must define a global ``tl``
    (``None`` is fine): it is bound to ``triton.language`` here, so the module imports without Triton.
    """

    def __init__(self, fn, default: dict, autotune: list | None = None, key: tuple = ()):
        self.fn = fn
        self.default = dict(default)
        self.autotune = autotune
        self.key = list(key)
        self._compiled = {}

    def _build(self, backend: str):
        triton = import_triton()
        self.fn.__globals__["tl"] = triton.language
        if backend == "interpret":
            from triton.runtime.interpreter import InterpretedFunction

            if not isinstance(triton.language.sum, InterpretedFunction):  # Triton's own library was jit-compiled
                raise RuntimeError("Triton was imported before TRITON_INTERPRET=1 was set, so its interpreter "
                                   "cannot run; set it before anything imports triton (restart the process)")
            return InterpretedFunction(self.fn)
        jitted = triton.jit(self.fn)
        if self.autotune:
            configs = []
            for c in self.autotune:
                meta = {k: v for k, v in c.items() if k not in ("num_warps", "num_stages")}
                configs.append(triton.Config(meta, num_warps=c.get("num_warps", 4), num_stages=c.get("num_stages", 3)))
            jitted = triton.autotune(configs=configs, key=self.key)(jitted)
        return jitted

    def launch(self, backend: str, grid, *args, **meta):
        """Run on ``grid`` (a tuple, or a function of the launch meta-parameters giving one).

        ``meta`` holds the constexpr arguments the caller fixes, and may set compiler ``OPTIONS``
        (e.g. ``enable_fp_fusion=False`` to keep a*b + c from becoming one FMA, so that results
        match torch bit for bit); block sizes come from ``default`` (or from the autotuner on a GPU).
        """
        if backend not in ("triton", "interpret"):
            raise ValueError(f"a Triton kernel runs on 'triton' or 'interpret', not {backend!r}")
        if backend not in self._compiled:
            self._compiled[backend] = self._build(backend)
        fn = self._compiled[backend]
        tuned = backend == "triton" and self.autotune
        config = {} if tuned else self.default
        launch_meta = {**{k: v for k, v in config.items() if k not in OPTIONS}, **meta}
        if not tuned and backend == "triton":
            launch_meta.setdefault("num_warps", config.get("num_warps", 4))
        if backend == "interpret":
            launch_meta = {k: v for k, v in launch_meta.items() if k not in OPTIONS}
        return fn[grid](*args, **launch_meta)


def kernel(default: dict, autotune: list | None = None, key: tuple = ()):
    """Decorator form of :class:`Kernel`."""
    return lambda fn: Kernel(fn, default, autotune, key)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def as_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """An activation x [..., K] as the contiguous [M, K] matrix a matmul kernel reads (M = all leading dims),
    with a clear error when its last dimension is not the weight's K."""
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x has shape {tuple(x.shape)}: its last dimension must be the weight's K = {k}")
    return x.reshape(-1, k).contiguous()

