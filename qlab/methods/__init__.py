"""Every quantization method behind one signature, in one table.

    from qlab.methods import METHODS
    result = METHODS["gptq"](weights, X, "int4-g128-asym-minmax", names=names)   # -> QuantResult

See :mod:`qlab.methods.base` for the signature and the result type. Folders by kind:

* ``weight/``      rtn, gptq, awq, gguf (llama.cpp's types and mixes), quip (QuIP#'s E8P, residual E8P at 3/4 bits),
                   aqlm (AQLM's additive codebooks)
* ``activation/``  smoothquant (W8A8 with or without smoothing), llm_int8
* ``kv/``          KV-cache quantization: KIVI's grouping as a core spec (on the kernel), and a quantized
                   transformers Cache (FP8 per token or static, KIVI 2/4-bit with a float residual window)
* ``train/``       training through the quantizer: QAT layers (STE), LSQ learned steps, BitNet b1.58, a
                   resumable training loop

A new method is one file with a function of that signature plus one entry in :data:`METHODS`; the model
walker (``qlab.models.walker``), the sweeps and the plots then take it like every other.
"""
from qlab.methods.activation import llm_int8, smoothquant
from qlab.methods.base import Method, QuantResult
from qlab.methods.weight import aqlm, awq, gguf, gptq, quip, rtn

METHODS = {m.name: m for m in [
    Method("rtn", rtn.rtn_method, doc="round to nearest (no calibration)"),
    Method("gptq", gptq.gptq_method, needs_inputs=True, doc="GPTQ: Hessian-aware rounding with error feedback"),
    Method("awq", awq.awq_method, needs_inputs=True, folds_into=("norm", "linear"), fallback="rtn", sequential=False,
           revision=2,  # 2: calibrated on the float model's activations, as llm-awq (was: the quantized model's)
           doc="AWQ: activation-aware input-channel scaling and clipping"),
    Method("gguf", gguf.gguf_method, parse_spec=gguf.parse_gguf_spec, doc="a llama.cpp block format (Q4_K, Q8_0 ...), byte for byte"),
    Method("quip", quip.quip_method, needs_inputs=True, parse_spec=quip.parse_quip_spec,
           doc="QuIP#: Hadamard incoherence, BlockLDLQ, E8P codes ('e8p' 2 bits; 'e8p-rvq3', 'e8p-rvq4' residual 3/4 bits)"),
    Method("aqlm", aqlm.aqlm_method, needs_inputs=True, parse_spec=aqlm.parse_aqlm_spec,
           doc="AQLM: additive codebooks ('2x8', '1x8', '1x16') by k-means, beam search and Adam through X^T X"),
    Method("w8a8", smoothquant.w8a8_method, needs_inputs=lambda o: o.get("act") == "static", sequential=False,
           doc="int8 weights and int8 activations (per token, per tensor or static)"),
    Method("smoothquant", smoothquant.smoothquant_method, needs_inputs=True, folds_into=("norm",),
           fallback="w8a8", sequential=False, doc="W8A8 with SmoothQuant's difficulty migration"),
    Method("llm_int8", llm_int8.llm_int8_method, doc="LLM.int8(): int8 with outlier input columns in float"),
]}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "Method", "QuantResult", "get_method"]
