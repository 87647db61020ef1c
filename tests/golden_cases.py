"""The cases behind the golden-output test (tests/test_golden.py, recorded by tests/data/golden/record.py).

Every function returns {entry name: tensor or digest}. Only the imports follow the package layout; the
inputs and the calls are fixed, so the recorded file states what the code computed before a refactoring.
"""
import copy
import hashlib
import math

import numpy as np
import torch


def digest(t) -> str:
    if isinstance(t, np.ndarray):
        return hashlib.sha256(np.ascontiguousarray(t).tobytes()).hexdigest()
    t = t.detach().contiguous().cpu()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.uint8 else t.numpy().tobytes()).hexdigest()


def same(got, want) -> bool:
    """Is a recomputed entry the recorded one: equal tensors of the same dtype, or equal values (NaN = NaN)?"""
    if isinstance(want, torch.Tensor):
        return isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want)
    if isinstance(want, float):
        return got == want or (math.isnan(got) and math.isnan(want))
    return got == want


def fixed_weight():
    g = torch.Generator().manual_seed(1234)
    w = torch.randn(24, 576, generator=g) * 0.02
    w[3, 100], w[7, 575], w[11, 0] = 0.5, -0.4, 0.3
    return w


def correlated_inputs(n, dim, seed=0, rank=32, outliers=6):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(rank, dim, generator=g)
    X = torch.randn(n, rank, generator=g) @ mixing / rank**0.5 + 0.3 * torch.randn(n, dim, generator=g)
    X[:, torch.randperm(dim, generator=g)[:outliers]] *= 20.0
    return X


RTN_SPECS = [
    "int8", "int8-full", "int8-tensor", "int4-g128-asym-minmax", "int4-g32-asym-minmax", "int4-g32-asym-mse",
    "int3-g64", "int3-g64-mse", "int2-channel-asym-minmax", "int4-g128-sfp32", "int6-g128-sbf16",
    "nf4", "nf4-b64-dq", "fp8_e4m3", "fp8_e5m2-channel", "fp8_e4m3-token", "fp4_e2m1", "ternary", "binary",
    "dynamic8", "fp16", "bf16", "int4-b64",
]


def rtn_cases():
    from qlab import quantize, fake_quant

    w = fixed_weight()
    out = {}
    for spec in RTN_SPECS:
        qt = quantize(w, spec)
        out[f"rtn/{spec}/packed"] = qt.packed.clone()
        scale = qt.scale.dequantize() if not isinstance(qt.scale, torch.Tensor) else qt.scale
        out[f"rtn/{spec}/scale"] = scale.clone()
        out[f"rtn/{spec}/zero_point"] = None if qt.zero_point is None else qt.zero_point.clone()
        out[f"rtn/{spec}/nbytes"] = float(qt.nbytes)
        out[f"rtn/{spec}/dequantized"] = digest(qt.dequantize())
        out[f"rtn/{spec}/fake_quant"] = digest(fake_quant(w, spec))
    return out


def gguf_cases():
    from qlab import gguf

    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 512, generator=g)
    x[2, 17] = 9.0
    imatrix = torch.rand(512, generator=g) + 0.05
    out = {}
    for name in sorted(gguf.FORMATS):
        out[f"gguf/{name}"] = digest(gguf.quantize(x, name).data)
        out[f"gguf/{name}/imatrix"] = digest(gguf.quantize(x, name, imatrix=imatrix).data)
        out[f"gguf/{name}/nbytes"] = float(gguf.quantize(x, name).nbytes)
    return out


