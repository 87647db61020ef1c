import pytest
import torch

from qlab.benchmarks import kernels as bench
from qlab.study.roofline import DEVICES, matmul_cost, roofline_seconds


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script really benchmarks")
def test_benchmark_exits_cleanly_without_gpu(capsys):
    assert bench.main([]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out


def test_roofline_arithmetic_by_hand():
    # batch-1 GEMV, W 4096 x 4096: 2 * 4096^2 FLOPs; fp16 weights 2 * 4096^2 bytes (+ 2 * 4096 * 2 for x, y)
    fp16 = matmul_cost(1, 4096, 4096, bits=16)
    assert fp16["flops"] == 2 * 4096**2 and fp16["bytes"] == 2 * 4096**2 + 4 * 4096
    # int4 with a 2-byte scale per 128 weights: 4.125 bits per weight
    int4 = matmul_cost(1, 4096, 4096, bits=4, group_size=128)
    assert int4["bytes"] == 4096**2 * 4.125 / 8 + 4 * 4096
    a100 = DEVICES["A100-SXM-80GB"]
    assert a100.ridge == pytest.approx(312e12 / 2039e9)
    # far below the ridge: time is bytes / bandwidth, so 4-bit weights are ~3.9x faster
    speedup = roofline_seconds(fp16["flops"], fp16["bytes"], a100) / roofline_seconds(int4["flops"], int4["bytes"], a100)
    assert speedup == pytest.approx(fp16["bytes"] / int4["bytes"]) and 3.8 < speedup < 3.9
    # far above it, compute-bound: the weight format no longer matters
    big16, big4 = matmul_cost(4096, 4096, 4096), matmul_cost(4096, 4096, 4096, bits=4, group_size=128)
    assert roofline_seconds(big16["flops"], big16["bytes"], a100) == roofline_seconds(big4["flops"], big4["bytes"], a100)
