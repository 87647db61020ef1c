"""The peer side of the post-training-quantization comparison (issue 4): run ONE outside library's
quantizer on a float model and save the weights it produces.

This script runs in the peers' own virtual environment (``make ptq-peers``), never in qlab's: it imports
only torch, transformers, safetensors and the peer library, never qlab. ``qlab.benchmarks.peers`` calls it
through ``subprocess`` and evaluates what it saves with qlab's own evaluation, on the same windows as
qlab's rows.

    /work/peers/ptq/bin/python qlab/benchmarks/peer_ptq.py --model data/cache/smollm2-135m-instruct \\
        --calib /tmp/calib.pt --method llmcompressor-gptq --bits 4 --group-size 64 --sym --out /tmp/peer

Methods (block linears ``model.layers.*`` only; embeddings, norms and lm_head stay float):

* ``llmcompressor-gptq``: llm-compressor ``oneshot`` + ``GPTQModifier`` (int, per group, sym or asym,
  no activation ordering, dampening 0.01, block 128) on exactly the given calibration windows.
* ``gptqmodel-gptq``: GPTQModel ``quantize`` with the same settings (its own venv).
* ``bnb-nf4``: bitsandbytes ``quantize_4bit`` / ``dequantize_4bit`` (NF4, absmax in blocks of
  ``--group-size`` of the flattened weight, fp32 absmax); round to nearest, no calibration.
* ``hqq``: HQQ's half-quadratic optimizer (``Quantizer.quantize``, optimize=True, asymmetric with a
  rounded zero point for 4 bits, groups of ``--group-size`` along the input); no calibration.

Writes ``<out>/weights.safetensors`` ({module name: de-quantized fp32 weight}) and ``<out>/result.json``
(wall and CPU seconds of the quantization itself, model loading excluded; threads; the peer's versions).
The CPU seconds (``time.process_time``: user + system of this process) are the fairer measure on a machine
shared with other work; wall seconds include the time spent waiting for a core.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

# Run as a script, this file's folder would sit first on sys.path and its neighbours (gptq.py,
# kernels.py) would shadow libraries of those names (transformers imports ``kernels`` when present).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import torch  # noqa: E402

BLOCK_PREFIX = "model.layers."


def block_linears(model) -> dict:
    """{qualified name: nn.Linear} of the decoder blocks (what qlab's weight-only recipes quantize)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith(BLOCK_PREFIX)}


def load_float_model(folder, tokenizer: bool = False):
    """(model in float32, eval mode; its tokenizer or None)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(folder) if tokenizer else None


class Timer:
    """Wall and CPU seconds of a ``with`` block."""

    def __enter__(self):
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.cpu_seconds = time.process_time() - self.c0


# ---- the peers ------------------------------------------------------------------------------------
def llmcompressor_gptq(folder, calib, args) -> tuple[dict, Timer, dict]:
    """llm-compressor: oneshot(GPTQModifier) on the windows as an already tokenized Dataset (no shuffling,
    every window taken, max_seq_length = window length so nothing is truncated)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    model, tokenizer = load_float_model(folder, tokenizer=True)
    n, seq_len = calib.shape
    dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    weights = QuantizationArgs(num_bits=args.bits, type="int", symmetric=args.sym, strategy="group",
                               group_size=args.group_size, actorder=None)
    recipe = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                          ignore=["lm_head"], block_size=args.block_size, dampening_frac=args.percdamp,
                          actorder=None)  # refuses groups that do not divide the row (576 / 128)
    seen = []  # every token row the embedding receives during oneshot: proves which windows were used
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    with Timer() as timer:
        oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=recipe, num_calibration_samples=n,
                max_seq_length=seq_len, shuffle_calibration_samples=False, batch_size=args.batch_size)
    hook.remove()
    real = [t.reshape(-1, t.shape[-1]) for t in seen if t.device.type != "meta"]  # not the tracing passes
    check_same_windows(torch.cat(real), calib)

    out, checked = {}, 0
    for name, m in block_linears(model).items():
        w = m.weight.detach().float()
        check_on_grid(name, w, m.weight_scale.detach().float(), getattr(m, "weight_zero_point", None),
                      args.bits, args.group_size)
        out[name] = w.clone()
        checked += 1
    settings = dict(block_size=args.block_size, dampening_frac=args.percdamp, actorder=None,
                    batch_size=args.batch_size, pipeline="sequential (llm-compressor default for GPTQ)",
                    grid=f"int{args.bits} [{-2 ** (args.bits - 1)}, {2 ** (args.bits - 1) - 1}]",
                    scale_rule=("absmax / ((qmax - qmin) / 2)" if args.sym else "(max - min) / (qmax - qmin)"),
                    group_scales="from the original weights, before the GPTQ sweep (observer, min-max)",
                    checked_on_grid=checked, checked_windows=n)
    return out, timer, settings


