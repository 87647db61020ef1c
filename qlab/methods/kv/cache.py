"""A quantized KV cache for transformers' ``generate`` and forward passes: FP8 and KIVI.

Every key and value a later token attends to is read back from what the cache *stores*, de-quantized;
only the tokens of the current forward pass (the chunk being computed) see their own keys exact, as
in KIVI's prefill (Liu et al. 2024, alg. 1) and transformers' own ``QuantizedCache``. So

    attention keys = [ dequant(stored codes) ; full-precision residual ; this chunk's keys ]

and the same for values. What is stored, per layer (x is [batch, kv_heads, T, head_dim]):

* :class:`FP8` ``granularity='token'``: E4M3 codes, one fp32 scale per token and head,
  scale = absmax(x_t) / 448 (448 = E4M3's largest normal). ``'tensor'``: one static scale per cache
  side and layer, given at construction (vLLM's ``k_scale`` / ``v_scale``; :func:`calibrate_fp8` measures
  them); values beyond 448 * scale saturate, as vLLM's cast does. Codes are written and read back by the FP8
  kernels of ``qlab.kernels.fp8`` (``backend``: Triton, its interpreter, or the torch reference).
* :class:`KIVI` (sec. 3): keys per channel in groups of G consecutive tokens, values per token in
  groups of G channels, 2 or 4 bits asymmetric with a float minimum (``kivi_spec``), on the KIVI kernel
  (``quantize_kv``). The R most recent tokens stay in full precision; keys leave that window a whole
  block of G tokens at a time, so the float key tail holds R + ((T - R) mod G) tokens and the value
  tail exactly R (once T >= R). ``keys='token'`` quantizes keys like values: the baseline KIVI argues
  against.
* :class:`GEAR` (Kang et al. 2024): KIVI's codes of X - S plus the outliers S (positions + fp16 values) and
  a low-rank fit L = A @ B (fp16 factors) of the remaining error, per block of G (or more) tokens that
  leaves the float window; keys and values both leave it a whole block at a time.

Example (a model whose config has 2 KV heads of dimension 16):

>>> cache = QuantizedKVCache(KIVI(bits=2, group_size=8, residual=8), model.config)   # doctest: +SKIP
>>> model.generate(input_ids, past_key_values=cache, max_new_tokens=20)             # doctest: +SKIP
>>> cache.nbytes()   # codes + scales + minima + the float residual, all that is held   # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from qlab.kernels.fp8 import dequantize_fp8, quantize_fp8
from qlab.methods.kv.gear import gear_compress
from qlab.methods.kv.kivi import concat_tokens, dequantize_kv, quantize_kv

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


@dataclass(frozen=True)
class FP8:
    """FP8 E4M3 keys and values: per token (one scale per token and head) or per tensor with static scales.

    With ``granularity='tensor'``, ``k_scale`` / ``v_scale`` are one float for every layer or a tuple of one
    float per layer, as vLLM keeps them per attention layer (:func:`calibrate_fp8` measures them).
    """

    granularity: str = "token"
    k_scale: float | tuple | None = None
    v_scale: float | tuple | None = None
    backend: str | None = None  # kernel backend of qlab.kernels.fp8 (see qlab.kernels.dispatch)

    def __post_init__(self):
        if self.granularity not in ("token", "tensor"):
            raise ValueError(f"granularity must be 'token' or 'tensor', got {self.granularity!r}")
        scales = (self.k_scale, self.v_scale)
        if self.granularity == "token" and any(s is not None for s in scales):
            raise ValueError("per-token FP8 computes its scales; pass k_scale/v_scale only with granularity='tensor'")
        if self.granularity == "tensor":
            for name, s in zip(("k_scale", "v_scale"), scales):
                values = s if isinstance(s, tuple) else (s,)
                if s is None or not all(isinstance(x, (int, float)) and 0 < x < float("inf") for x in values):
                    raise ValueError(f"granularity='tensor' needs a static {name} > 0, one float or a tuple of one per "
                                     f"layer (absmax / 448 from calibration, see calibrate_fp8), got {s!r}")

    def scale(self, side: str, layer_idx: int) -> float:
        """The static scale of ``side`` ('k' or 'v') in layer ``layer_idx``."""
        s = self.k_scale if side == "k" else self.v_scale
        return s[layer_idx] if isinstance(s, tuple) else s

    def __str__(self):
        name = "fp8-token" if self.granularity == "token" else (
            "fp8-tensor-per-layer" if isinstance(self.k_scale, tuple) else "fp8-tensor")
        return name + (f"-{self.backend}" if self.backend else "")


@dataclass(frozen=True)
class KIVI:
    """KIVI's cache: ``bits`` in (2, 4), groups of ``group_size`` (G), a float window of ``residual`` (R) tokens."""

    bits: int = 2
    group_size: int = 32
    residual: int = 32
    keys: str = "channel"  # 'channel' (KIVI) or 'token' (the per-token baseline)
    backend: str | None = None  # kernel backend, see qlab.kernels.dispatch

    def __post_init__(self):
        if self.bits not in (2, 4):
            raise ValueError(f"KIVI stores 2- or 4-bit codes, got bits={self.bits}")
        g = self.group_size
        if not isinstance(g, int) or g < 1 or g & (g - 1):
            raise ValueError(f"group_size must be a power of two, got {g!r}")
        if not isinstance(self.residual, int) or self.residual < 0 or self.residual % g:
            raise ValueError(f"residual must be a multiple of group_size={g} (0, {g}, {2 * g}, ...) so keys leave the "
                             f"float window in whole groups, got residual={self.residual!r}")
        if self.keys not in ("channel", "token"):
            raise ValueError(f"keys must be 'channel' (KIVI) or 'token' (baseline), got {self.keys!r}")

    def __str__(self):
        return (f"kivi{self.bits}-g{self.group_size}-r{self.residual}" + ("-ktoken" if self.keys == "token" else "")
                + (f"-{self.backend}" if self.backend else ""))


