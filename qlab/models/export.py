"""Export a quantized model in a format other tools load: compressed-tensors (transformers, vLLM) or GGUF.

One entry, :func:`export`. For ``format="compressed-tensors"`` it takes a model quantized by
:func:`qlab.models.walker.quantize_model` and its ``SizeReport`` (or the ``{name: QuantizedTensor}`` dict
it holds) and writes a folder that ``transformers.AutoModelForCausalLM.from_pretrained(folder)`` loads
with the ``compressed-tensors`` package installed:

* ``config.json``        the model's config plus ``quantization_config`` (quant_method "compressed-tensors",
                         one config group per spec naming its Linears, with its format: "pack-quantized"
                         for int specs, "naive-quantized" for FP8; ``ignore`` lists the Linears left float,
                         such as lm_head);
* ``model.safetensors``  per quantized int Linear ``weight_packed`` (int32), ``weight_scale``,
                         ``weight_shape`` and, for asymmetric specs, ``weight_zero_point`` (int32, packed
                         along rows); per FP8 Linear ``weight`` (float8_e4m3fn) and ``weight_scale``; every
                         other tensor (norms, embeddings, float Linears, biases) as it is in the model;
* the tokenizer files, when one is given.

W8A8 Linears (the 'w8a8' and 'smoothquant' methods, :class:`~qlab.models.modules.W8A8Linear`) go to an
"int-quantized" config group: ``weight`` holds the int8 codes (int8 tensor) and ``weight_scale`` one float32
scale per output channel; ``input_activations`` says int8 symmetric, dynamic per token ('token') or per tensor
('tensor'), or static per tensor with the calibrated scale stored as ``input_scale`` ('static'). SmoothQuant's
s is already folded into the norms before the smoothed Linears, so the folder carries the folded norm weights.
compressed-tensors re-quantizes the activations at run time with its own rule: the same codes for the same
scale, but a dynamic scale of max|x| / 127.5 where qlab takes max|x| / 127 (and -128 reachable where qlab's
grid stops at -127); tests/models/test_export_w8a8.py measures what that changes. LLM.int8() (float outlier
columns chosen at run time) and FP8 activations (qlab has none) have no export.

compressed-tensors de-quantizes a weight as  W = (q - z) * scale  (compressed_tensors/quantization/lifecycle/
forward_helpers.py, _dequantize) with signed codes q, z in [-2^(b-1), 2^(b-1) - 1] (FP8: q the e4m3 value, no
z), computed in the scale's dtype. qlab's codes map onto that grid exactly:

* symmetric: qlab's values q (in [-(2^(b-1)-1), 2^(b-1)-1], or the full range) are CT's q, no zero point;
* asymmetric: qlab's unsigned q and zero point z in [0, 2^b - 1] become q - 2^(b-1) and z - 2^(b-1), and
  (q - 2^(b-1)) - (z - 2^(b-1)) = q - z.

On disk (compressed_tensors/compressors/pack_quantized) a code is stored offset by 2^(b-1) (so unsigned), as
a little-endian bit stream of b bits per code, each row padded to whole int32 words: int4 code i of a row sits
in word i // 8, bits 4 (i % 8) and up; zero points are packed the same way down the columns.
Example, one int4 row [1, -2, 0, 0, 0, 0, 0, 7] (sym): offset codes [9, 6, 8, 8, 8, 8, 8, 15]
-> word 0xF8888869 -> int32 -125269911.

Scales: qlab rounds scales to fp16 (bf16, fp32) but computes in float32; they are written as float32
holding those values, so CT's (q - z) * scale in float32 is qlab's de-quantized weight bit for bit (an fp16
scale would make CT compute the product in fp16 and round it).

Loading it back (compressed-tensors 0.20.1, transformers 5.24, checked by tests/models/test_export.py):
symmetric specs load with a plain ``from_pretrained(folder)``; asymmetric ones need
``quantization_config=CompressedTensorsConfig(dequantize=True)`` (compressed-tensors builds the model's zero
points unpacked on the meta device, so the compressed load rejects the packed ones its own compressor
writes); transformers' ``dequantize=True`` reads every dense layer with the first config group, so a folder
mixing specs loads through compressed-tensors' ModelCompressor (apply the config, compress, load, decompress).

For ``format="gguf"`` the existing writers are called as they are: a :class:`~qlab.gguf.files.GGUFFile`
is written with :func:`~qlab.gguf.files.write_gguf`, a path to a .gguf is re-quantized with a llama.cpp
``mix`` by :func:`~qlab.gguf.files.quantize_gguf`.
"""
from __future__ import annotations

import json
import math
import os
from importlib import metadata

