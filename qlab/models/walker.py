"""The one model walker: a recipe of name patterns -> methods, applied to a model's layers.

A **recipe** maps fnmatch name patterns to entries; for each ``nn.Linear`` (and each ``nn.Embedding`` a
pattern names) the *first* pattern that matches its qualified name decides (dict order), and modules no
pattern matches stay float:

    recipe = {
        "model.embed_tokens": "int8-channel-sym-absmax",            # RTN, 8 bits
        "lm_head":            "int8-channel-sym-absmax",
        "*.mlp.down_proj":    "gptq:int8-channel-sym-absmax",        # method:spec
        "model.layers.*":     {"method": "gptq", "spec": "int4-g128-asym-minmax", "act_order": True},
    }

An entry is ``None`` (keep float), a :class:`~qlab.core.spec.QuantSpec` or its string (round to nearest),
``"method:spec"`` for any method in ``qlab.methods.METHODS`` (``"gguf:Q4_K"``; ``"q4_1"`` is
``"gguf:Q4_1"``), a dict ``{"method", "spec", **options}``, or an :class:`Entry`.

``quantize_model(model, recipe, calib=windows)`` walks the decoder layers in order, as the GPTQ reference
does: the inputs of layer 0 are captured once; per layer, the inputs of every Linear a calibrated method
needs are captured (Linears that read the same tensor, q/k/v and gate/up, form one group and get one
method call), each group is quantized in forward order, scales a method returns are folded into the op
before the group (an RMSNorm, or v_proj / up_proj), and the quantized layer's outputs feed the next layer.
Methods calibrated on the float model (AWQ, as llm-awq; SmoothQuant's statistics) take the next layer's
inputs from the calibration pass itself, run through the whole layer before anything in it is quantized.
Everything outside the decoder layers (embeddings, lm_head) is quantized on its own.

Modes: ``"fake"`` replaces each weight by its de-quantized values (float storage); ``"packed"`` swaps in
``QuantLinear`` / ``QuantEmbedding`` holding the quantized tensor. Both give bit-identical logits. Methods
that quantize activations (W8A8, LLM.int8()) always install their compute module. Replacing a weight never
writes into the old tensor: a tied lm_head can be quantized without touching the input embedding, and a
tied pair given the same entry stays tied.
"""
from __future__ import annotations

import copy
import fnmatch
import inspect
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from qlab.core.spec import QuantSpec
from qlab.methods import get_method
from qlab.models.modules import build
from qlab.models.transforms import divide_output, llama_scaling_groups

# The usual weight-only recipe: every linear inside the decoder blocks; embeddings and lm_head float.
BLOCK_LINEARS = "model.layers.*"


@dataclass(frozen=True)
class Entry:
    """One recipe entry: a registered method, its spec and its options."""

    method: str = "rtn"
    spec: object = None
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        m = get_method(self.method)
        object.__setattr__(self, "spec", m.parse_spec(self.spec) if m.parse_spec else QuantSpec.parse(self.spec))
        accepted = [p.name for p in inspect.signature(m.fn).parameters.values() if p.kind == p.KEYWORD_ONLY]
        unknown = set(self.options) - set(accepted)
        if unknown:
            raise ValueError(f"method {self.method!r} takes no option {sorted(unknown)}; its options: {accepted or 'none'}")

    def __str__(self):
        text = f"{self.method}:{self.spec}" if self.method != "rtn" else str(self.spec)
        plain = {k: v for k, v in self.options.items() if isinstance(v, (int, float, str, bool))}
        return text + "".join(f" {k}={v}" for k, v in sorted(plain.items()))


