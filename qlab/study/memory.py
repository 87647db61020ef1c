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

Around it: :func:`gguf_mix_recipe` turns a llama.cpp mix (Q4_K_M ...) into a per-tensor recipe; :data:`GPU_MEMORY`
and :func:`fits_table` say which card holds a breakdown; :func:`seed_figures` recomputes every memory figure the
source articles print (theirs, ours, the ratio; the claims ledger, :mod:`qlab.study.ledger`, gives the verdicts);
:func:`decision_table` sets measured quality (KL on the embedded model) against bytes and the roofline's decode
bound (:mod:`qlab.study.roofline`).

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
# LLaMA 1 (Touvron et al. 2023a, Table 2): multi-head attention, 2k context; 65B is what QLoRA fine-tunes.
LLAMA1 = {
    "33B": Arch(32.5e9, n_layers=60, n_kv_heads=52, head_dim=128, hidden_size=6656, n_heads=52,
                intermediate_size=17920, vocab_size=32000),
    "65B": Arch(65.2e9, n_layers=80, n_kv_heads=64, head_dim=128, hidden_size=8192, n_heads=64,
                intermediate_size=22016, vocab_size=32000),
}
PRESETS = ({f"Llama-2-{k}": v for k, v in LLAMA2.items()} | {f"Llama-3-{k}": v for k, v in LLAMA3.items()}
           | {f"LLaMA-1-{k}": v for k, v in LLAMA1.items()} | {"SmolLM2-135M": SMOLLM2_135M})


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
    outlier_ratio: float = 0.0  # 'gear': the fraction s of entries kept exact (fp16 value + int16/int32 position)
    rank: int = 0  # 'gear': the rank r of the error's low-rank factors A [n, r] and B [r, D] (fp16)

    def __post_init__(self):
        if self.scales not in ("none", "tensor", "token", "kivi", "gear"):
            raise ValueError(f"scales must be 'none', 'tensor', 'token', 'kivi' or 'gear', got {self.scales!r}")
        if not 0 <= self.outlier_ratio < 1 or not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"outlier_ratio must be in [0, 1) and rank an int >= 0, got {self.outlier_ratio!r}, "
                             f"{self.rank!r}")
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
        if self.scales == "gear":
            return heads * self._gear_bytes(T, D, float_bytes)
        t_keys = max(T - R, 0) // G * G  # keys quantized in whole groups of G tokens
        t_values = max(T - R, 0)
        keys = (packed_nbytes(t_keys * D, self.bits) + t_keys // G * D * 2 * self.stat_bytes
                + (T - t_keys) * D * float_bytes)
        values = (packed_nbytes(t_values * D, self.bits) + t_values * math.ceil(D / G) * 2 * self.stat_bytes
                  + (T - t_values) * D * float_bytes)
        return heads * (keys + values)

    def _gear_bytes(self, T: int, D: int, float_bytes: int) -> int:
        """One head's keys and values under GEAR, written by a single prefill of T tokens: one block of the n
        tokens that leave the float window (whole groups of G), each side holding KIVI's codes and stats,
        k = floor(s n D) outliers (fp16 value + position) and the rank-r factors (n + D) r in fp16."""
        G, R = self.group_size, self.residual
        n = max(T - R, 0) // G * G
        rest = (T - n) * D * float_bytes
        if n == 0:
            return 2 * rest
        k = int(self.outlier_ratio * n * D)
        position = 2 if n * D <= 2**15 else 4  # int16 positions when they fit, as qlab.methods.kv.gear stores them
        extra = k * (2 + position) + (n + D) * self.rank * 2
        codes = packed_nbytes(n * D, self.bits)
        keys = codes + n // G * D * 2 * self.stat_bytes  # a scale and a minimum per channel and group of G tokens
        values = codes + n * math.ceil(D / G) * 2 * self.stat_bytes  # ... per token and group of G channels
        return keys + values + 2 * (extra + rest)