import numpy as np
import torch
from torch import nn

from qlab.core.granularity import PerChannel, PerGroup, PerTensor
from qlab.core.packing import pack
from qlab.core.spec import INT_FORMATS
from qlab.core.tensor import QuantizedTensor
from qlab.models.modules import QuantLinear, W8A8Linear

FORMATS = ("compressed-tensors", "gguf")
# compressed-tensors' format per weight type: int codes packed into int32 (what llm-compressor writes for
# int weight-only schemes and vLLM's WNA16 kernels read), FP8 codes stored as float8_e4m3fn tensors
CT_FORMATS = {"int": "pack-quantized", "float": "naive-quantized"}
CT_W8A8_FORMAT = "int-quantized"  # int8 codes as an int8 tensor, activations quantized at run time
SUPPORTED = ("weight-only int2..int8, symmetric (absmax / mse) or asymmetric with an integer zero point "
             "(minmax / mse), and fp8_e4m3; per channel, per tensor, or in groups that divide the row (e.g. "
             "'int4-g32-asym-minmax', 'int4-g64-sym-absmax', 'int8-channel-sym-absmax', 'fp8_e4m3-channel'); "
             "scales in fp16/bf16/fp32, no double quantization; and W8A8 ('w8a8' / 'smoothquant' methods: int8 "
             "per-channel weights, int8 activations per token, per tensor or static per tensor)")


def export(model, report_or_qtensors=None, folder=None, tokenizer=None, format: str = "compressed-tensors",
           *, mix: str | None = None, progress: bool = False):
    """Write ``model`` in ``format`` to ``folder`` (a file path for GGUF); return the path written.

    ``format="compressed-tensors"``: ``model`` as :func:`~qlab.models.walker.quantize_model` returned it
    ("fake" or "packed" mode), ``report_or_qtensors`` its SizeReport (or ``report.qtensors``).
    ``format="gguf"``: ``model`` is a :class:`~qlab.gguf.files.GGUFFile` (written as is) or the path of a
    .gguf re-quantized with ``mix`` (e.g. "Q4_K_M"); ``report_or_qtensors`` and ``tokenizer`` stay None.

    >>> from qlab.models.walker import quantize_model, weight_only
    >>> qmodel, report = quantize_model(model, weight_only("int4-g32-asym-minmax"))    # doctest: +SKIP
    >>> export(qmodel, report, "runs/smollm2-w4g32", tokenizer)                          # doctest: +SKIP
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if folder is None:
        raise ValueError("export needs a destination: export(model, report, folder)")
    if format == "gguf":
        return _export_gguf(model, report_or_qtensors, folder, tokenizer, mix, progress)
    if mix is not None:
        raise ValueError("mix= names a llama.cpp mix and belongs to format='gguf'")
    return export_compressed_tensors(model, report_or_qtensors, folder, tokenizer)


# ---- compressed-tensors ---------------------------------------------------------------------------
def ct_weights_args(qt) -> dict:
    """The ``weights`` entry of a compressed-tensors config group for ``qt``'s spec, or a ValueError
    listing what is supported.

    >>> ct_weights_args(quantize(torch.randn(4, 64), "int4-g32-asym-minmax"))               # doctest: +SKIP
    {'num_bits': 4, 'type': 'int', 'symmetric': False, 'strategy': 'group', 'group_size': 32, ...}
    """
    if not isinstance(qt, QuantizedTensor):
        raise ValueError(f"compressed-tensors export covers qlab's scalar int grids, not a {type(qt).__name__} "
                         f"(GGUF blocks go to format='gguf'; codebooks have no compressed-tensors format); "
                         f"supported: {SUPPORTED}")
    spec = qt.spec
    problem = None
    if (spec.format not in INT_FORMATS or spec.bits < 2) and spec.format != "fp8_e4m3":
        problem = f"its format is {spec.format}"
    elif spec.float_min:
        problem = "it stores a float minimum per group (compressed-tensors has integer zero points only)"
    elif spec.double_quant:
        problem = "its scales are double-quantized"
    elif spec.rule in ("none", "absmean"):
        problem = f"its scale rule is {spec.rule}"
    elif len(qt.shape) != 2:
        problem = f"its weight is {len(qt.shape)}-d"
    if problem:
        raise ValueError(f"cannot export spec {spec} to compressed-tensors: {problem}; supported: {SUPPORTED}")
    gran = spec.granularity
    args = {"num_bits": spec.bits, "type": "int" if spec.format in INT_FORMATS else "float",
            "symmetric": spec.symmetric, "dynamic": False, "actorder": None, "block_structure": None}
    if isinstance(gran, PerChannel) and gran.per_row(qt.shape):
        return {**args, "strategy": "channel", "group_size": None}
    if isinstance(gran, PerTensor):
        return {**args, "strategy": "tensor", "group_size": None}
    if isinstance(gran, PerGroup) and gran.axis == -1:
        if qt.shape[1] % gran.size:
            raise ValueError(f"cannot export spec {spec} to compressed-tensors: groups of {gran.size} leave a "
                             f"ragged last group on rows of {qt.shape[1]} (compressed-tensors has none); pick a "
                             f"group size that divides {qt.shape[1]}, e.g. g32 or g64")
        return {**args, "strategy": "group", "group_size": gran.size}
    raise ValueError(f"cannot export spec {spec} to compressed-tensors: granularity {gran} has no "
                     f"compressed-tensors strategy; supported: {SUPPORTED}")


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned b-bit ``codes`` [rows, cols] -> int32 [rows, ceil(cols * b / 32)]: each row a little-endian
    bit stream (qlab.core.packing's, code i at bits [b i, b (i+1))) padded to whole 32-bit words.

    >>> pack_int32(torch.tensor([[9, 6, 8, 8, 8, 8, 8, 15]]), 4)                            # doctest: +SKIP
    tensor([[-125269911]], dtype=torch.int32)                                  # 0xF8888869
    """
    rows, cols = codes.shape
    padded = torch.nn.functional.pad(codes.to(torch.int64), (0, (-cols) % 32))  # 32 codes = b whole words
    stream = pack(padded, bits).numpy()                                           # [rows * words * 4] bytes
    words = torch.from_numpy(stream.view("<i4").astype(np.int32).reshape(rows, -1))
    return words[:, : math.ceil(cols * bits / 32)].contiguous()


