"""qlab: a research workbench for LLM quantization.

The package computes; the notebooks in ``notebooks/`` narrate and plot. Its layers, each importing only
from the ones before it:

* ``qlab.core``       the representation: grids, granularity, scale rules, QuantSpec, the quantized-tensor
                      protocol (QuantizedTensor, CodebookTensor), quantize / dequantize / fake_quant(_ste)
* ``qlab.gguf``       llama.cpp's block formats byte for byte, its mixes, .gguf files (GGUFTensor)
* ``qlab.kernels``    Triton kernels, each beside its torch reference
* ``qlab.methods``    every method behind one signature in one registry (``METHODS``): RTN, GPTQ, AWQ,
                      GGUF types, QuIP#, W8A8 with or without SmoothQuant, LLM.int8(); KV caches; QAT
* ``qlab.models``     loading, WikiText-2 windows, calibration hooks, transforms, quantized modules and
                      the one walker that applies a recipe of methods to a model
* ``qlab.eval``       perplexity / KL / top-1 against the float model, and resumable sweeps
* ``qlab.study``      theory, precision, memory, grid alignment, roofline, plots
* ``qlab.benchmarks`` scripts that time qlab against peers (``python -m qlab.benchmarks.<name>``)
* ``qlab.cli``        the ``qlab`` command line: quantize, eval, sweep, export

The everyday entry points are re-exported here:

>>> import torch; from qlab import quantize, QuantSpec
>>> quantize(torch.randn(4, 64), "int4-g32-asym-minmax").bits_per_weight   # 4 + (16 + 4) bytes x 8 / 256
4.625
"""
from qlab.core.quant import dequantize, fake_quant, fake_quant_ste, quantize
from qlab.core.spec import QuantSpec
from qlab.core.tensor import CodebookTensor, QTensor, QuantizedTensor, load_qtensor, save_qtensor
from qlab import gguf  # noqa: E402,F401  (registers GGUFTensor with load_qtensor)

__all__ = ["QuantSpec", "QuantizedTensor", "CodebookTensor", "QTensor", "quantize", "dequantize", "fake_quant",
           "fake_quant_ste", "save_qtensor", "load_qtensor"]
__version__ = "0.2.0"