def entry(value) -> Entry | None:
    """A recipe value -> an Entry (or None for float)."""
    if value is None or isinstance(value, Entry):
        return value
    if isinstance(value, QuantSpec):
        return Entry("rtn", value)
    if isinstance(value, dict):
        opts = {k: v for k, v in value.items() if k not in ("method", "spec")}
        if "spec" not in value:
            raise ValueError(f"a recipe entry dict needs a 'spec', got keys {sorted(value)}")
        return Entry(value.get("method", "rtn"), value["spec"], opts)
    if isinstance(value, str):
        if value.lower() == "q4_1":
            return Entry("gguf", "Q4_1")
        if ":" in value:
            method, spec = value.split(":", 1)
            return Entry(method, spec)
        return Entry("rtn", value)
    raise ValueError(f"a recipe value must be None, a QuantSpec, a spec string, 'method:spec', a dict or an Entry, "
                     f"got {value!r}")


def calibrates(e: Entry | None) -> bool:
    """Does this entry's method read calibration inputs (to measure them, or to choose scales to fold)?"""
    if e is None:
        return False
    method = get_method(e.method)
    return method.wants_inputs(e.options) or bool(method.folds_into)


def needs_calibration(recipe: dict) -> bool:
    """Does any entry of ``recipe`` (values as a recipe takes them) calibrate?"""
    return any(calibrates(entry(v)) for v in recipe.values())


def weight_only(value) -> dict:
    """``{"model.layers.*": value}``: quantize every block linear, keep embeddings/lm_head float."""
    return {BLOCK_LINEARS: value}


def target_modules(model: nn.Module) -> dict:
    """Every nn.Linear and nn.Embedding of the model, by qualified name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}


def resolve(model: nn.Module, recipe: dict) -> dict:
    """``{module name: Entry or None}`` for every Linear of the model, and for each Embedding a pattern names."""
    if not isinstance(recipe, dict):
        raise ValueError(f"a recipe is a dict of name patterns -> entries, got {type(recipe).__name__}")
    rules = [(pattern, entry(v)) for pattern, v in recipe.items()]
    modules = target_modules(model)
    names = list(modules)
    for pattern, _ in rules:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ValueError(f"recipe pattern {pattern!r} matches no linear layer or embedding (e.g. {names[-1]!r})")
    out = {}
    for name, module in modules.items():
        hit = next(((True, e) for p, e in rules if fnmatch.fnmatchcase(name, p)), (False, None))
        if isinstance(module, nn.Linear) or hit[0]:
            out[name] = hit[1]
    return out


@dataclass
class SizeReport:
    """Per-layer storage of a quantized model and its totals.

    ``layers`` rows: name, spec, n_weights, bytes, bits_per_weight (codes + scales + zero points ...).
    Float layers and every other parameter (embeddings, norms) are counted at ``float_bits``; a layer
    tied to one already counted has 0 weights and 0 bytes. ``qtensors``: {name: the quantized tensor}.
    """

    layers: pd.DataFrame
    n_params: int
    other_bytes: float  # parameters outside the rows, at float_bits
    float_bits: int = 16
    qtensors: dict = field(default_factory=dict)

    @property
    def quantized(self) -> pd.DataFrame:
        return self.layers[(self.layers.spec != "float") & (self.layers.n_weights > 0)]

    @property
    def quantized_bpw(self) -> float:
        """Bits per weight over the quantized layers, overhead included."""
        q = self.quantized
        return float(8 * q.bytes.sum() / q.n_weights.sum()) if len(q) else float(self.float_bits)

    @property
    def linear_bpw(self) -> float:
        """Bits per weight over all rows (float ones at float_bits)."""
        return float(8 * self.layers.bytes.sum() / self.layers.n_weights.sum())

    @property
    def total_bytes(self) -> float:
        """Whole model: rows as stored + every other parameter at float_bits."""
        return float(self.layers.bytes.sum() + self.other_bytes)

    def summary(self) -> dict:
        return {
            "quantized_bpw": self.quantized_bpw,
            "linear_bpw": self.linear_bpw,
            "size_mb": self.total_bytes / 1e6,
            "n_quantized": len(self.quantized),
        }


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


def _decoder_layers(model):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers: calibrated methods walk Llama-style decoders")
    return layers


@torch.no_grad()
def first_layer_inputs(model, windows: torch.Tensor, batch_size: int = 8) -> list:
    """[(hidden_states, kwargs)] per batch of windows: what decoder layer 0 receives."""
    layers = _decoder_layers(model)
    store = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        store.append((hidden, dict(kwargs)))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for start in range(0, len(windows), batch_size):
            try:
                model(input_ids=windows[start:start + batch_size], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return store


@torch.no_grad()
def _run(layer, store) -> list:
    out = []
    for hidden, kwargs in store:
        y = layer(hidden, **kwargs)
        out.append((y[0] if isinstance(y, tuple) else y, kwargs))
    return out


@torch.no_grad()
def _capture(layer, linears: dict, store, keep: set, outputs: bool = False) -> tuple:
    """Run the stored batches through ``layer``; return the groups of Linears (names) that read the same
    input tensor, in forward order, each with its inputs (a list of batches) when a member is in ``keep``,
    and the layer's outputs (``_run``'s) when ``outputs``, else None. Without ``outputs`` each batch stops
    once every Linear has its input: the last one (down_proj) and the rest of the layer are not computed."""
    groups = []  # [names, input tensor of the current batch, batches]
    out = [] if outputs else None
    order = {}
    fired = set()

    def hook(name):
        def fn(module, args):
            fired.add(name)
            x = args[0]
            g = next((g for g in groups if g[1] is x), None)
            if g is None:
                if name in order:  # a new batch: find this Linear's group again
                    g = groups[order[name]]
                    g[1] = x
                else:
                    groups.append([[], x, []])
                    g = groups[-1]
            if name not in order:
                order[name] = groups.index(g)
                g[0].append(name)
            if name in keep and (not g[2] or g[2][-1] is not x):
                g[2].append(x)
            if len(fired) == len(linears) and not outputs:
                raise _Stop
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        for hidden, kwargs in store:
            fired.clear()
            try:
                y = layer(hidden, **kwargs)
                if outputs:
                    out.append((y[0] if isinstance(y, tuple) else y, kwargs))
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return [(names, batches if batches else None) for names, _, batches in groups], out


def _scaling_groups(layer, prefix: str) -> list:
    """The layer's (prev op, its qualified name, linears) triples, taken before anything in it is replaced."""
    try:
        triples = llama_scaling_groups(layer)
    except AttributeError:  # not a Llama-style layer: nothing to fold into
        return []
    names = {id(m): prefix + n for n, m in layer.named_modules()}
    return [(prev, names[id(prev)], linears) for prev, linears, _ in triples]