def ct_input_args(module: nn.Module) -> dict | None:
    """The ``input_activations`` entry of a config group: None for a weight-only Linear; for a
    :class:`~qlab.models.modules.W8A8Linear` int8 symmetric activations, dynamic per token ('token') or per
    tensor ('tensor'), or per tensor with the calibrated scale stored as ``input_scale`` ('static')."""
    if not isinstance(module, W8A8Linear):
        return None
    return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token" if module.act == "token" else "tensor",
            "dynamic": module.act != "static", "group_size": None, "actorder": None, "block_structure": None}


def ct_tensors(qt: QuantizedTensor, module: nn.Module | None = None) -> dict:
    """The tensors of one quantized weight, named and laid out as compressed-tensors' compressors store
    them: ``{weight_packed, weight_scale, weight_shape[, weight_zero_point]}`` (pack-quantized, int),
    ``{weight, weight_scale}`` (naive-quantized, FP8 codes as float8_e4m3fn), or for a W8A8 ``module``
    ``{weight, weight_scale[, input_scale]}`` (int-quantized: int8 codes, the static activation scale)."""
    args = ct_weights_args(qt)
    scale_shape = {"channel": (qt.shape[0], 1), "tensor": (1,)}.get(args["strategy"], tuple(qt.scale.shape))
    scale = qt.scales().reshape(scale_shape).contiguous()  # float32 holding the stored scales
    if ct_input_args(module) is not None:
        out = {"weight": qt.values().to(torch.int8), "weight_scale": scale}
        if module.act == "static":  # the float32 scale W8A8Linear quantizes with
            out["input_scale"] = torch.tensor([module.static_scale], dtype=torch.float32)
        return out
    if args["type"] == "float":
        return {"weight": qt.values().to(torch.float8_e4m3fn), "weight_scale": scale}  # the grid values, exactly
    bits, half = args["num_bits"], 2 ** (args["num_bits"] - 1)
    q = qt.values().to(torch.int64)                  # symmetric: signed already; asymmetric: [0, 2^b - 1]
    signed = q if args["symmetric"] else q - half
    out = {"weight_packed": pack_int32(signed + half, bits), "weight_scale": scale,
           "weight_shape": torch.tensor(qt.shape, dtype=torch.int64)}
    if not args["symmetric"]:
        z = qt.zero_point.to(torch.int64).reshape(scale_shape)              # unsigned, so signed z + half = z
        out["weight_zero_point"] = pack_int32(z.T, bits).T.contiguous()     # packed along the rows
    return out


def _qtensors(report_or_qtensors) -> dict:
    qtensors = getattr(report_or_qtensors, "qtensors", report_or_qtensors)
    if not isinstance(qtensors, dict) or not qtensors:
        raise ValueError("export needs what quantize_model returned: export(model, report, folder) with "
                         "report.qtensors naming at least one quantized Linear")
    return qtensors


