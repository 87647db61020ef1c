"""qlab: a research workbench for LLM quantization.

The package computes; the notebooks in ``notebooks/`` narrate and plot. The core is three ideas:

* a **grid** (``qlab.core.formats``): the finite set of values a code can stand for (int4, FP8, NF4, ...);
* a **granularity** (``qlab.core.granularity``): which elements share one scale (tensor, channel, group);
* a **scale rule** (``qlab.core.scales``): how that scale (and zero point) is chosen (absmax, min-max, MSE).

``qlab.core.quant.QuantSpec`` bundles the three; ``quantize`` turns a tensor into a packed
``QuantizedTensor`` and ``dequantize`` turns it back.
"""
from qlab.core.quant import QuantSpec, QuantizedTensor, quantize, dequantize, fake_quant

__all__ = ["QuantSpec", "QuantizedTensor", "quantize", "dequantize", "fake_quant"]
__version__ = "0.1.0"
