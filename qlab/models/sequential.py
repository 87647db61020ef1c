"""GPTQ over a whole model, one decoder layer at a time (the reference method's model loop).

Quantizing every layer on the *float* model's inputs would ignore that, at inference, layer l reads the
outputs of the already-quantized layers 0..l-1. The reference code (IST-DASLab/gptq, llama.py) runs the
calibration windows through the model layer by layer instead:

1. capture the inputs of decoder layer 0 (the embeddings) and its keyword arguments (mask, rotary
   position embeddings) with a pre-hook that stops the forward pass;
2. for each layer, accumulate H = 2/n X^T X of every Linear from the current inputs with hooks,
   GPTQ-quantize them (Linears that read one input, q/k/v and gate/up, in one sweep over their stacked
   rows, ``gptq_shared``) and put the quantized weights in place (with ``true_sequential``, group by
   group in forward order: q/k/v, then o, then gate/up, then down, each group's inputs computed
   with the groups before it already quantized);
3. run the fully quantized layer on the inputs to get the next layer's inputs.

``awq_model`` walks the model the same way for AWQ: per layer, the inputs of every Linear are captured
in one pass; for each group of Linears that read one input (``qlab.models.transforms.llama_scaling_groups``)
the scales are searched and folded into the previous op, the clipping ranges searched (not for q and k,
as in the reference), and the layer is quantized before its outputs feed the next layer.

Embeddings, norms and the LM head stay in float (the usual weight-only protocol).
"""
import torch
from torch import nn
from tqdm.auto import tqdm

from qlab.methods.weight.awq import apply_clip, awq, group_size
from qlab.methods.weight.gptq import HessianAccumulator, gptq, gptq_shared
from qlab.core.granularity import PerTensor
from qlab.core.quant import QuantSpec, quantize
from qlab.models.transforms import llama_scaling_groups

# Linears quantized together, in forward order, for Llama-style decoder layers.
LLAMA_SEQUENTIAL = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.up_proj"],
    ["mlp.down_proj"],
]


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


def _decoder_layers(model):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers: sequential GPTQ walks Llama-style decoders")
    return inner, layers


@torch.no_grad()
def first_layer_inputs(model, windows: torch.Tensor, batch_size: int = 8) -> list:
    """[(hidden_states, kwargs)] per batch of windows: what decoder layer 0 receives."""
    _, layers = _decoder_layers(model)
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


def _run(layer, store):
    out = []
    for hidden, kwargs in store:
        y = layer(hidden, **kwargs)
        out.append((y[0] if isinstance(y, tuple) else y, kwargs))
    return out