def quantization_config(model: nn.Module, qtensors: dict) -> dict:
    """The ``quantization_config`` entry of config.json: one config group per distinct spec and activation
    scheme (its ``targets`` the qualified Linear names), ``ignore`` every other Linear of the model."""
    groups, by_spec = {}, {}
    for name, qt in qtensors.items():
        args, act = ct_weights_args(qt), ct_input_args(model.get_submodule(name))
        key = (str(qt.spec), json.dumps(act, sort_keys=True))
        if key not in by_spec:
            by_spec[key] = f"group_{len(by_spec)}"
            groups[by_spec[key]] = {"targets": [], "weights": args, "input_activations": act, "output_activations": None,
                                    "format": CT_FORMATS[args["type"]] if act is None else CT_W8A8_FORMAT}
        groups[by_spec[key]]["targets"].append(name)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or hasattr(m, "out_features")]
    formats = {g["format"] for g in groups.values()}
    return {"quant_method": "compressed-tensors", "quantization_status": "compressed",
            "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "config_groups": groups, "ignore": [n for n in linears if n not in qtensors],
            "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {},
            "transform_config": {}, "version": metadata.version("compressed-tensors")}


def _check_modules(model: nn.Module, qtensors: dict):
    for name in qtensors:
        module = model.get_submodule(name)
        if isinstance(module, nn.Embedding) or hasattr(module, "num_embeddings"):
            raise ValueError(f"{name} is a quantized embedding; compressed-tensors export covers Linear layers: "
                             f"keep embeddings float in the recipe")
        if not isinstance(module, (nn.Linear, QuantLinear, W8A8Linear)):
            raise ValueError(f"{name} is a {type(module).__name__}, which has no compressed-tensors scheme (LLM.int8()'s "
                             f"float outlier columns are decided at run time); supported: {SUPPORTED}")
        if isinstance(module, W8A8Linear) and str(module.qweight.spec.granularity) != "channel":
            raise ValueError(f"{name}: W8A8 export needs int8 weights per output channel, got {module.qweight.spec}")
    if getattr(model.config, "tie_word_embeddings", False) and "lm_head" in qtensors:
        raise ValueError("lm_head is quantized but tied to the float input embedding (tie_word_embeddings); "
                         "keep lm_head float, or untie it in the model's config before quantizing")


def export_compressed_tensors(model: nn.Module, report_or_qtensors, folder, tokenizer=None) -> str:
    """Write the compressed-tensors folder (see the module docstring); return its path."""
    from safetensors.torch import save_file

    qtensors = _qtensors(report_or_qtensors)
    _check_modules(model, qtensors)
    qconfig = quantization_config(model, qtensors)  # checks every spec before anything is written
    tied = getattr(model.config, "tie_word_embeddings", False)
    tensors, seen = {}, set()
    for key, t in model.state_dict().items():
        module, _, local = key.rpartition(".")
        if module in qtensors and local == "weight":
            continue  # replaced by its compressed tensors below
        same = (t.data_ptr(), tuple(t.shape), t.dtype)
        if same in seen and tied:
            continue  # lm_head = embed_tokens: stored once, transformers ties it again on load
        tensors[key] = t.detach().clone() if same in seen else t.detach().contiguous()  # safetensors shares nothing
        seen.add(same)
    for name, qt in qtensors.items():
        tensors.update({f"{name}.{k}": v for k, v in ct_tensors(qt, model.get_submodule(name)).items()})

    os.makedirs(folder, exist_ok=True)
    config = model.config.to_dict()
    config["quantization_config"] = qconfig
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return str(folder)


# ---- GGUF -----------------------------------------------------------------------------------------
def _export_gguf(source, report_or_qtensors, path, tokenizer, mix, progress) -> str:
    from qlab.gguf.files import GGUFFile, quantize_gguf, write_gguf

    if report_or_qtensors is not None or tokenizer is not None:
        raise ValueError("format='gguf' writes a GGUFFile or re-quantizes a .gguf (its tokenizer is in its "
                         "metadata): export(gguf_file_or_path, None, path, format='gguf', mix=...)")
    if isinstance(source, GGUFFile):
        if mix is not None:
            raise ValueError("a GGUFFile is written as it is; mix= applies to a .gguf path")
        write_gguf(path, source)
    elif isinstance(source, (str, os.PathLike)):
        if mix is None:
            raise ValueError("re-quantizing a .gguf needs a llama.cpp mix, e.g. mix='Q4_K_M'")
        quantize_gguf(source, path, mix, progress=progress)
    else:
        raise ValueError(f"format='gguf' takes a GGUFFile or the path of a .gguf, not a {type(source).__name__}; "
                         f"a model quantized by quantize_model goes to format='compressed-tensors'")
    return str(path)