def _fold_target(triples, modules: list):
    """(prev op, its name, kind) whose outputs feed exactly these Linears (kind 'norm' or 'linear'), or Nones."""
    for prev, name, linears in triples:
        if {id(m) for m in linears} == {id(m) for m in modules}:
            return prev, name, ("linear" if isinstance(prev, nn.Linear) else "norm")
    return None, None, None


def _call_options(fn, options: dict) -> dict:
    accepted = {p.name for p in inspect.signature(fn).parameters.values() if p.kind == p.KEYWORD_ONLY}
    return {k: v for k, v in options.items() if k in accepted}


class _Walk:
    """State of one quantize_model call: the model, the plan, and what has been quantized so far."""

    def __init__(self, model, plan, mode):
        self.model, self.plan, self.mode = model, plan, mode
        self.qtensors, self.float_weights, self.entries = {}, {}, {}

    def quantize_group(self, names: list, X, triples=()):
        """Quantize the Linears ``names`` (qualified) that read one input, sub-grouped by entry; ``triples``:
        the layer's foldable (prev, linears, fold) groups."""
        by_entry = {}
        for n in names:
            if self.plan.get(n) is not None:
                by_entry.setdefault(str(self.plan[n]) + f"#{id(self.plan[n])}", []).append(n)
        for sub in by_entry.values():
            e = self.plan[sub[0]]
            method = get_method(e.method)
            modules = [self.model.get_submodule(n) for n in sub]
            prev = prev_name = kind = None
            if method.folds_into:
                if len(sub) != len(names):
                    raise ValueError(f"{e.method} folds one scale per input channel into the op before "
                                     f"{', '.join(names)}: give all of them the same entry")
                prev, prev_name, kind = _fold_target(triples, modules)
                if kind not in method.folds_into:  # nothing to fold into: the method's fallback
                    method, prev = get_method(method.fallback), None
            options = _call_options(method.fn, e.options)
            result = method([m.weight.data for m in modules], X if method.wants_inputs(options) else None,
                            e.spec, names=sub, **options)
            if result.fold is not None:
                self._fold(prev, prev_name, result.fold)
            for k, (n, m) in enumerate(zip(sub, modules)):
                w = result.weights[k] if result.weights is not None else m.weight.data
                self.float_weights[n], self.entries[n] = w, (e, result.act)
                self.install(n, result.qweights[k], result.act)

    def _fold(self, prev, prev_name, s):
        if prev_name in self.qtensors:  # already quantized (AWQ: up_proj before down_proj's fold)
            e, act = self.entries[prev_name]
            if e.method not in ("awq", "rtn") or act is not None:
                raise ValueError(f"a fold into {prev_name} would change a weight {e.method} has already quantized; "
                                 f"quantize {prev_name} with awq or rtn")
            w = self.float_weights[prev_name] / s.to(self.float_weights[prev_name].dtype)[:, None]
            self.float_weights[prev_name] = w
            self.install(prev_name, get_method("rtn")([w], None, e.spec).qweights[0], None)  # as AWQ's reference: quantize after all scales
        else:
            divide_output(prev, s)

    def install(self, name: str, qt, act, also=()):
        """Put the quantized tensor in place of ``name``'s weight (and of the tied modules ``also``)."""
        module = self.model.get_submodule(name)
        self.qtensors[name] = qt
        new = build(module, qt, act, self.mode)
        if new is None:
            param = nn.Parameter(qt.dequantize().to(module.weight.dtype), requires_grad=False)
            for n in (name, *also):
                self.model.get_submodule(n).weight = param
        else:
            for n in (name, *also):
                parent, _, child = n.rpartition(".")
                setattr(self.model.get_submodule(parent) if parent else self.model, child, new)


