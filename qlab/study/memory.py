"""Back-of-the-envelope memory: weights, KV cache and training state.

    weights   = n_params x bytes_per_weight              (fp32 4, fp16 2, int8 1, int4 0.5 B)
    KV cache  = 2 x n_layers x n_kv_heads x head_dim x context x batch x bytes_per_value
                (the 2 is one K and one V vector per layer, KV head and token)
    training  = n_params x 16 B                          (fp32 weights 4 + gradients 4 +
                                                          Adam first moment 4 + second moment 4;
                                                          activations not included)

These first tables (:func:`weights_table`, :func:`kv_cache_table`) take nominal sizes (7e9) and print decimal
gigabytes (1 GB = 1e9 bytes) as the usual tables do:
7B x 4 B = 28 GB at fp32, 14 GB at fp16, 7 GB at int8, 3.5 GB at int4.
Real low-bit formats also store scales: int4 with an fp16 scale per group of 128 costs
4 + 16/128 = 4.125 bits/weight.

The deployment calculator (:func:`deployment_bytes`) does the exact accounting from the shapes instead:
every tensor of a Llama-style decoder (:meth:`Arch.tensors`) gets a format from a recipe of name patterns
(the walker's, :mod:`qlab.models.walker`), and its bytes are counted exactly as
:class:`qlab.core.tensor.QuantizedTensor` stores them (codes, scales, zero points, ragged last groups
included); then the KV cache, an activation estimate and the training state are added. It returns bytes;
:func:`memory_table` prints binary GiB (2**30 bytes), the unit GPU memory is sold in:

>>> b = deployment_bytes(LLAMA2["7B"], weights="fp16", kv="fp16", context=4096)
>>> weights = b["weight_codes"] + b["embeddings"] + b["norms"]     # 6,738,415,616 params x 2 B
>>> round(weights / 2**30, 2), b["kv_cache"] / 2**30                # and 2 GiB of KV cache
(12.55, 2.0)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import fnmatch
import math

import pandas as pd

from qlab.core.packing import packed_nbytes
from qlab.core.spec import DOUBLE_QUANT_SPEC, SCALE_DTYPES, QuantSpec

GB = 1e9
GiB = 2**30
BYTES_PER_WEIGHT = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5, "int2": 0.25}
TRAINING_BYTES_PER_PARAM = 16  # fp32 weights + gradients + Adam m + Adam v
FLOAT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
LLAMA_STYLE = ("llama", "mistral")  # model types whose tensors Arch.tensors lists (no biases, gated MLP, RMSNorm)


@dataclass(frozen=True)
class Arch:
    """What the memory formulas need from a Llama-style decoder (no biases, gated MLP, RMSNorm).

    ``n_params`` is the size the tables quote (nominal, e.g. 7e9); :meth:`count_params` counts the real
    parameters from the shapes, which need ``hidden_size``, ``n_heads``, ``intermediate_size`` and
    ``vocab_size`` (the Llama-2 presets below have them).
    """

    n_params: float
    n_layers: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int | None = None
    n_heads: int | None = None
    intermediate_size: int | None = None
    vocab_size: int | None = None
    tied_embeddings: bool = False

    @classmethod
    def from_config(cls, config, n_params: float | None = None) -> "Arch":
        """From a transformers config or its dict (``num_hidden_layers``, ``num_key_value_heads``, ...).

        ``n_params`` defaults to :meth:`count_params` of the shapes the config gives.
        """
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        if get("model_type") not in (None, *LLAMA_STYLE):
            raise ValueError(f"model_type {get('model_type')!r} is not a Llama-style decoder "
                             f"({', '.join(LLAMA_STYLE)}): its tensors differ; build an "
                             f"Arch(n_params, n_layers, n_kv_heads, head_dim) for the KV-cache formulas only")
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if get(key) is None:
                raise ValueError(f"config has no {key!r}: pass a Llama-style decoder config or its dict")
        if get("attention_bias") or get("mlp_bias") or get("num_local_experts"):
            raise ValueError("config has linear biases (attention_bias / mlp_bias) or experts: not modelled by "
                             "Arch; build an Arch(n_params, n_layers, n_kv_heads, head_dim) for the KV-cache "
                             "formulas only")
        heads = get("num_attention_heads")
        arch = cls(n_params, get("num_hidden_layers"), get("num_key_value_heads") or heads,
                   get("head_dim") or get("hidden_size") // heads, get("hidden_size"), heads,
                   get("intermediate_size"), get("vocab_size"), bool(get("tie_word_embeddings", False)))
        return arch if n_params is not None else dataclasses.replace(arch, n_params=arch.count_params())

    def tensors(self) -> dict:
        """``{name: shape}`` of every parameter, named as transformers' Llama names its modules.

        Linear weights are [out, in]; ``lm_head`` is listed even when tied (the walker quantizes a tied
        head on its own when a recipe names it). Example (SmolLM2-135M, hidden 576, 9 heads, 3 KV heads):
        ``model.layers.0.self_attn.k_proj`` is (192, 576).
        """
        h, d, i = self.hidden_size, self.head_dim, self.intermediate_size
        if None in (h, self.n_heads, i, self.vocab_size):
            raise ValueError("this Arch has no shapes (hidden_size, n_heads, intermediate_size, vocab_size): "
                             "build it with Arch.from_config or give them")
        q, kv = self.n_heads * d, self.n_kv_heads * d
        out = {"model.embed_tokens": (self.vocab_size, h)}
        for layer in range(self.n_layers):
            p = f"model.layers.{layer}"
            out |= {f"{p}.self_attn.q_proj": (q, h), f"{p}.self_attn.k_proj": (kv, h),
                    f"{p}.self_attn.v_proj": (kv, h), f"{p}.self_attn.o_proj": (h, q),
                    f"{p}.mlp.gate_proj": (i, h), f"{p}.mlp.up_proj": (i, h), f"{p}.mlp.down_proj": (h, i),
                    f"{p}.input_layernorm": (h,), f"{p}.post_attention_layernorm": (h,)}
        out |= {"model.norm": (h,), "lm_head": (self.vocab_size, h)}
        return out

    def count_params(self) -> int:
        """Embeddings (+ an untied lm_head) + L x (attention + MLP + 2 norms) + the final norm.

        >>> LLAMA2["7B"].count_params()   # 2 x 32000 x 4096 + 32 x (4 x 4096^2 + 3 x 4096 x 11008 + 2 x 4096) + 4096
        6738415616
        """
        tensors = self.tensors()
        if self.tied_embeddings:
            del tensors["lm_head"]
        return sum(math.prod(s) for s in tensors.values())


# Llama-2 shapes (Touvron et al. 2023, Table 1 / released configs), with nominal sizes as the
# tables quote them. 70B uses grouped-query attention: 8 KV heads for 64 query heads.
LLAMA2 = {
    "7B": Arch(7e9, n_layers=32, n_kv_heads=32, head_dim=128, hidden_size=4096, n_heads=32,
               intermediate_size=11008, vocab_size=32000),
    "13B": Arch(13e9, n_layers=40, n_kv_heads=40, head_dim=128, hidden_size=5120, n_heads=40,
                intermediate_size=13824, vocab_size=32000),
    "70B": Arch(70e9, n_layers=80, n_kv_heads=8, head_dim=128, hidden_size=8192, n_heads=64,
                intermediate_size=28672, vocab_size=32000),
}
# Llama 3 (Meta's released configs): grouped-query attention everywhere (8 KV heads), a 128,256-token vocabulary.
LLAMA3 = {
    "8B": Arch(8e9, n_layers=32, n_kv_heads=8, head_dim=128, hidden_size=4096, n_heads=32,
               intermediate_size=14336, vocab_size=128256),
    "70B": Arch(70e9, n_layers=80, n_kv_heads=8, head_dim=128, hidden_size=8192, n_heads=64,
                intermediate_size=28672, vocab_size=128256),
}
# The embedded model (HuggingFaceTB/SmolLM2-135M's config): 134,515,008 parameters, tied embeddings.
SMOLLM2_135M = Arch(134_515_008, n_layers=30, n_kv_heads=3, head_dim=64, hidden_size=576, n_heads=9,
                    intermediate_size=1536, vocab_size=49152, tied_embeddings=True)
PRESETS = ({f"Llama-2-{k}": v for k, v in LLAMA2.items()} | {f"Llama-3-{k}": v for k, v in LLAMA3.items()}
           | {"SmolLM2-135M": SMOLLM2_135M})


def weight_bytes(n_params: float, fmt: str | float = "fp16") -> float:
    """Bytes of the weights: ``n_params`` x bytes per weight (a format name or bits per weight)."""
    if not n_params >= 0:
        raise ValueError(f"n_params must be a non-negative count, got {n_params!r}")
    if not isinstance(fmt, str) and not (isinstance(fmt, (int, float)) and fmt > 0):
        raise ValueError(f"bits per weight must be a positive number (or a format name), got {fmt!r}")
    if isinstance(fmt, str):
        if fmt not in BYTES_PER_WEIGHT:
            raise ValueError(f"unknown format {fmt!r}; known: {', '.join(BYTES_PER_WEIGHT)} (or pass bits)")
        return n_params * BYTES_PER_WEIGHT[fmt]
    return n_params * fmt / 8


def kv_cache_bytes(arch: Arch, context: int, batch: int = 1, bytes_per_value: float = 2.0) -> float:
    """2 x layers x KV heads x head_dim x context x batch x bytes.

    >>> kv_cache_bytes(LLAMA2["7B"], 4096) / 2**30   # Llama-2-7B, 4k context, fp16: 2 GiB
    2.0
    """
    if context < 0 or batch < 1:
        raise ValueError("context must be >= 0 and batch >= 1")
    return 2 * arch.n_layers * arch.n_kv_heads * arch.head_dim * context * batch * bytes_per_value


def training_bytes(n_params: float) -> float:
    """Full fine-tuning with Adam in fp32: 16 bytes per parameter (activations excluded)."""
    return n_params * TRAINING_BYTES_PER_PARAM


def weights_table(archs: dict | None = None, formats=("fp32", "fp16", "int8", "int4")) -> pd.DataFrame:
    """GB of weights per model (rows) and format (columns), plus training at 16 B/param."""
    archs = LLAMA2 if archs is None else archs
    rows = {
        name: {**{f: weight_bytes(a.n_params, f) / GB for f in formats}, "training (16 B/param)": training_bytes(a.n_params) / GB}
        for name, a in archs.items()
    }
    return pd.DataFrame(rows).T


def kv_cache_table(archs: dict | None = None, contexts=(4096, 32768, 131072), bytes_per_value: float = 2.0) -> pd.DataFrame:
    """GB of KV cache (batch 1) per model (rows) and context length (columns)."""
    archs = LLAMA2 if archs is None else archs
    return pd.DataFrame(
        {name: {ctx: kv_cache_bytes(a, ctx, 1, bytes_per_value) / GB for ctx in contexts} for name, a in archs.items()}
    ).T


# ---------------------------------------------------------------- exact bytes of one weight tensor

def tensor_bytes(fmt, shape) -> dict:
    """``{'codes', 'scales', 'zero_points'}``: the bytes a weight of ``shape`` takes in ``fmt``.

    ``fmt`` is a :class:`QuantSpec` (counted as ``QuantizedTensor.nbytes`` counts: packed codes, one scale
    per group at the spec's scale dtype (or QLoRA's second level under ``dq``), integer zero points at the
    grid's width or float minima at the scale's), a GGUF block type such as ``'Q4_K'`` (whole blocks of
    ``type_size`` bytes, counted as codes), a float dtype ``'fp32' | 'fp16' | 'bf16'``, or a number of bits
    per weight (everything counted as codes). Example: int4, groups of 128, fp16 scales, 4-bit zero points,
    a [1536, 576] weight: 576 = 4 x 128 + 64, so 5 groups per row:

    >>> tensor_bytes(QuantSpec.parse("int4-g128-asym-minmax"), (1536, 576))
    {'codes': 442368, 'scales': 15360, 'zero_points': 3840}
    """
    numel = math.prod(shape)
    if isinstance(fmt, str) and fmt in FLOAT_BYTES:
        return {"codes": numel * FLOAT_BYTES[fmt], "scales": 0, "zero_points": 0}
    if isinstance(fmt, (int, float)) and not isinstance(fmt, bool):
        if not fmt > 0:
            raise ValueError(f"bits per weight must be positive, got {fmt!r}")
        return {"codes": numel * fmt / 8, "scales": 0, "zero_points": 0}
    if isinstance(fmt, str):  # a GGUF block type
        from qlab.gguf.blocks import get_format

        block = get_format(fmt)
        block.check_row(shape[-1])
        return {"codes": numel // block.block_size * block.type_size, "scales": 0, "zero_points": 0}
    spec = QuantSpec.parse(fmt)
    n_groups = spec.granularity.n_groups(tuple(shape))
    scale_width = SCALE_DTYPES[spec.scale_dtype].itemsize
    if spec.double_quant:  # QLoRA: 8-bit scales in blocks of 256 with fp32 second-level scales, + the fp32 mean
        scales = sum(tensor_bytes(DOUBLE_QUANT_SPEC, (n_groups,)).values()) + 4
    else:
        scales = 0 if spec.rule == "none" else n_groups * scale_width
    if spec.float_min:
        zero_points = n_groups * scale_width
    else:
        zero_points = 0 if spec.symmetric else packed_nbytes(n_groups, spec.bits)
    return {"codes": packed_nbytes(numel, spec.bits), "scales": scales, "zero_points": zero_points}


def _format(value, dtype: str):
    """A recipe value -> what :func:`tensor_bytes` takes (the method does not change the size)."""
    if value is None:
        return dtype
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value in FLOAT_BYTES:
        return value
    from qlab.gguf.blocks import FORMATS as GGUF_TYPES

    if isinstance(value, str) and value.upper() in GGUF_TYPES:
        return value.upper()
    from qlab.models.walker import entry  # the walker's own reading of a recipe value

    e = entry(value)
    if e.method == "gguf" and e.spec == "F16":
        return "fp16"
    return e.spec  # a QuantSpec, or a GGUF type name such as 'Q4_K'


def resolve_formats(arch: Arch, recipe: dict, dtype: str = "fp16") -> dict:
    """``{tensor name: format}``: the first pattern of ``recipe`` (fnmatch, dict order) that matches a 2-D
    weight decides, as in :func:`qlab.models.walker.resolve`; unmatched weights and all norms stay ``dtype``.
    A tied ``lm_head`` in the same format as the embedding is stored once: it maps to ``None``."""
    if not isinstance(recipe, dict):
        raise ValueError(f"a recipe is a dict of name patterns -> formats, got {type(recipe).__name__}")
    tensors = arch.tensors()
    matrices = [n for n, s in tensors.items() if len(s) == 2]
    rules = [(p, _format(v, dtype)) for p, v in recipe.items()]
    for pattern, _ in rules:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in matrices):
            raise ValueError(f"recipe pattern {pattern!r} matches no weight (e.g. {matrices[-1]!r}, "
                             f"'model.layers.*', 'model.embed_tokens')")
    out = {}
    for name, shape in tensors.items():
        hit = next((f for p, f in rules if fnmatch.fnmatchcase(name, p)), dtype) if len(shape) == 2 else dtype
        out[name] = hit
    if arch.tied_embeddings and out["lm_head"] == out["model.embed_tokens"]:
        out["lm_head"] = None
    return out


# ---------------------------------------------------------------- KV cache formats

@dataclass(frozen=True)
class KVFormat:
    """How a KV cache stores each key and value vector (what :mod:`qlab.methods.kv.cache` holds).

    scales:  'none'   a float format of ``bits`` (16: fp16/bf16)
             'tensor' codes + one static fp32 scale per layer and side (vLLM's fp8 cache, ``FP8('tensor')``)
             'token'  codes + one fp32 scale per token, KV head and side (``FP8('token')``)
             'kivi'   KIVI (Liu et al. 2024, sec. 3): fp32 scale and minimum per group; keys per channel over
                      ``group_size`` tokens, values per token over ``group_size`` channels; the newest
                      ``residual`` tokens stay float (keys leave that window a whole group at a time)

    Scales and minima are ``stat_bytes`` wide (fp32, as qlab stores them; 2 for an fp16 layout).
    """

    bits: int
    scales: str = "none"
    group_size: int = 32
    residual: int = 0
    stat_bytes: int = 4  # width of each scale / minimum (qlab's caches keep them fp32)

    def __post_init__(self):
        if self.scales not in ("none", "tensor", "token", "kivi"):
            raise ValueError(f"scales must be 'none', 'tensor', 'token' or 'kivi', got {self.scales!r}")
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 32:
            raise ValueError(f"bits must be an integer in 1..32, got {self.bits!r}")

    def nbytes(self, arch: Arch, context: int, batch: int = 1, float_bytes: int = 2) -> int:
        """Bytes held for ``context`` tokens of ``batch`` sequences; ``float_bytes`` for the float residual.

        >>> KV_FORMATS["kivi2"].nbytes(LLAMA2["7B"], 4096) / 2**30   # 2-bit codes, fp32 stats, 128 fp16 tokens
        0.546875
        """
        if context < 0 or batch < 1:
            raise ValueError(f"context must be >= 0 and batch >= 1, got context={context!r}, batch={batch!r}")
        L, H, D, T = arch.n_layers, arch.n_kv_heads, arch.head_dim, context
        heads = L * H * batch  # (layer, sequence, KV head) triples, each with T key and T value vectors
        if self.scales == "none":
            return 2 * heads * packed_nbytes(T * D, self.bits)
        if self.scales == "tensor":
            return 2 * heads * packed_nbytes(T * D, self.bits) + 2 * L * self.stat_bytes
        if self.scales == "token":
            return 2 * heads * T * (packed_nbytes(D, self.bits) + self.stat_bytes)
        G, R = self.group_size, self.residual
        t_keys = max(T - R, 0) // G * G  # keys quantized in whole groups of G tokens
        t_values = max(T - R, 0)
        keys = (packed_nbytes(t_keys * D, self.bits) + t_keys // G * D * 2 * self.stat_bytes
                + (T - t_keys) * D * float_bytes)
        values = (packed_nbytes(t_values * D, self.bits) + t_values * math.ceil(D / G) * 2 * self.stat_bytes
                  + (T - t_values) * D * float_bytes)
        return heads * (keys + values)


# KIVI's settings in the paper's main experiments: groups of 32, the newest 128 tokens in full precision.
KV_FORMATS = {
    "fp32": KVFormat(32), "fp16": KVFormat(16), "bf16": KVFormat(16),
    "fp8": KVFormat(8, "tensor"), "fp8-token": KVFormat(8, "token"),
    "kivi2": KVFormat(2, "kivi", group_size=32, residual=128),
    "kivi4": KVFormat(4, "kivi", group_size=32, residual=128),
}


def kv_format(kv) -> KVFormat:
    """A name of :data:`KV_FORMATS`, a :class:`KVFormat`, bits (a float format) or (bits, group_size) (KIVI
    grouping, no float residual)."""
    if isinstance(kv, KVFormat):
        return kv
    if isinstance(kv, str):
        if kv not in KV_FORMATS:
            raise ValueError(f"unknown KV format {kv!r}; known: {', '.join(KV_FORMATS)} "
                             f"(or bits, or (bits, group_size))")
        return KV_FORMATS[kv]
    if isinstance(kv, int) and not isinstance(kv, bool):
        return KVFormat(kv)
    if isinstance(kv, tuple) and len(kv) == 2:
        return KVFormat(kv[0], "kivi", group_size=kv[1])
    raise ValueError(f"kv must be a format name ({', '.join(KV_FORMATS)}), bits, (bits, group_size) or a KVFormat, "
                     f"got {kv!r}")


# ---------------------------------------------------------------- activations and optimizer state

def activation_bytes(arch: Arch, seq_len: int, batch: int = 1, attention: str = "eager",
                     bytes_per_value: int = 2) -> float:
    """Activations one decoder layer keeps for the backward pass, 16-bit, no parallelism
    (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", eq. 1):

        s b h (34 + 5 a s / h)        s = seq_len, b = batch, h = hidden, a = heads

    34 s b h are the layer's inputs, projections, MLP and dropout masks; 5 a s^2 b are the attention scores,
    their softmax (2 B each) and its dropout mask (1 B). ``attention='flash'`` drops that last term
    (FlashAttention never stores the s x s matrices; the paper's selective recomputation gives the same 34 s b h).
    It is a GPT-layer estimate (MLP of 4h, dropout); a Llama layer differs in detail, not in order: on a tiny
    Llama, autograd saves 0-30% less than the eager estimate and ~9% more than the fused one
    (tests/study/test_deployment.py). Other widths scale it by ``bytes_per_value / 2`` (fp32: twice as much).

    >>> activation_bytes(LLAMA2["7B"], 4096, attention="flash") / 2**30   # 34 x 4096 x 4096 B
    0.53125
    """
    if attention not in ("eager", "flash"):
        raise ValueError(f"attention must be 'eager' (scores stored) or 'flash', got {attention!r}")
    s, b, h, a = seq_len, batch, arch.hidden_size, arch.n_heads
    return s * b * h * (34 + (5 * a * s / h if attention == "eager" else 0)) * bytes_per_value / 2


MIN_8BIT_SIZE = 4096  # bitsandbytes keeps 32-bit state for tensors smaller than this (min_8bit_size)


def optimizer_state_bytes(numel: int, optimizer: str = "adamw") -> float:
    """Optimizer state of one parameter tensor of ``numel`` elements.

    adamw / adam:  two fp32 moments, 8 B per parameter (Kingma & Ba 2015; Loshchilov & Hutter 2019)
    sgd:           plain SGD keeps nothing;  sgd_momentum: one fp32 momentum buffer, 4 B
    adam8bit:      bitsandbytes' block-wise 8-bit Adam (Dettmers et al. 2022): two uint8 states plus one fp32
                   absmax per block of 256 for each; tensors under 4096 elements keep fp32 states (8 B)

    >>> optimizer_state_bytes(1024, "adam8bit"), optimizer_state_bytes(4096, "adam8bit")
    (8192, 8320)
    """
    if optimizer in ("adamw", "adam"):
        return 8 * numel
    if optimizer == "sgd":
        return 0
    if optimizer == "sgd_momentum":
        return 4 * numel
    if optimizer == "adam8bit":
        return 8 * numel if numel < MIN_8BIT_SIZE else 2 * numel + 2 * 4 * math.ceil(numel / 256)
    raise ValueError(f"unknown optimizer {optimizer!r}; known: adamw, adam, sgd, sgd_momentum, adam8bit")


# ---------------------------------------------------------------- the deployment calculator

def as_arch(arch) -> Arch:
    """An :class:`Arch`, a name of :data:`PRESETS`, or a transformers config (object or dict)."""
    if isinstance(arch, Arch):
        return arch
    if isinstance(arch, str):
        if arch not in PRESETS:
            raise ValueError(f"unknown model {arch!r}; presets: {', '.join(PRESETS)} (or pass a transformers config)")
        return PRESETS[arch]
    return Arch.from_config(arch)


def _recipe(weights, embeddings) -> dict:
    if isinstance(weights, dict) and "spec" not in weights:  # a recipe, not one walker entry {"method", "spec"}
        recipe = dict(weights)
    else:
        recipe = {} if weights is None else {"model.layers.*": weights}
    if embeddings is not None:
        recipe.setdefault("model.embed_tokens", embeddings)
        recipe.setdefault("lm_head", embeddings)
    return recipe


def deployment_bytes(arch, weights=None, kv="fp16", context: int = 4096, batch: int = 1, mode: str = "inference",
                     optimizer: str = "adamw", activations="estimate", embeddings=None, dtype: str = "fp16") -> dict:
    """Bytes of a deployment, broken down; every entry is in bytes.

    arch:        an :class:`Arch`, a preset name ('Llama-2-7B', 'SmolLM2-135M') or a transformers config
    weights:     the format of the decoder blocks' linears (a spec string such as 'int4-g128-asym-minmax',
                 'gptq:int4-g128-asym-minmax', a GGUF type 'Q4_K' or 'gguf:Q4_K', or bits per weight), or a recipe
                 ``{name pattern: format}`` as the walker takes (a walker entry ``{"method": "awq", "spec": ...}``
                 is one format for the block linears); None: everything in ``dtype``
    embeddings:  the format of ``model.embed_tokens`` and ``lm_head`` (default: ``dtype``); norms stay ``dtype``
    kv:          'fp16', 'fp8', 'fp8-token', 'kivi2', 'kivi4' (:data:`KV_FORMATS`), bits, (bits, group_size) or a
                 :class:`KVFormat`; the cache holds ``context`` tokens of ``batch`` sequences
    mode:        'inference' (weights + KV cache + one layer's activations at a prefill of ``context`` tokens) or
                 'training' (full fine-tuning on sequences of ``context`` tokens: no KV cache; weights and
                 gradients in ``dtype``, an fp32 master copy when ``dtype`` is 16-bit, the optimizer's state,
                 every layer's activations and the fp32 logits, 4 s b V) -- the ZeRO paper's accounting
                 (Rajbhandari et al. 2020, sec. 3.1): AdamW in mixed precision is 2 + 2 + 4 + 4 + 4 = 16 B/param
    activations: 'estimate' (:func:`activation_bytes` with a fused attention kernel, FlashAttention or SDPA, that
                 never stores the s x s scores: what serving engines and training stacks run), 'eager' (the
                 scores stored too: + 5 a s^2 b per layer), 'none', or a number of bytes

    Returns weight_codes (block linears), embeddings (embedding and lm_head), norms, scales, zero_points
    (zero points or float minima), kv_cache, activations, gradients, master_weights, optimizer, total.
    """
    arch = as_arch(arch)
    if dtype not in FLOAT_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(FLOAT_BYTES)}, got {dtype!r}")
    if mode not in ("inference", "training"):
        raise ValueError(f"mode must be 'inference' or 'training', got {mode!r}")
    if not isinstance(context, int) or context < 0 or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"context must be an integer >= 0 and batch >= 1, got context={context!r}, batch={batch!r}")
    formats = resolve_formats(arch, _recipe(weights, embeddings), dtype)
    tensors = arch.tensors()
    out = dict.fromkeys(("weight_codes", "embeddings", "norms", "scales", "zero_points", "kv_cache", "activations",
                         "gradients", "master_weights", "optimizer"), 0)
    for name, fmt in formats.items():
        if fmt is None:  # a tied lm_head stored once, with the embedding
            continue
        if mode == "training" and fmt not in FLOAT_BYTES:
            raise ValueError(f"training updates float weights, but {name} is {fmt}: full fine-tuning of a quantized "
                             f"model is not modelled (nor is QLoRA yet); give weights=None")
        part = tensor_bytes(fmt, tensors[name])
        if len(tensors[name]) == 1:
            kind = "norms"
        else:
            kind = "embeddings" if name in ("model.embed_tokens", "lm_head") else "weight_codes"
        out[kind] += part["codes"]
        out["scales"] += part["scales"]
        out["zero_points"] += part["zero_points"]
        if mode == "training":
            numel = math.prod(tensors[name])
            out["gradients"] += numel * FLOAT_BYTES[dtype]
            out["master_weights"] += 4 * numel if dtype != "fp32" else 0
            out["optimizer"] += optimizer_state_bytes(numel, optimizer)
    if mode == "inference":
        out["kv_cache"] = kv_format(kv).nbytes(arch, context, batch, FLOAT_BYTES[dtype])
    if activations in ("estimate", "eager"):
        attention = "eager" if activations == "eager" else "flash"
        per_layer = activation_bytes(arch, context, batch, attention, FLOAT_BYTES[dtype])
        if mode == "inference":  # one layer's at a time (upper end: without a backward pass most is freed early)
            out["activations"] = per_layer
        else:  # every layer's, + the fp32 logits the loss reads: 4 s b V
            out["activations"] = arch.n_layers * per_layer + 4 * context * batch * arch.vocab_size
    elif isinstance(activations, (int, float)) and not isinstance(activations, bool) and activations >= 0:
        out["activations"] = activations
    elif activations != "none":
        raise ValueError(f"activations must be 'estimate', 'eager', 'none' or a number of bytes, got {activations!r}")
    out["total"] = sum(out.values())
    return out


def breakdown_gib(breakdown: dict) -> pd.Series:
    """A :func:`deployment_bytes` breakdown in GiB, its non-zero entries only (for display)."""
    return pd.Series({k: v / GiB for k, v in breakdown.items() if v}, name="GiB")


# GPU memory sizes in GiB: NVIDIA's "80 GB" A100 holds 81,920 MiB, so these nominal sizes are binary.
GPUS = {"16 GiB (T4, V100)": 16, "24 GiB (RTX 4090, A10)": 24, "40 GiB (A100-40G)": 40, "80 GiB (A100, H100)": 80}


def fits(breakdown: dict, gpu_gib: float, reserve_gib: float = 0.0) -> bool:
    """Does the ``total`` of a :func:`deployment_bytes` breakdown fit in ``gpu_gib`` GiB, keeping ``reserve_gib``
    free for what the breakdown leaves out (the CUDA context, the allocator's fragmentation: measure them)?"""
    if not gpu_gib > 0 or reserve_gib < 0:
        raise ValueError(f"gpu_gib must be > 0 and reserve_gib >= 0, got {gpu_gib!r}, {reserve_gib!r}")
    return breakdown["total"] <= (gpu_gib - reserve_gib) * GiB


def fits_table(breakdown: dict, gpus: dict | None = None, reserve_gib: float = 0.0) -> dict:
    """``{gpu: fits?}`` over :data:`GPUS` (or ``gpus``, name -> GiB)."""
    return {name: fits(breakdown, gib, reserve_gib) for name, gib in (gpus or GPUS).items()}


# The formats of the usual tables, as qlab specs: int8 per output channel with fp16 scales, int4 in
# groups of 128 with a 4-bit zero point (GPTQ / AWQ checkpoints), NF4 as bitsandbytes stores it (fp32 absmax
# per 64 weights, no double quantization). Only the decoder blocks' linears are quantized, as those tools do.
TABLE_FORMATS = {"fp16": None, "int8": "int8-channel-sym-absmax", "int4 g128": "int4-g128-asym-minmax",
                 "nf4": "nf4-b64-sfp32"}
TABLE_MODELS = ("Llama-2-7B", "Llama-2-13B", "Llama-2-70B", "SmolLM2-135M")


def memory_table(models=TABLE_MODELS, formats: dict | None = None, contexts=(4096, 32768, 131072), batch: int = 1,
                 kv="fp16") -> pd.DataFrame:
    """GiB per (model, format) row: the weights (codes, embeddings, norms), their scales and zero points,
    bits per parameter over the whole model, then the KV cache and weights + KV for each context.
    Activations are left out (they depend on the attention kernel and the prefill chunk)."""
    formats = TABLE_FORMATS if formats is None else formats
    rows = {}
    for model in models:
        arch = as_arch(model)
        for label, fmt in formats.items():
            b = deployment_bytes(arch, fmt, context=0, activations="none")
            row = {}
            for ctx in contexts:
                kv_bytes = kv_format(kv).nbytes(arch, ctx, batch)
                row[f"KV @ {ctx}"] = kv_bytes / GiB
                row[f"total @ {ctx}"] = (b["total"] + kv_bytes) / GiB
            weights = b["weight_codes"] + b["embeddings"] + b["norms"]
            overhead = b["scales"] + b["zero_points"]
            rows[(model, label)] = {"weights": weights / GiB, "scales + zeros": overhead / GiB,
                                    "bits/param": 8 * (weights + overhead) / arch.count_params(), **row}
    table = pd.DataFrame(rows).T
    table.index.names = ["model", "format"]
    return table