def layer_cases():
    from qlab.methods.weight.awq import awq
    from qlab.methods.weight.gptq import gptq, gptq_shared, hessian
    from qlab.methods.activation.smoothquant import smoothquant, max_abs

    W = fixed_weight()[:, :256]
    W2 = torch.randn(16, 256, generator=torch.Generator().manual_seed(3)) * 0.05
    X = correlated_inputs(512, 256)
    H = hessian(X)
    out = {}
    for spec in ("int4-g128-asym-minmax", "int3-channel", "int4-g64-asym-mse"):
        qt = gptq(W, H, spec)
        out[f"gptq/{spec}/packed"] = qt.packed.clone()
        out[f"gptq/{spec}/scale"] = qt.scale.clone()
        out[f"gptq/{spec}/zero_point"] = None if qt.zero_point is None else qt.zero_point.clone()
    qt = gptq(W, H, "int4-g64-asym-minmax", act_order=True)
    out["gptq/act_order/packed"] = qt.packed.clone()
    out["gptq/shared/packed"] = torch.cat([q.packed for q in gptq_shared([W, W2], H, "int4-g64-asym-minmax")])
    r = awq([W, W2], X, "int4-g64-asym-minmax")
    out["awq/s"], out["awq/alpha"] = r.s.clone(), float(r.alpha)
    out["awq/packed"] = torch.cat([q.packed for q in r.qweights])
    out["awq/scale"] = torch.cat([q.scale.reshape(-1) for q in r.qweights])
    out["awq/max_val"] = torch.cat([m.reshape(-1) for m in r.max_val])
    sq = smoothquant([W, W2], max_abs(X), alpha=0.5)
    out["smoothquant/s"] = sq.s.clone()
    out["smoothquant/packed"] = torch.cat([q.packed for q in sq.qweights])
    return out


def tiny_llama(hidden=256, tied=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


def _model_digests(prefix, model, tokens):
    out = {f"{prefix}/{n}": digest(p) for n, p in model.named_parameters()}
    with torch.no_grad():
        out[f"{prefix}/logits"] = digest(model(input_ids=tokens).logits)
    return out


def model_cases():
    """Whole-model paths on a tiny random Llama (256 wide, so k-quants apply)."""
    from qlab.eval.sweep import config_recipe
    from qlab.models.walker import apply_mix, quantize_model

    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 128, (8, 32), generator=g)
    tokens = torch.randint(0, 128, (2, 32), generator=g)
    base = tiny_llama()
    out = {}
    recipe = {"*.mlp.down_proj": "int8", "model.layers.*": "int4-g64-asym-minmax", "lm_head": "nf4"}
    qmodel, size = quantize_model(base, recipe)
    out.update(_model_digests("walker/rtn", qmodel, tokens))
    out["walker/rtn/size"] = torch.tensor([size.quantized_bpw, size.linear_bpw, size.total_bytes], dtype=torch.float64)
    m = copy.deepcopy(base)
    info = apply_mix(m, "Q4_K_M", progress=False)
    out.update(_model_digests("walker/gguf_q4_k_m", m, tokens))
    out["walker/gguf_q4_k_m/nbytes"] = float(info["nbytes"])
    for method, spec, options in [("gptq", "int4-g64-asym-minmax", {}),
                                  ("gptq", "int3-g32-asym-minmax", {"true_sequential": True, "act_order": True}),
                                  ("awq", "int4-g64-asym-minmax", {}),
                                  ("w8a8", "int8-channel-sym-absmax", {}),
                                  ("w8a8", "int8-channel-sym-absmax", {"alpha": 0.5}),
                                  ("w8a8", "int8-channel-sym-absmax", {"alpha": 0.5, "act": "static"})]:
        m = copy.deepcopy(base)
        key = f"walker/{method}/{spec}/{sorted(options.items())}"
        recipe, walker_options = config_recipe({"method": method, "spec": spec, "options": options})
        _, size = quantize_model(m, recipe, calib, inplace=True, **walker_options)
        for name, qt in size.qtensors.items():
            out[f"{key}/{name}"] = digest(qt.dequantize())
        with torch.no_grad():
            out[f"{key}/logits"] = digest(m(input_ids=tokens).logits)
    return out


def compute_all():
    out = {}
    for f in (rtn_cases, gguf_cases, layer_cases, model_cases):
        out.update(f())
    return out