@torch.no_grad()
def quantize_model(model: nn.Module, recipe: dict, calib: torch.Tensor | None = None, *, mode: str = "fake",
                   inplace: bool = False, float_bits: int = 16, batch_size: int = 8, true_sequential: bool = False,
                   progress: bool = False) -> tuple[nn.Module, SizeReport]:
    """Apply ``recipe`` to ``model``; return ``(model, SizeReport)``.

    ``calib`` [n, seq_len] token windows are needed when an entry's method calibrates (GPTQ, AWQ,
    SmoothQuant, static W8A8). ``true_sequential`` re-captures the inputs after each group of a layer, so
    o_proj sees the quantized q/k/v and down_proj the quantized gate/up (slower). With ``inplace=False``
    (default) the input model is deep-copied first and left untouched.
    """
    if mode not in ("fake", "packed"):
        raise ValueError(f"mode must be 'fake' or 'packed', got {mode!r}")
    plan = resolve(model, recipe)
    calibrated = {n for n, e in plan.items() if calibrates(e)}
    if calibrated and calib is None:
        example = next(iter(calibrated))
        raise ValueError(f"{plan[example].method} ({example}) needs calibration windows: "
                         f"quantize_model(model, recipe, calib=windows)")
    if not inplace:
        model = copy.deepcopy(model)
    before = {n: m for n, m in target_modules(model).items() if n in plan}
    walk = _Walk(model, plan, mode)

    done = set()
    if calibrated:
        layers = _decoder_layers(model)
        prefixes = [f"model.layers.{i}." for i in range(len(layers))]
        outside = [n for n in calibrated if not any(n.startswith(p) for p in prefixes)]
        if outside:
            raise ValueError(f"calibrated methods quantize decoder-layer Linears; {outside[0]} is outside them "
                             f"(use an uncalibrated method such as rtn there)")
        # sequential: each layer calibrated on the quantized layers' outputs (a second pass through the layer once
        # it is quantized); otherwise on the float model's, the outputs of the calibration pass itself
        sequential = any(get_method(plan[n].method).sequential for n in calibrated)
        store = first_layer_inputs(model, calib, batch_size)
        for i, layer in enumerate(tqdm(layers, desc="quantize", disable=not progress)):
            prefix = prefixes[i]
            linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear) and plan.get(prefix + n) is not None}
            if not linears:
                store = _run(layer, store)
                continue
            triples = _scaling_groups(layer, prefix)
            keep = {n for n in linears if prefix + n in calibrated}
            pending, float_outputs = list(linears), None
            while pending:
                want = not sequential and float_outputs is None and i + 1 < len(layers)  # (the layer is float still)
                groups, outputs = _capture(layer, {n: linears[n] for n in pending}, store, keep, outputs=want)
                if want:
                    float_outputs = outputs
                todo = groups[:1] if true_sequential else groups
                for names, X in todo:
                    walk.quantize_group([prefix + n for n in names], X, triples)
                    pending = [n for n in pending if n not in names]
            done.update(prefix + n for n in linears)
            if i + 1 < len(layers):  # the last layer's outputs feed no later layer
                store = _run(layer, store) if sequential else float_outputs

    rest = [n for n, e in plan.items() if e is not None and n not in done]
    for name in tqdm(rest, desc="quantize", disable=not progress or not rest):
        if name in walk.qtensors:
            continue
        e = plan[name]
        module = before[name]
        tied = [n for n in rest if n != name and n not in walk.qtensors and before[n].weight is module.weight
                and str(plan[n]) == str(e)]
        method = get_method(e.method)
        result = method([module.weight.data], None, e.spec, names=[name], **_call_options(method.fn, e.options))
        walk.entries[name] = (e, result.act)
        walk.install(name, result.qweights[0], result.act, also=tied)
        for n in tied:
            walk.qtensors[n] = result.qweights[0]
    return model, _report(model, plan, before, walk.qtensors, float_bits)