@dataclass(frozen=True)
class GEAR:
    """GEAR's cache (``qlab.methods.kv.gear``): X_hat = Q(X - S) + S + L on the tokens that leave the float window.

    Q is KIVI's ``bits``-bit grouping (keys per channel over G tokens, values per token over G channels), S the
    ``outlier_ratio`` largest-magnitude entries, L a rank-``rank`` power-iteration fit of the error. Keys *and*
    values leave the window of ``residual`` (R) tokens a whole block of G at a time (GEAR's streaming buffer), so
    each block gets its own S and L. ``use_sparse`` / ``use_lowrank`` switch S / L off for the ablation:
    Q, Q+L, Q+S, Q+L+S.

    Cheaper storage: ``scale_dtype='fp16'`` halves Q's statistics; ``block_size`` (a multiple of G, default G)
    makes tokens wait in the float window until at least that many are past it, so each block, and its L, is
    longer (L costs 16 r (n + D) / (n D) bits per value for a block of n tokens), at the price of a float window
    of up to R + block_size - 1 tokens. A chunked prefill already flushes a whole chunk as one block.
    """

    bits: int = 2
    group_size: int = 32
    residual: int = 32
    outlier_ratio: float = 0.02
    rank: int = 2
    power_iters: int = 3
    use_sparse: bool = True
    use_lowrank: bool = True
    seed: int = 0
    backend: str | None = None  # kernel backend of the KIVI quantizer, see qlab.kernels.dispatch
    scale_dtype: str = "fp32"  # Q's scales and minima: 'fp32' or 'fp16'
    block_size: int | None = None  # tokens that leave the float window together (at least); None: group_size

    def __post_init__(self):
        try:
            KIVI(self.bits, self.group_size, self.residual)  # Q is KIVI's: the same rules for bits, G and R
        except ValueError as e:
            raise ValueError(f"GEAR's Q: {e}") from None
        if self.scale_dtype not in ("fp32", "fp16"):
            raise ValueError(f"scale_dtype must be 'fp32' or 'fp16', got {self.scale_dtype!r}")
        b = self.block_size
        if b is not None and (not isinstance(b, int) or b < 1 or b % self.group_size):
            raise ValueError(f"block_size must be a positive multiple of group_size={self.group_size} (or None), "
                             f"got {b!r}")
        if not 0 <= self.outlier_ratio < 1:
            raise ValueError(f"outlier_ratio is the fraction of entries kept exact, in [0, 1), "
                             f"got {self.outlier_ratio!r}")
        if not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"rank must be an int >= 0 (the paper uses 2-4), got {self.rank!r}")
        if not isinstance(self.power_iters, int) or self.power_iters < 1:
            raise ValueError(f"power_iters must be an int >= 1, got {self.power_iters!r}")

    @property
    def parts(self) -> str:
        """Which of GEAR's parts are on: 'Q', 'Q+L', 'Q+S' or 'Q+L+S'."""
        return "Q" + ("+L" if self.use_lowrank and self.rank else "") + (
            "+S" if self.use_sparse and self.outlier_ratio else "")

    def __str__(self):
        extra = (f"-l{self.rank}" if "L" in self.parts else "") + (
            f"-s{self.outlier_ratio:g}" if "S" in self.parts else "") + (f"-{self.backend}" if self.backend else "")
        extra += ("-sfp16" if self.scale_dtype == "fp16" else "") + (f"-b{self.block_size}" if self.block_size else "")
        return f"gear{self.bits}-g{self.group_size}-r{self.residual}{extra}"


