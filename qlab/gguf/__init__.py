"""GGUF: llama.cpp's block formats, byte for byte, its per-tensor mixes, and .gguf files.

>>> from qlab import gguf
>>> t = gguf.quantize(torch.randn(4, 256), "Q4_K")     # a GGUFTensor holding llama.cpp's bytes
>>> t.bits_per_weight, t.dequantize().shape
(4.5, torch.Size([4, 256]))

* ``blocks``   the registry ``FORMATS``, the base class, :class:`GGUFTensor`, quantize/dequantize;
* ``legacy``   Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 (blocks of 32);
* ``kquants``  Q2_K Q3_K Q4_K Q5_K Q6_K (super-blocks of 256);
* ``search``   llama.cpp's scale/min searches (make_qx / q3 / qkx / qp quants), vectorised;
* ``mixes``    llama.cpp's per-tensor type choice (Q4_K_M ...) and its fallbacks;
* ``files``    read and write .gguf files;
* ``reference`` optional ctypes binding to llama.cpp's own quantizer (for tests and notebooks).
"""
from qlab.gguf.blocks import FORMATS, BlockFormat, GGUFTensor, get_format, format_table, quantize, dequantize, QK_K
from qlab.gguf import legacy, kquants  # noqa: F401  (register the formats)

__all__ = ["FORMATS", "BlockFormat", "GGUFTensor", "get_format", "format_table", "quantize", "dequantize", "QK_K"]