def _report(model, plan, before, qtensors, float_bits) -> SizeReport:
    rows, seen = [], {}
    for name, e in plan.items():
        module = before[name]
        n = module.weight.numel()
        qt = qtensors.get(name)
        if qt is None:
            rows.append((name, "float", n, n * float_bits / 8))
        elif id(qt) in seen:
            rows.append((name, f"tied to {seen[id(qt)]}", 0, 0.0))
        else:
            seen[id(qt)] = name
            rows.append((name, str(e), n, float(qt.nbytes)))
    counted = {id(m.weight) for n, m in target_modules(model).items() if n in plan}
    other = sum(p.numel() for p in model.parameters() if id(p) not in counted)
    return SizeReport(
        layers=pd.DataFrame(rows, columns=["name", "spec", "n_weights", "bytes"]).assign(
            bits_per_weight=lambda d: (8 * d.bytes / d.n_weights).where(d.n_weights > 0, 0.0)),
        n_params=other + sum(r[2] for r in rows),
        other_bytes=other * float_bits / 8,
        float_bits=float_bits,
        qtensors=qtensors,
    )


def apply_mix(model: nn.Module, mix: str, imatrix: dict | None = None, progress: bool = True) -> dict:
    """Replace every weight of ``model`` (in place) by its GGUF round trip under llama.cpp's ``mix``
    (through :func:`quantize_model` and ``qlab.methods.weight.gguf.mix_recipe``).

    Returns ``dict(choices=[...], summary=mix_summary(...), nbytes=..., report=SizeReport)``; ``choices``
    lists each tensor's wanted and final type (after llama.cpp's row-length fallback).
    """
    from qlab.methods.weight.gguf import mix_recipe, mix_summary

    recipe, choices = mix_recipe(model, mix, imatrix)
    _, report = quantize_model(model, recipe, inplace=True, progress=progress)
    return dict(choices=choices, summary=mix_summary(choices), nbytes=int(report.quantized.bytes.sum()), report=report)