def _refuse_non_finite(x: torch.Tensor, what: str):
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} hold {int((~torch.isfinite(x)).sum())} NaN/Inf value(s); a quantized cache would "
                         f"turn them into finite codes, so it refuses them")


def _held(t: torch.Tensor) -> int:
    """Bytes of the memory behind ``t``: a view of a larger buffer counts the whole buffer, as it keeps it alive."""
    return t.untyped_storage().nbytes()


class FP8Store:
    """E4M3 codes [B, H, T, D] and fp32 scales [B, H, T] (per token) or [1] (per tensor), per side."""

    def __init__(self, method: FP8, layer_idx: int = 0):
        self.method, self.layer_idx = method, layer_idx
        self.codes = {"k": None, "v": None}
        self.scales = {"k": None, "v": None}

    def _quantize(self, x: torch.Tensor, side: str):
        """Through the FP8 kernel: per token, scale = absmax over head_dim / 448 (1 for an all-zero token);
        per tensor, the static scale; codes = e4m3(clamp(x / scale, -448, 448)), saturating, never NaN."""
        m = self.method
        if m.granularity == "token":  # one scale per token and head: [B, H, T]
            return quantize_fp8(x, "token", backend=m.backend)
        return quantize_fp8(x, "tensor", backend=m.backend, scale=m.scale(side, self.layer_idx))  # scale [1]

    def append(self, keys: torch.Tensor, values: torch.Tensor):
        for side, x in (("k", keys), ("v", values)):
            codes, scale = self._quantize(x, side)
            old = self.codes[side]
            self.codes[side] = codes if old is None else torch.cat([old, codes], dim=-2)
            if self.method.granularity == "token":
                old = self.scales[side]
                self.scales[side] = scale if old is None else torch.cat([old, scale], dim=-1)
            else:
                self.scales[side] = scale

    def read(self, dtype):
        if self.codes["k"] is None:
            return None, None
        return tuple(dequantize_fp8(self.codes[s], self.scales[s], dtype, backend=self.method.backend)
                     for s in ("k", "v"))

    def nbytes(self) -> int:
        return sum(_held(t) for t in [*self.codes.values(), *self.scales.values()] if t is not None)

    def float_window(self) -> list:
        return []  # every token is stored as E4M3 codes