def check_same_windows(seen: torch.Tensor, calib: torch.Tensor):
    """The windows the peer ran through the model are exactly the calibration windows (each one, whole,
    unchanged; order and repeats aside)."""
    if seen.shape[-1] != calib.shape[-1]:
        raise AssertionError(f"the peer saw windows of {seen.shape[-1]} tokens, not {calib.shape[-1]}")
    unique = torch.unique(seen, dim=0)
    if not torch.equal(unique, torch.unique(calib, dim=0)):
        raise AssertionError(f"the peer saw {len(unique)} distinct windows, not the {len(calib)} given")


def check_on_grid(name, w, scale, zero_point, bits, group_size):
    """Prove that ``w`` is the de-quantized weight: w / scale + zero_point is an integer in
    [-2^(b-1), 2^(b-1) - 1] in every group (compressed-tensors' signed grid, also for asymmetric)."""
    rows, cols = w.shape
    groups = -(-cols // group_size)
    if scale.shape != (rows, groups):
        raise AssertionError(f"{name}: weight_scale has shape {tuple(scale.shape)}, expected {(rows, groups)}")
    per_col = lambda t: t.repeat_interleave(group_size, dim=1)[:, :cols]  # noqa: E731
    q = w / per_col(scale)
    if zero_point is not None:
        q = q + per_col(zero_point.detach().float())
    qmin, qmax = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    off = (q - q.round()).abs().max().item()
    if off > 1e-3 or q.min() < qmin - 1e-3 or q.max() > qmax + 1e-3:
        raise AssertionError(f"{name}: weight / scale is not on the int{bits} grid (off by {off:.3g}, "
                             f"range [{q.min().item():.3f}, {q.max().item():.3f}])")


def gptqmodel_gptq(folder, calib, args) -> tuple[dict, Timer, dict]:
    """GPTQModel: QuantizeConfig(bits, group_size, sym, desc_act=False, damp_percent) and quantize() on
    the windows; the packed layers are de-quantized back to float afterwards."""
    from gptqmodel import GPTQModel, QuantizeConfig

    config = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=args.sym, desc_act=False,
                            damp_percent=args.percdamp)
    model = GPTQModel.load(str(folder), config, dtype=torch.float32, device="cpu")
    dataset = [{"input_ids": w[None], "attention_mask": torch.ones_like(w)[None]} for w in calib]
    with Timer() as timer:
        model.quantize(dataset, batch_size=args.batch_size)
    out = {}
    for name, m in model.model.named_modules():
        if name.startswith(BLOCK_PREFIX) and hasattr(m, "dequantize_weight"):
            w = m.dequantize_weight().detach().float().t()  # GPTQ's packed layout is [in, out]
            if tuple(w.shape) != (m.out_features, m.in_features):
                raise AssertionError(f"{name}: de-quantized weight has shape {tuple(w.shape)}")
            out[name] = w.contiguous()
    if not out:
        raise AssertionError("no de-quantizable GPTQModel layers found after quantize()")
    return out, timer, dict(desc_act=False, damp_percent=args.percdamp, batch_size=args.batch_size)


