"""Compile every Triton kernel for a CUDA GPU on a machine that has none, down to the GPU binary.

The interpreter is more forgiving than the compiler (it runs Python, where the compiler wants static
shapes and constexprs), so passing the interpreter tests does not prove a kernel compiles. Triton's
wheel ships ptxas, and ``triton.compile`` needs no driver when it is given a target; so this script
runs each public kernel function with the launch replaced by a compilation of the very same
arguments (types, constexprs, compiler options).

    python tests/kernels/gpu_compile_check.py          # each distinct launch, interpreter config, sm_80
    python tests/kernels/gpu_compile_check.py --full   # every autotune configuration, sm_80 and sm_90

Run it without TRITON_INTERPRET (tests/kernels/test_gpu_compile.py does, in a fresh process).
"""
import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "compiling needs Triton imported without its interpreter"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from qlab import quantize  # noqa: E402
from qlab.kernels import codebook, dispatch, fp8, hadamard, int8, kivi, nf4, ternary, w4a16  # noqa: E402

FULL = "--full" in sys.argv
TARGETS = [GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32)] if FULL else [GPUTarget("cuda", 80, 32)]
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "i8",
          torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64", torch.float8_e4m3fn: "fp8e4nv"}
compiled = []
seen = set()


def _signature(fn, args, meta):
    names = fn.arg_names
    sig, constexprs = {}, {}
    for name, value in zip(names, args):
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + DTYPES[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32"
        else:
            sig[name] = "fp32"
    for name in names[len(args):]:
        sig[name] = "constexpr"
        constexprs[name] = meta[name]
    return sig, constexprs


def compiling_launch(self, backend, grid, *args, **meta):
    self.fn.__globals__["tl"] = triton.language
    jitted = triton.jit(self.fn)
    for config in (self.autotune or [self.default]) if FULL else [self.default]:
        full = {**{k: v for k, v in config.items() if k not in dispatch.OPTIONS}, **meta}
        options = {"num_warps": meta.get("num_warps", config.get("num_warps", 4)),
                   "num_stages": config.get("num_stages", 3)}
        options.update({k: meta[k] for k in ("enable_fp_fusion",) if k in meta})
        sig, constexprs = _signature(jitted, args, {k: v for k, v in full.items() if k not in dispatch.OPTIONS})
        key = (self.fn.__name__, tuple(sorted(sig.items())), tuple(sorted(constexprs.items())), tuple(sorted(options.items())))
        if key in seen:
            continue
        seen.add(key)
        for target in TARGETS:
            triton.compile(ASTSource(jitted, sig, constexprs), target=target, options=options)
        compiled.append((self.fn.__name__, config))


def main() -> int:
    dispatch.Kernel.launch = compiling_launch
    dispatch.resolve = lambda backend=None: "triton"
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(64, 256, generator=gen)
    specs = [quantize(W, "int4-g128-asym-minmax"), quantize(W, "int4-g64")]  # with and without zero points
    for dtype in (torch.float16, torch.bfloat16, torch.float32):  # the three tl.dot paths
        for m in (1, 32):  # GEMV and GEMM
            x = torch.randn(m, 256, generator=gen).to(dtype)
            for qt in specs if FULL or dtype == torch.float16 else specs[:1]:
                w4a16.w4a16_matmul(x, qt)
        ternary.ternary_matmul(x, ternary.ternary_quantize(W))
    x = torch.randn(32, 256, generator=gen, dtype=torch.float16)
    qx, sx = int8.quantize_per_token_int8(x)
    int8.int8_matmul(qx, qx, sx, sx, out_dtype=torch.float16)
    int8.int8_matmul(qx, qx)
    for granularity in ("token", "tensor"):
        fp8.quantize_fp8(x, granularity)
    q, s = fp8.quantize_fp8(x, "token")  # the KV cache's decode and static-scale launches
    fp8.dequantize_fp8(q, s, torch.float16)
    fp8.quantize_fp8(x, "tensor", scale=0.01)
    for n in (1, 4096) if not FULL else (1, 2, 256, 4096):
        hadamard.hadamard_transform(torch.randn(4, n, generator=gen), hadamard.random_signs(n))
    w = nf4.nf4_quantize(W)
    nf4.nf4_dequantize(w, torch.float16)
    nf4.nf4_gemv(x[:1], w)
    for bits in (2, 4):
        for kind in ("key", "value"):
            kivi.kivi_quantize(x.reshape(2, 16, 256), bits, 16, kind)
            kivi.kivi_dequantize(kivi.kivi_quantize_reference(x.reshape(2, 16, 256), bits, 16, kind), torch.float16)
    codes = torch.randint(256, (2, 64, 32), generator=gen)  # AQLM 2x8 over K = 256
    books = torch.randn(2, 256, 8, generator=gen).half()
    for dtype in (torch.float16, torch.float32):
        for m in (1, 32):
            codebook.codebook_matmul(torch.randn(m, 256, generator=gen).to(dtype), codes, books, books[0, :64, 0])
    try:  # this process imported Triton in compiled mode: the interpreter must refuse, clearly
        hadamard._fwht_kernel._build("interpret")
        print("interpreter: not refused")
    except RuntimeError as e:
        print("interpreter:", e)
    kernels = sorted({name for name, _ in compiled})
    arches = ", ".join(f"sm_{t.arch}" for t in TARGETS)
    print(f"compiled {len(compiled)} distinct launches for {arches}: {', '.join(kernels)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