class KIVIStore:
    """Quantized keys and values (``KVQuantized``) plus the full-precision residual of recent tokens."""

    def __init__(self, method: KIVI, layer_idx: int = 0):
        self.method = method
        self.quantized = {"k": None, "v": None}
        self.residual = {"k": None, "v": None}

    def _flush(self, side: str, n: int):
        """Quantize the oldest ``n`` residual tokens of ``side`` and append them to the stored codes."""
        if n == 0:
            return
        m = self.method
        which = "key" if side == "k" and m.keys == "channel" else "value"  # 'value': per token, groups of channels
        r = self.residual[side]
        q = quantize_kv(r[..., :n, :], which, m.bits, m.group_size, backend=m.backend)
        self.quantized[side] = concat_tokens(self.quantized[side], q)
        self.residual[side] = r[..., n:, :].clone()  # clone: a view would keep the whole old buffer alive

    def append(self, keys: torch.Tensor, values: torch.Tensor):
        m = self.method
        for side, x in (("k", keys), ("v", values)):
            old = self.residual[side]
            self.residual[side] = x.clone() if old is None else torch.cat([old, x], dim=-2)
        over_k = max(self.residual["k"].shape[-2] - m.residual, 0)
        if m.keys == "channel":
            over_k -= over_k % m.group_size  # keys leave the window a whole group of G tokens at a time
        self._flush("k", over_k)
        self._flush("v", max(self.residual["v"].shape[-2] - m.residual, 0))

    def read(self, dtype):
        if self.residual["k"] is None:
            return None, None
        out = []
        for side in ("k", "v"):
            parts = [self.residual[side]]
            if self.quantized[side] is not None:
                parts.insert(0, dequantize_kv(self.quantized[side], dtype, backend=self.method.backend))
            out.append(torch.cat(parts, dim=-2).to(dtype))
        return tuple(out)

    def nbytes(self) -> int:
        quantized = [t for q in self.quantized.values() if q is not None for t in (q.packed, q.scale, q.minimum)]
        return sum(_held(t) for t in quantized + self.float_window())

    def float_window(self) -> list:
        """The full-precision residual tensors (keys, values) held beside the codes."""
        return [r for r in self.residual.values() if r is not None]


class GEARStore:
    """A list of ``GEARBlock`` per side (one per flush of G or more tokens) plus the full-precision residual."""

    def __init__(self, method: GEAR, layer_idx: int = 0):
        self.method = method
        self.blocks = {"k": [], "v": []}
        self.residual = {"k": None, "v": None}

    def append(self, keys: torch.Tensor, values: torch.Tensor):
        m = self.method
        for side, x in (("k", keys), ("v", values)):
            old = self.residual[side]
            r = x.clone() if old is None else torch.cat([old, x], dim=-2)
            over = max(r.shape[-2] - m.residual, 0)
            over -= over % m.group_size  # whole blocks of G tokens leave the window
            if over >= (m.block_size or m.group_size):
                which = "key" if side == "k" else "value"
                self.blocks[side].append(gear_compress(
                    r[..., :over, :], which, m.bits, m.group_size, m.outlier_ratio if m.use_sparse else 0.0,
                    m.rank if m.use_lowrank else 0, m.power_iters, m.seed, backend=m.backend,
                    scale_dtype=m.scale_dtype))
                r = r[..., over:, :].clone()  # clone: a view would keep the whole old buffer alive
            self.residual[side] = r

    def read(self, dtype):
        if self.residual["k"] is None:
            return None, None
        return tuple(torch.cat([b.dequantize(dtype, self.method.backend) for b in self.blocks[side]]
                               + [self.residual[side].to(dtype)], dim=-2) for side in ("k", "v"))

    def nbytes(self) -> int:
        held = [t for side in ("k", "v") for b in self.blocks[side] for t in b.tensors()]
        return sum(_held(t) for t in held + self.float_window())

    def float_window(self) -> list:
        """The full-precision residual tensors (keys, values) held beside the blocks."""
        return [r for r in self.residual.values() if r is not None]