# KIVI's settings in the paper's main experiments: groups of 32, the newest 128 tokens in full precision.
KV_FORMATS = {
    "fp32": KVFormat(32), "fp16": KVFormat(16), "bf16": KVFormat(16),
    "fp8": KVFormat(8, "tensor"), "fp8-token": KVFormat(8, "token"),
    "kivi2": KVFormat(2, "kivi", group_size=32, residual=128),
    "kivi4": KVFormat(4, "kivi", group_size=32, residual=128),
    # GEAR (Kang et al. 2024) as qlab.methods.kv.cache.GEAR defaults: KIVI's Q, 2% outliers, rank 2, 32 float tokens
    "gear2": KVFormat(2, "gear", group_size=32, residual=32, outlier_ratio=0.02, rank=2),
    "gear4": KVFormat(4, "gear", group_size=32, residual=32, outlier_ratio=0.02, rank=2),
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


# ---------------------------------------------------------------- GPUs, GGUF mixes

# More devices for the calculator's verdict, in GiB as sold (an "80 GB" card holds 80 GiB). Apple's unified memory
# is shared with the system: macOS lets the GPU wire about 75% of it by default (raise with iogpu.wired_limit_mb).
GPU_MEMORY = {
    "RTX 3080 (10 GiB)": 10, "T4 / V100 (16 GiB)": 16, "RTX 3090 / 4090 (24 GiB)": 24, "A100-40G (40 GiB)": 40,
    "L40S (48 GiB)": 48, "A100 / H100 (80 GiB)": 80, "M3 Max, 75% of 128 GiB": 96, "2 x A100-80G (160 GiB)": 160,
}

_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def gguf_name(name: str) -> str:
    """transformers' Llama name -> llama.cpp's GGUF tensor name (``model.layers.3.self_attn.v_proj`` ->
    ``blk.3.attn_v.weight``); 1-D norms are not mapped (a mix never quantizes them)."""
    if name == "model.embed_tokens":
        return "token_embd.weight"
    if name == "lm_head":
        return "output.weight"
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _GGUF_NAMES:
        return f"blk.{parts[2]}.{_GGUF_NAMES[parts[3]]}.weight"
    raise ValueError(f"{name!r} is not a Llama linear or embedding")


def gguf_mix_recipe(arch, mix: str) -> dict:
    """A llama.cpp mix ('Q4_K_M', ...) as a recipe ``{tensor name: GGUF type}`` for :func:`deployment_bytes`,
    chosen by :func:`qlab.gguf.mixes.choose_types` (its rules, its layer counters, its row-length fallback).

    >>> r = gguf_mix_recipe("Llama-2-7B", "Q4_K_M")
    >>> r["model.layers.0.self_attn.v_proj"], r["model.layers.4.self_attn.v_proj"], r["lm_head"]
    ('Q6_K', 'Q4_K', 'Q6_K')
    """
    from qlab.gguf.mixes import choose_types

    arch = as_arch(arch)
    matrices = {n: s for n, s in arch.tensors().items() if len(s) == 2}
    if arch.tied_embeddings:
        del matrices["lm_head"]
    names = {gguf_name(n): n for n in matrices}
    choices = choose_types(mix, [(g, matrices[n]) for g, n in names.items()], n_gqa=arch.n_heads // arch.n_kv_heads)
    recipe = {names[c["name"]]: ("fp16" if c["qtype"] == "F16" else c["qtype"]) for c in choices}
    if arch.tied_embeddings:
        recipe["lm_head"] = recipe["model.embed_tokens"]
    return recipe


def weights_gb(arch, weights=None, embeddings=None, unit: float = GB, dtype: str = "fp16") -> float:
    """Weights + scales + zero points of ``arch`` (no KV cache, no activations), in ``unit`` (default GB, 1e9)."""
    b = deployment_bytes(arch, weights, context=0, activations="none", embeddings=embeddings, dtype=dtype)
    return b["total"] / unit


# ---------------------------------------------------------------- the articles' memory figures, recomputed

def _overhead_pct(spec: str, arch: str = "Llama-2-7B") -> float:
    """Scales + zero points as a percentage of the codes, over the decoder blocks' linears."""
    b = deployment_bytes(arch, spec, context=0, activations="none")
    return 100 * (b["scales"] + b["zero_points"]) / b["weight_codes"]


def _int4_8k_total(arch: str) -> float:
    """GiB of int4-g128 weights + an fp16 KV cache of 8192 tokens + one layer's prefill activations (fused)."""
    return deployment_bytes(arch, "int4-g128-asym-minmax", context=8192)["total"] / GiB


def _qlora_weights(arch: str = "LLaMA-1-65B") -> float:
    """GB of QLoRA's frozen base: every block linear NF4 with double-quantized scales, embeddings and head bf16."""
    return weights_gb(arch, "nf4-b64-dq")


# One entry per memory figure the articles print: (article, what, the article's number, unit, ours). "ours" is
# computed from the real shapes (Arch presets) in the article's unit; GB means 1e9 bytes, GiB 2**30.
SEED_FIGURES = {
    "s000-70b-fp16": ("000", "70B weights, fp16 (Llama-2-70B)", 140, "GB", lambda: weights_gb("Llama-2-70B")),
    "s000-g128-scales-7b": ("000", "scales of a 7B at int4, groups of 128 (fp16 scales)", 40, "MB",
                            lambda: deployment_bytes("Llama-2-7B", "int4-g128-sym-absmax", context=0,
                                                     activations="none")["scales"] / 1e6),
    "s000-g128-overhead": ("000", "per-group (128) overhead, % of the 4-bit codes (fp16 scale)", 0.5, "%",
                           lambda: _overhead_pct("int4-g128-sym-absmax")),
    "s000-channel-overhead": ("000", "per-channel overhead, % of the 4-bit codes (fp16 scale)", 0.01, "%",
                              lambda: _overhead_pct("int4-channel-sym-absmax")),
    "s000-70b-gptq-35gb": ("000", "Llama-2-70B at int4 g128 (GPTQ's format), weights", 35, "GB",
                           lambda: weights_gb("Llama-2-70B", "int4-g128-asym-minmax")),
    "s000-kv-70b-128k": ("000", "KV cache of a 70B at 128K tokens, fp16, batch 1", 80, "GB",
                         lambda: kv_cache_bytes(LLAMA2["70B"], 131072) / GB),
    "s001-llama3-70b-fp16": ("001", "Llama-3-70B weights, fp16", 140, "GB", lambda: weights_gb("Llama-3-70B")),
    "s001-kv-llama3-128k": ("001", "Llama-3-70B KV cache at 128K tokens, fp16, batch 1", 160, "GB",
                            lambda: kv_cache_bytes(LLAMA3["70B"], 131072) / GB),
    "s001-quip-70b-18gb": ("001", "Llama-2-70B at 2 bits per weight (linears; embeddings and head fp16)", 18, "GB",
                           lambda: weights_gb("Llama-2-70B", 2.0)),
    "s002-qlora-65b-48gb": ("002", "QLoRA's 65B base in NF4 (double-quantized scales)", 48, "GB", _qlora_weights),
    "s002-qlora-65b-780gb": ("002", "full fine-tuning of a 65B, AdamW mixed precision (16 B/param)", 780, "GB",
                             lambda: deployment_bytes("LLaMA-1-65B", mode="training", dtype="bf16",
                                                      activations="none")["total"] / GB),
    "s003-llama3-8b-fp32": ("003", "Llama-3-8B weights, fp32", 32, "GB",
                            lambda: weights_gb("Llama-3-8B", dtype="fp32")),
    "s003-llama3-8b-fp16": ("003", "Llama-3-8B weights, fp16 (its loading step)", 14, "GB",
                            lambda: weights_gb("Llama-3-8B")),
    "s003-llama3-8b-gptq": ("003", "Llama-3-8B saved as GPTQ int4 g128 (embeddings and head fp16)", 4.5, "GB",
                            lambda: weights_gb("Llama-3-8B", "int4-g128-asym-minmax")),
    "s003-kv-llama3-8b-8k": ("003", "Llama-3-8B KV cache at 8192 tokens, fp16", 8, "GB",
                             lambda: kv_cache_bytes(LLAMA3["8B"], 8192) / GB),
    "s003-7b-int4-8k-mha": ("003", "a 7B at int4 with 8K context, total (Llama-2-7B: 32 KV heads)", 12, "GiB",
                            lambda: _int4_8k_total("Llama-2-7B")),
    "s003-7b-int4-8k-gqa": ("003", "the same with grouped-query attention (Llama-3-8B: 8 KV heads)", 12, "GiB",
                            lambda: _int4_8k_total("Llama-3-8B")),
    "s003-7b-training": ("003", "training a 7B with Adam, 16 B/param (Llama-2-7B)", 112, "GB",
                         lambda: 16 * LLAMA2["7B"].count_params() / GB),
    "s003-g128-overhead": ("003", "per-group (128) overhead, % of the 4-bit codes (fp16 scale + 4-bit zero)", 4,
                           "%", lambda: _overhead_pct("int4-g128-asym-minmax")),
    "s003-g32-overhead": ("003", "per-group (32) overhead, % of the 4-bit codes (fp16 scale)", 12, "%",
                          lambda: _overhead_pct("int4-g32-sym-absmax")),
    "s004-70b-fp32": ("004", "70B weights, fp32 (Llama-2-70B)", 280, "GB",
                      lambda: weights_gb("Llama-2-70B", dtype="fp32")),
    "s004-q4km-bpw": ("004", "Q4_K_M's average bits per weight (Llama-2-7B, all of its tensors)", 4.5, "bits",
                      lambda: 8 * weights_gb("Llama-2-7B", gguf_mix_recipe("Llama-2-7B", "Q4_K_M"), unit=1)
                      / LLAMA2["7B"].count_params()),
}


def seed_figures() -> pd.DataFrame:
    """Every memory figure of :data:`SEED_FIGURES`: the article's number, ours from the real shapes, ours / theirs."""
    rows = []
    for key, (seed, what, theirs, unit, ours) in SEED_FIGURES.items():
        value = ours()
        rows.append(dict(id=key, seed=seed, what=what, unit=unit, article=theirs, ours=value, ratio=value / theirs))
    return pd.DataFrame(rows).set_index("id")


# ---------------------------------------------------------------- a decision table from measured results

# Measured on the embedded model (README "Calibrated PTQ on the embedded model", notebook 08 full mode of 2026-12-03 and
# ``python -m qlab.benchmarks.two_bit``; the peers table for NF4): 16 evaluation windows of 512 tokens, float
# perplexity 28.92. ``weights`` is the decoder blocks' format as the calculator takes it (QuIP#'s E8P: 2.003 bits).
# RTN int2's KL and top-1 come from the same benchmark's table (the README prints its perplexity only).
FLOAT_PPL = 28.92
MEASURED_PTQ = pd.DataFrame([
    ("W8A8 SmoothQuant (a=0.5)", "smoothquant", "int8-channel-sym-absmax", 29.50, 0.0185, 0.924),
    ("W8A8 naive", "w8a8", "int8-channel-sym-absmax", 29.79, 0.0336, 0.894),
    ("AWQ int4 g128", "awq", "int4-g128-asym-minmax", 36.03, 0.218, 0.748),
    ("NF4 b64 (bitsandbytes)", "rtn", "nf4-b64-sfp32", 36.62, 0.285, 0.711),
    ("GPTQ int4 g128", "gptq", "int4-g128-asym-minmax", 39.61, 0.337, 0.698),
    ("RTN int4 g128", "rtn", "int4-g128-asym-minmax", 38.45, 0.394, 0.676),
    ("GPTQ int3 g128", "gptq", "int3-g128-asym-minmax", 95.0, 1.198, 0.487),
    ("AWQ int3 g128", "awq", "int3-g128-asym-minmax", 90.15, 1.129, 0.484),
    ("RTN int3 g128", "rtn", "int3-g128-asym-minmax", 151.9, 1.72, 0.346),
    ("QuIP# E8P 2-bit", "quip", 2.0029387297453702, 87.88, 1.158, 0.498),
    ("RTN int2 g128", "rtn", "int2-g128-asym-minmax", 3464612.0, 11.71, 0.0049),
], columns=["label", "method", "weights", "ppl", "kl", "top1"])


def measured_from_sweep(table: pd.DataFrame) -> pd.DataFrame:
    """A :func:`qlab.eval.sweep.run_sweep` table (or its CSV) as :func:`decision_table` input: label, ppl, KL
    (``kl_mean``), top-1, and as the weight format the measured ``quantized_bpw`` (codes + scales + zero points
    per quantized weight), which the calculator then applies to the big model's block linears."""
    missing = {"label", "ppl", "kl_mean", "top1", "quantized_bpw"} - set(table.columns)
    if missing:
        raise ValueError(f"not a sweep table: columns {sorted(missing)} are missing (run qlab.eval.sweep.run_sweep)")
    return pd.DataFrame({"label": table["label"], "method": table.get("method", "?"),
                         "weights": table["quantized_bpw"].astype(float), "ppl": table["ppl"], "kl": table["kl_mean"],
                         "top1": table["top1"]})


def decode_tokens_per_s(arch, weights=None, device: str = "RTX-4090", context: int = 4096, kv="fp16") -> float:
    """The roofline's bound on batch-1 decoding: every step reads all weights and the KV cache once, so
    tokens/s <= bandwidth / (weight bytes + KV bytes) (:mod:`qlab.study.roofline`; compute is far below the
    ridge at batch 1). A bound, not a measurement: real kernels reach 50-90% of it."""
    from qlab.study.roofline import DEVICES

    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; known: {', '.join(DEVICES)}")
    b = deployment_bytes(arch, weights, kv=kv, context=context, activations="none")
    return DEVICES[device].bandwidth_gbs * 1e9 / b["total"]


def decision_table(measured: pd.DataFrame | None = None, model: str = "SmolLM2-135M", big: str = "Llama-2-7B",
                   device: str = "RTX-4090") -> pd.DataFrame:
    """Quality against bytes against speed, one row per measured configuration: its KL, perplexity and top-1 on
    the embedded model (``measured``: label, weights, ppl, kl, top1; default :data:`MEASURED_PTQ`), the bits per
    weight and MB of ``model`` stored that way, the GiB of ``big``, and the roofline bound on ``big``'s batch-1
    decoding on ``device`` (4k context, fp16 KV), with its speed-up over fp16. Sorted by KL."""
    measured = MEASURED_PTQ if measured is None else measured
    small = as_arch(model)
    fp16_speed = decode_tokens_per_s(big, None, device)
    rows = []
    for r in measured.itertuples():
        b = deployment_bytes(small, r.weights, context=0, activations="none")
        speed = decode_tokens_per_s(big, r.weights, device)
        rows.append(dict(label=r.label, kl=r.kl, ppl=r.ppl, top1=r.top1,
                         bits_per_param=8 * b["total"] / small.count_params(), model_mb=b["total"] / 1e6,
                         big_gib=weights_gb(big, r.weights, unit=GiB), tokens_per_s=speed, speedup=speed / fp16_speed))
    return pd.DataFrame(rows).set_index("label").sort_values("kl")


# ---------------------------------------------------------------- the calculator's figures

# The weight formats the notebook's menu offers: label -> what deployment_bytes takes ('mix:<name>' is a llama.cpp
# mix resolved per tensor by gguf_mix_recipe).
WEIGHT_CHOICES = {"fp16": None, "int8, per channel": "int8-channel-sym-absmax",
                  "int4 g128 (GPTQ / AWQ)": "int4-g128-asym-minmax", "NF4 b64 (bitsandbytes)": "nf4-b64-sfp32",
                  "NF4 + double quant (QLoRA)": "nf4-b64-dq", "GGUF Q8_0": "Q8_0", "GGUF Q4_K_M mix": "mix:Q4_K_M",
                  "2-bit (QuIP# E8P)": 2.0}
PARTS = {"weights": ("weight_codes", "embeddings", "norms"), "scales + zero points": ("scales", "zero_points"),
         "KV cache": ("kv_cache",), "activations": ("activations",), "gradients": ("gradients",),
         "fp32 master weights": ("master_weights",), "optimizer state": ("optimizer",)}
PART_COLORS = dict(zip(PARTS, ("#4c72b0", "#8fb0de", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")))


def calculate(model="Llama-2-7B", weights=None, kv="fp16", context: int = 4096, batch: int = 1,
              mode: str = "inference", optimizer: str = "adamw", prefill_chunk: int | None = 2048) -> dict:
    """:func:`deployment_bytes` with the notebook's choices: ``weights`` may also be ``'mix:Q4_K_M'`` (any
    llama.cpp mix), resolved per tensor for this model. In inference, activations are one layer's for a prefill
    chunk of ``prefill_chunk`` tokens (serving engines split long prompts: vLLM's chunked prefill, llama.cpp's
    n_batch); ``None`` prefills all ``context x batch`` tokens at once (the upper end)."""
    arch = as_arch(model)
    if isinstance(weights, str) and weights.startswith("mix:"):
        weights = gguf_mix_recipe(arch, weights.removeprefix("mix:"))
    activations = "estimate"
    if mode == "inference" and prefill_chunk is not None:
        if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be a positive number of tokens or None, got {prefill_chunk!r}")
        activations = activation_bytes(arch, min(prefill_chunk, context * batch), 1, "flash")
    return deployment_bytes(arch, weights, kv=kv, context=context, batch=batch, mode=mode, optimizer=optimizer,
                            dtype="bf16" if mode == "training" else "fp16", activations=activations)


def plot_breakdown(breakdown: dict, gpu_gib: float, title: str = "", ax=None):
    """One stacked horizontal bar of a :func:`deployment_bytes` breakdown in GiB, against a GPU's memory (dashed);
    the title says whether it fits."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(9, 3.0))
    left = 0.0
    for part, keys in PARTS.items():
        gib = sum(breakdown[k] for k in keys) / GiB
        if gib <= 0:
            continue
        ax.barh([0], [gib], left=left, color=PART_COLORS[part], label=f"{part}: {gib:,.2f} GiB", edgecolor="white")
        left += gib
    ax.axvline(gpu_gib, color="black", ls="--", lw=1.5)
    ax.text(gpu_gib, 0.47, f" GPU {gpu_gib:g} GiB", va="bottom", ha="left", fontsize=9)
    ok = fits(breakdown, gpu_gib)
    verdict = "fits" if ok else "does NOT fit"
    ax.set_title(f"{title}\ntotal {breakdown['total'] / GiB:,.2f} GiB: {verdict} in {gpu_gib:g} GiB",
                 color="black" if ok else "#b2182b", fontsize=10)
    ax.set_xlim(0, max(left, gpu_gib) * 1.12)
    ax.set_ylim(-0.6, 0.9)
    ax.set_yticks([])
    ax.set_xlabel("GiB (2^30 bytes)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.4), ncols=3, frameon=False, fontsize=8.5)
    ax.spines[["top", "right", "left"]].set_visible(False)
    ax.figure.tight_layout()
    return ax.figure


def plot_seed_figures(figures: pd.DataFrame | None = None, ax=None):
    """Each article memory figure as ours / article's on a log axis; the band is +-25%."""
    import matplotlib.pyplot as plt

    figures = seed_figures() if figures is None else figures
    figures = figures.iloc[::-1]
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 0.32 * len(figures) + 1.4))
    inside = (figures.ratio > 0.8) & (figures.ratio < 1.25)
    colors = ["#1b9e77" if ok else "#d95f02" for ok in inside]
    labels = [f"{i}  ({r.article:g} {r.unit})" for i, r in figures.iterrows()]
    ax.barh(labels, figures.ratio - 1, left=1, color=colors)
    ax.set_xscale("log")
    ax.axvspan(0.8, 1.25, color="#dddddd", zorder=0)
    ax.axvline(1, color="black", lw=1)
    for y, r in enumerate(figures.ratio):
        ax.text(r * (1.06 if r >= 1 else 1 / 1.06), y, f"{r:.2f}", va="center", ha="left" if r >= 1 else "right",
                fontsize=8)
    ax.set_xlim(0.08, 15)
    ax.set_xlabel("our number / the article's (log scale; grey band: within 25%)")
    ax.set_title("The articles' memory figures, recomputed from the real shapes")
    ax.tick_params(axis="y", labelsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    ax.figure.tight_layout()
    return ax.figure


def plot_decision(table: pd.DataFrame | None = None, big: str = "Llama-2-7B", device: str = "RTX-4090"):
    """Two panels from :func:`decision_table`: KL against the big model's GiB, and KL against the roofline's decode
    speed-up over fp16; one marker per configuration, labels placed apart (adjustText)."""
    import matplotlib.pyplot as plt
    from adjustText import adjust_text

    table = decision_table(big=big, device=device) if table is None else table
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    families = {"W8A8": ("#4c72b0", "o", 55), "AWQ": ("#55a868", "^", 45), "GPTQ": ("#c44e52", "s", 70),
                "RTN": ("#8c8c8c", "o", 55), "NF4": ("#8172b3", "D", 45), "QuIP#": ("#dd8452", "P", 70)}
    for ax, x, xlabel in ((axes[0], "big_gib", f"{big} weights, GiB"),
                          (axes[1], "speedup", f"decode bound on {device}, x fp16 (batch 1, 4k context)")):
        texts = []
        for label, r in table.iterrows():
            color, marker, size = next(v for f, v in families.items() if label.startswith(f))
            ax.scatter(r[x], r.kl, color=color, marker=marker, s=size, zorder=4 if size < 55 else 3,
                       edgecolor="black", linewidth=0.5, alpha=0.9)
            texts.append(ax.text(r[x], r.kl, label, fontsize=8))
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        adjust_text(texts, ax=ax, time_lim=1.0, arrowprops=dict(arrowstyle="-", color="grey", lw=0.5))
    axes[0].set_ylabel("KL to the float model (embedded model, nats/token)")
    fig.suptitle("Quality against memory and speed: measured KL, computed bytes, roofline bounds (not timings)")
    fig.tight_layout()
    return fig