@torch.no_grad()
def _hessians(layer, linears: dict, names: list, store) -> list:
    """[(names, H)]: H of the Linears in ``names`` on the layer's current inputs, one per input they read.
    Linears that read the same tensor (q/k/v, gate/up) share one accumulator; each pass stops after the
    last Linear of the group."""
    accs, seen = {}, []  # seen: (input tensor, its accumulator) of this pass

    def hook(name):
        def fn(module, args):
            x = args[0]
            shared = next((acc for y, acc in seen if y is x), None)  # same tensor as a Linear before it
            if shared is not None:
                accs[name] = shared
            else:
                accs.setdefault(name, HessianAccumulator(linears[name].in_features)).add(x)
                seen.append((x, accs[name]))
            if name == names[-1]:
                raise _Stop

        return fn

    handles = [linears[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        for hidden, kwargs in store:
            seen.clear()
            try:
                layer(hidden, **kwargs)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    shared = {}
    for n in names:
        shared.setdefault(id(accs[n]), (accs[n], []))[1].append(n)
    return [(group, acc.H) for acc, group in shared.values()]


def _one_by_one(weights, H, spec, **kw):
    return [gptq(w, H, spec, **kw) for w in weights]


@torch.no_grad()
def gptq_model(model, windows: torch.Tensor, spec, *, batch_size: int = 8, block_size: int = 128,
               percdamp: float = 0.01, act_order: bool = False, true_sequential: bool = False,
               n_layers: int | None = None, progress: bool = True) -> dict:
    """GPTQ-quantize every Linear of every decoder layer of ``model`` in place (weights replaced by their
    de-quantized values) on calibration ``windows`` [n, seq_len]. Returns {qualified name: QuantizedTensor}.

    ``true_sequential=False`` (the reference's default) takes the Hessians of all Linears of a layer from
    one pass over the float layer; ``True`` re-runs the layer after each group, so that o_proj sees the
    quantized q/k/v, down_proj the quantized gate/up (slower: up to four passes instead of one).
    ``n_layers`` stops after the first n decoder layers (the rest stay float; for quick looks)."""
    spec = QuantSpec.parse(spec)
    _, layers = _decoder_layers(model)
    store = first_layer_inputs(model, windows, batch_size)
    results = {}
    for i, layer in enumerate(tqdm(layers[:n_layers], desc=f"GPTQ {spec}", disable=not progress)):
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        groups = LLAMA_SEQUENTIAL if true_sequential and all(n in linears for g in LLAMA_SEQUENTIAL for n in g) \
            else [list(linears)]
        for names in groups:
            for shared, H in _hessians(layer, linears, names, store):
                weights = [linears[n].weight for n in shared]
                sweep = _one_by_one if isinstance(spec.granularity, PerTensor) else gptq_shared  # one scale per weight
                qts = sweep([w.data for w in weights], H, spec, block_size=block_size, percdamp=percdamp, act_order=act_order)
                for name, weight, qt in zip(shared, weights, qts):
                    weight.data = qt.dequantize().to(weight.dtype)
                    results[f"model.layers.{i}.{name}"] = qt
        store = _run(layer, store)
    return results


@torch.no_grad()
def _inputs(layer, store) -> dict:
    """{id(linear): X [tokens, in]} for every Linear of the layer, from one pass over the stored inputs."""
    rows = {}
    handles = [m.register_forward_pre_hook(lambda m, a: rows.setdefault(id(m), []).append(a[0].reshape(-1, a[0].shape[-1]).float()))
               for m in layer.modules() if isinstance(m, nn.Linear)]
    try:
        for hidden, kwargs in store:
            layer(hidden, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in rows.items()}


@torch.no_grad()
def awq_model(model, windows: torch.Tensor, spec, *, batch_size: int = 8, n_grid: int = 20,
              n_layers: int | None = None, progress: bool = True) -> dict:
    """AWQ every Linear of every (Llama-style) decoder layer in place: scales folded into the previous ops,
    weights clipped and replaced by their de-quantized values. Returns {qualified name: QuantizedTensor}.
    ``n_layers`` stops after the first n decoder layers."""
    spec = QuantSpec.parse(spec)
    _, layers = _decoder_layers(model)
    store = first_layer_inputs(model, windows, batch_size)
    results = {}
    for i, layer in enumerate(tqdm(layers[:n_layers], desc=f"AWQ {spec}", disable=not progress)):
        names = {id(m): n for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        inputs = _inputs(layer, store)
        done = set()
        for prev, linears, fold in llama_scaling_groups(layer):
            X = inputs[id(linears[0])]
            clip = [not names[id(m)].endswith(("q_proj", "k_proj")) for m in linears]
            result = awq(linears, X, spec, n_grid=n_grid, clip=clip)
            fold(prev, linears, result.s)
            for k, m in enumerate(linears):
                if result.max_val is not None and result.max_val[k] is not None:
                    m.weight.data = apply_clip(m.weight.data, result.max_val[k], group_size(spec, m.in_features))
            done.update(id(m) for m in linears)
        for n, m in layer.named_modules():  # quantize the layer (and any Linear no fold reached, as RTN)
            if isinstance(m, nn.Linear):
                qt = quantize(m.weight.data, spec)
                m.weight.data = qt.dequantize().to(m.weight.dtype)
                results[f"model.layers.{i}.{n}"] = qt
        store = _run(layer, store)
    return results