STORES = {FP8: FP8Store, KIVI: KIVIStore, GEAR: GEARStore}  # method config -> what a layer holds


class QuantizedKVLayer(DynamicLayer):
    """One decoder layer's cache: attention gets the de-quantized past, then this call's exact keys/values."""

    is_croppable = False

    def __init__(self, method, kv_heads: int, head_dim: int, max_length: int | None = None, layer_idx: int = 0):
        super().__init__()
        if type(method) not in STORES:
            raise ValueError(f"method must be one of {[c.__name__ for c in STORES]} (a config), got {method!r}")
        self.method, self.kv_heads, self.head_dim, self.max_length = method, kv_heads, head_dim, max_length
        self.layer_idx = layer_idx
        self.store = STORES[type(method)](method, layer_idx)
        self.cumulative_length = 0

    def lazy_initialization(self, key_states, value_states):
        self.device, self.dtype, self.batch = key_states.device, key_states.dtype, key_states.shape[0]
        self.is_initialized = True

    def _check(self, key_states, value_states):
        want = (self.kv_heads, self.head_dim)
        for name, x in (("keys", key_states), ("values", value_states)):
            if x.dim() != 4 or (x.shape[1], x.shape[3]) != want:
                raise ValueError(f"{name} of shape {tuple(x.shape)} do not fit this cache, built for [batch, "
                                 f"{want[0]} kv heads, T, head dim {want[1]}]: build it from this model's config")
        t = self.cumulative_length + key_states.shape[-2]
        if self.max_length is not None and t > self.max_length:
            raise ValueError(f"context of {t} tokens exceeds the model's maximum of {self.max_length} "
                             f"(max_position_embeddings): use shorter windows")
        _refuse_non_finite(key_states, "keys")
        _refuse_non_finite(value_states, "values")

    def update(self, key_states, value_states, *args, **kwargs):
        self._check(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        past_k, past_v = self.store.read(key_states.dtype)  # what the cache holds, de-quantized
        self.store.append(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        if past_k is None:
            return key_states, value_states
        return torch.cat([past_k, key_states], dim=-2), torch.cat([past_v, value_states], dim=-2)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def nbytes(self) -> int:
        return self.store.nbytes()

    def reset(self):
        self.store = STORES[type(self.method)](self.method, self.layer_idx)
        self.cumulative_length = 0
        self.is_initialized = False

    def _not_supported(self, *args, **kwargs):
        raise NotImplementedError("the quantized KV cache does not support beam search, cropping or batch "
                                  "re-selection yet; use greedy or sampling decoding")

    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = _not_supported


class QuantizedKVCache(Cache):
    """A ``Cache`` (DynamicCache's interface) holding every layer's keys and values quantized by ``method``.

    ``config`` is the model's config: it fixes the number of layers, KV heads and head dim (a model with
    another head layout is refused with a ValueError) and the maximum context.
    """

    def __init__(self, method, config):
        text = config.get_text_config(decoder=True)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        max_length = getattr(text, "max_position_embeddings", None)
        n_layers = text.num_hidden_layers
        for name in ("k_scale", "v_scale"):
            s = getattr(method, name, None)
            if isinstance(s, tuple) and len(s) != n_layers:
                raise ValueError(f"{name} holds {len(s)} per-layer scales for a model of {n_layers} layers: calibrate "
                                 f"them on this model (calibrate_fp8)")
        self.method = method
        super().__init__(layers=[QuantizedKVLayer(method, kv_heads, head_dim, max_length, i) for i in range(n_layers)])

    def nbytes(self) -> int:
        """The bytes the cache really holds: codes, scales, minima, outliers, low-rank factors and full-precision
        residuals, all layers."""
        return sum(layer.nbytes() for layer in self.layers)

    def footprint(self) -> dict:
        """Bytes and key/value entries held, split into the quantized part and the full-precision window.

        ``bits_quantized`` = 8 x bytes of codes, scales, outliers, factors / the entries they stand for (the
        format's cost); ``bits_held`` = 8 x all bytes / all entries (what a cache of this length really costs,
        its float window included, in the model's dtype).
        """
        window = [t for layer in self.layers for t in layer.store.float_window()]
        float_bytes = sum(_held(t) for t in window)
        float_values = sum(t.numel() for t in window)
        layer = self.layers[0]
        batch = layer.batch if layer.is_initialized else 0
        values = 2 * len(self.layers) * layer.kv_heads * layer.head_dim * self.get_seq_length() * batch
        total = self.nbytes()
        return {"bytes": total, "values": values, "float_bytes": float_bytes, "float_values": float_values,
                "bits_held": 8 * total / values if values else float("nan"),
                "bits_quantized": (8 * (total - float_bytes) / (values - float_values) if values > float_values
                                   else float("nan"))}

    def __repr__(self):
        return f"QuantizedKVCache({self.method}, {len(self.layers)} layers, {self.get_seq_length()} tokens)"


def calibrate_fp8(model, input_ids: torch.Tensor) -> FP8:
    """Static per-tensor FP8 scales, one per layer and side: absmax of the keys (values) the model computes on
    ``input_ids`` (calibration text) / 448, so those calibration keys just fit E4M3's range.
    """
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids, past_key_values=cache, use_cache=True)
    absmax = lambda x: max(float(x.abs().max()), torch.finfo(torch.float32).tiny) / FP8_MAX  # noqa: E731
    return FP8("tensor", k_scale=tuple(absmax(layer.keys) for layer in cache.layers),
               v_scale=tuple(absmax(layer.values) for layer in cache.layers))


def chunked_logits(model, input_ids: torch.Tensor, cache: Cache, chunk_size: int) -> torch.Tensor:
    """Logits [B, T, V] of ``input_ids`` computed ``chunk_size`` tokens at a time through ``cache``.

    Each chunk attends to the earlier chunks through the cache (so their quantization error propagates)
    and to itself exactly; ``chunk_size=1`` is token-by-token decoding.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out = []
    with torch.no_grad():
        for start in range(0, input_ids.shape[1], chunk_size):
            out.append(model(input_ids[:, start:start + chunk_size], past_key_values=cache, use_cache=True).logits)
    return torch.cat(out, dim=1)


def cache_perplexity(model, windows: torch.Tensor, method, chunk_size: int = 64) -> dict:
    """Perplexity on ``windows`` [n, L] with a fresh quantized cache per window, prefilled in chunks.

    The protocol of ``qlab.eval.metrics`` (every position but the last predicts the next token, PPL =
    exp(mean NLL) over all n * (L - 1) of them), except that a position attends to the tokens of
    earlier chunks through the cache. ``method=None`` uses transformers' float ``DynamicCache``.
    Returns {'ppl', 'nll' [n, L-1]}.
    """
    from transformers import DynamicCache

    if not isinstance(windows, torch.Tensor) or windows.ndim != 2 or windows.shape[1] < 2:
        got = tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows).__name__
        raise ValueError(f"windows must be token ids [n_windows, seq_len >= 2], got {got}")
    nll = []
    for w in windows:
        cache = DynamicCache() if method is None else QuantizedKVCache(method, model.config)
        logits = chunked_logits(model, w[None], cache, chunk_size)[0, :-1].float()
        if not torch.isfinite(logits).all():
            raise ValueError("the model produced NaN/Inf logits through the cache")
        nll.append(-torch.log_softmax(logits, dim=-1).gather(-1, w[1:, None])[:, 0])  # -log p(x_t | x_<t)
    nll = torch.stack(nll)
    return {"ppl": float(torch.exp(nll.mean())), "nll": nll}