def bnb_nf4(folder, calib, args) -> tuple[dict, Timer, dict]:
    """bitsandbytes NF4: absmax per block of the flattened weight, fp32 absmax, no double quantization."""
    import bitsandbytes.functional as F

    model, _ = load_float_model(folder)
    out = {}
    with Timer() as timer:
        for name, m in block_linears(model).items():
            w = m.weight.detach().float()
            packed, state = F.quantize_4bit(w, blocksize=args.group_size, quant_type="nf4")
            out[name] = F.dequantize_4bit(packed, state, blocksize=args.group_size, quant_type="nf4").float()
    return out, timer, dict(quant_type="nf4", blocksize=args.group_size, absmax_dtype="fp32",
                              compress_statistics=False)


def hqq_rtn(folder, calib, args) -> tuple[dict, Timer, dict]:
    """HQQ: min-max start, then the half-quadratic solver refines scale and zero point per group (axis=1:
    groups along the input dimension, of the flattened weight, so a group may straddle two rows when the
    row length is not a multiple of the group size)."""
    from hqq.core.quantize import Quantizer

    model, _ = load_float_model(folder)
    out = {}
    round_zero = args.bits == 4  # hqq_base_quant_config's default
    with Timer() as timer:
        for name, m in block_linears(model).items():
            w = m.weight.detach().float()
            Wq, meta = Quantizer.quantize(w, nbits=args.bits, channel_wise=True, group_size=args.group_size,
                                          optimize=True, round_zero=round_zero, axis=1, bitpack=False,
                                          compute_dtype=torch.float32, device="cpu")
            meta["compute_dtype"] = torch.float32
            out[name] = Quantizer.dequantize(Wq, meta).float().reshape(w.shape)
    straddle = any(m.in_features % args.group_size for m in block_linears(model).values())
    return out, timer, dict(optimize=True, round_zero=round_zero, axis=1, asymmetric=True,
                              groups_straddle_rows=straddle)


METHODS = {
    "llmcompressor-gptq": (llmcompressor_gptq, ["llmcompressor", "compressed_tensors"]),
    "gptqmodel-gptq": (gptqmodel_gptq, ["gptqmodel"]),
    "bnb-nf4": (bnb_nf4, ["bitsandbytes"]),
    "hqq": (hqq_rtn, ["hqq"]),
}


def versions(modules) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    names = {"llmcompressor": "llmcompressor", "compressed_tensors": "compressed-tensors"}
    out = {}
    for mod in ["torch", "transformers", *modules]:
        try:
            out[mod] = version(names.get(mod, mod))
        except PackageNotFoundError:
            out[mod] = None
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="float model folder (safetensors + tokenizer)")
    p.add_argument("--calib", help=".pt file with int64 calibration windows [n, seq_len] (GPTQ methods)")
    p.add_argument("--method", required=True, choices=sorted(METHODS))
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--block-size", type=int, default=128, help="GPTQ column block")
    p.add_argument("--percdamp", type=float, default=0.01, help="GPTQ dampening (fraction of mean diag H)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch (qlab's model walker uses 8)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    fn, modules = METHODS[args.method]
    calib = None
    if args.calib:
        calib = torch.load(args.calib)
        if calib.dtype != torch.int64 or calib.ndim != 2:
            raise ValueError(f"--calib must hold int64 windows [n, seq_len], got {calib.dtype} {tuple(calib.shape)}")
    elif args.method.endswith("gptq"):
        raise ValueError(f"{args.method} needs --calib")

    weights, timer, settings = fn(Path(args.model), calib, args)

    from safetensors.torch import save_file

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, out / "weights.safetensors")
    result = dict(method=args.method, bits=args.bits, group_size=args.group_size, sym=args.sym,
                  calib_windows=None if calib is None else list(calib.shape),
                  seconds=timer.seconds, cpu_seconds=timer.cpu_seconds,
                  threads=torch.get_num_threads(), n_weights=len(weights), versions=versions(modules),
                  settings=settings)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("method", "seconds", "cpu_seconds", "threads", "n_weights")}), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
