"""The representation core: what a quantized tensor is, independent of any model or method.

* ``formats``      number grids: int, FP8/FP4/fp16/bf16, NF4, ternary, binary, dynamic 8-bit
* ``granularity``  which elements share a scale: tensor, channel, token, group, block
* ``scales``       how a scale (and zero point or minimum) is chosen: absmax, minmax, mse, absmean
* ``packing``      b-bit codes <-> a little-endian byte stream
* ``quant``        QuantSpec, QuantizedTensor, quantize / dequantize / fake_quant
* ``error``        reconstruction error: MSE, SQNR, relative Frobenius error
* ``rotations``    Hadamard matrices (Sylvester, Paley) and QuIP#'s two-sided randomized Hadamard transform
* ``formats.lattice``  nearest points of Z^n, D_n, A_n, E8; G by Monte Carlo; QuIP#'s E8P codebook

Nothing here imports from another qlab layer.
"""
