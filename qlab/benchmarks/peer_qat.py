"""The peer side of the QAT comparison (issue 13): torchao's quantization-aware training of a float model,
with the training that ``qlab.benchmarks.qat`` gives qlab's QAT, and the de-quantized weights it ends with.

Runs in torchao's own virtual environment (``make qat-peer``: torch 2.13, torchao 0.18, transformers),
never in qlab's: it imports torch, transformers, safetensors and torchao only. ``qlab.benchmarks.qat``
calls it through ``subprocess`` and evaluates the saved weights with qlab's evaluation.

    /work/peers/torchao/bin/python qlab/benchmarks/peer_qat.py --model data/cache/smollm2-135m-instruct \\
        --train /tmp/train.pt --steps 40 --batch 2 --lr 5e-5 --warmup 4 --group-size 64 --out runs/qat/torchao

What is the same as qlab's run: the model (the float copy of the embedded checkpoint), the training windows
and their order (step s takes windows (s * batch + i) mod n), the loss (KL of the teacher's next-token
distribution to the student's, mean over positions), AdamW (no weight decay) with the learning rate of
``qlab.methods.train.lr_factor`` (linear warm-up, cosine decay to 0), the frozen embedding, and the grid:
int4, asymmetric, groups of 64 along the input, scale = (max - min) / 15 over a range forced to include 0,
integer zero point, fp32 scales (qlab's ``int4-g64-asym-minmax-sfp32``). torchao needs the group to divide
the row, and 576 = 4.5 x 128, so the comparison is at group 64, not 128.

torchao's side: ``quantize_(model, QATConfig(weight_config=IntxFakeQuantizeConfig(torch.int4,
group_size=64, is_symmetric=False), step="prepare"), filter_fn=<block Linears>)`` swaps the Linears for
``FakeQuantizedLinear``; after training, ``QATConfig(step="convert")`` swaps them back, and ``IntxWeightOnlyConfig``
(int4, the same groups, asymmetric) quantizes them for real; the saved weights are that quantized tensor
de-quantized. The same de-quantization of the untrained model (torchao's round to nearest) is saved too.

A finding (torchao 0.18, measured on the embedded model): with ``is_symmetric=False`` the fake quant that
``FakeQuantizedLinear`` trains through is *not* the quantizer ``IntxWeightOnlyConfig`` converts with. Its
forward takes group parameters from ``get_groupwise_affine_qparams`` with that function's default
floating-point zero-point domain and applies them as integer zero points in [-8, 7], so groups far from
symmetric get clipped: in ``model.layers.15.mlp.down_proj`` a group with range [-2.234, 0.194] maps -2.234 to
-1.295 in training (the convert and qlab: -2.266); 9,733 of its 13,824 groups differ, and its relative weight
error is 11.6% in training against 9.7% after conversion. torchao's QAT therefore trains through one grid and
deploys on another here; the symmetric configuration (``is_symmetric=True``) does not have this mismatch.

Writes ``<out>/weights.safetensors`` and ``<out>/weights_rtn.safetensors`` ({block Linear name: fp32 weight})
and ``<out>/result.json`` (losses, seconds, versions). Checkpoints every ``--every`` steps in ``<out>``
(atomically); a rerun with the same arguments continues, one with other arguments refuses.
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent  # keep this folder's modules from shadowing libraries
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

BLOCK_PREFIX = "model.layers."


def lr_factor(step, steps, warmup):
    """qlab.methods.train.lr_factor(step, steps, warmup, cosine=True), restated (this script imports no qlab)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def kd_loss(student_logits, teacher_logits):
    log_q = F.log_softmax(student_logits.float(), dim=-1).flatten(0, -2)
    log_p = F.log_softmax(teacher_logits.float(), dim=-1).flatten(0, -2)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def weight_config(args):
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    return IntxFakeQuantizeConfig(torch.int4, group_size=args.group_size, is_symmetric=False)


def is_block_linear(module, fqn):
    return isinstance(module, torch.nn.Linear) and fqn.startswith(BLOCK_PREFIX)


def dequantized_weights(model, args) -> dict:
    """torchao's convert, then its real int4 weight-only quantization; the weights de-quantized (fp32)."""
    import copy

    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.qat import QATConfig
    from torchao.quantization.quant_primitives import MappingType

    model = copy.deepcopy(model)
    quantize_(model, QATConfig(step="convert"))  # FakeQuantizedLinear -> nn.Linear (the trained float weight)
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(args.group_size),
                                          mapping_type=MappingType.ASYMMETRIC), filter_fn=is_block_linear)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith(BLOCK_PREFIX):
            w = m.weight
            out[name] = (w.dequantize() if hasattr(w, "dequantize") else w).detach().float().contiguous()
    return out


def save_atomic(obj, path: Path, save):
    tmp = path.with_name(path.name + ".tmp")
    save(obj, tmp)
    os.replace(tmp, path)


def main(argv=None):
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    import torchao
    import transformers
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a float checkpoint folder (qlab's cached copy)")
    p.add_argument("--train", required=True, help="a .pt file holding the [n, seq_len] training windows")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    windows = torch.load(args.train)
    identity = json.dumps({k: v for k, v in vars(args).items() if k not in ("every", "threads", "out")} |
                          {"windows": list(windows.shape), "first": windows[0, :8].tolist()}, sort_keys=True)

    teacher = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    quantize_(student, QATConfig(weight_config=weight_config(args), step="prepare"), filter_fn=is_block_linear)
    for name, param in student.named_parameters():
        param.requires_grad_("embed_tokens" not in name and "lm_head" not in name)
    if not (out / "weights_rtn.safetensors").exists():
        save_file(dequantized_weights(student, args), out / "weights_rtn.safetensors")
    params = [q for q in student.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    losses, ckpt = [], out / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state["identity"] != identity:
            raise SystemExit(f"{ckpt} was made with other arguments:\n  {state['identity']}\n  {identity}")
        student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        losses = state["losses"]
    resumed = len(losses)
    t0, c0 = time.perf_counter(), time.process_time()
    student.train()
    for step in range(resumed, args.steps):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * lr_factor(step, args.steps, args.warmup)
        x = windows[[(step * args.batch + i) % len(windows) for i in range(args.batch)]]
        with torch.no_grad():
            target = teacher(input_ids=x, use_cache=False).logits
        loss = kd_loss(student(input_ids=x, use_cache=False).logits, target)
        if not math.isfinite(float(loss)):
            raise SystemExit(f"the loss is {float(loss)} at step {step}; stopped (last checkpoint kept)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
        print(f"step {step} loss {float(loss):.4f}", flush=True)
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            save_atomic({"identity": identity, "model": student.state_dict(), "optimizer": optimizer.state_dict(),
                         "losses": losses}, ckpt, torch.save)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    save_file(dequantized_weights(student.eval(), args), out / "weights.safetensors")
    result = {"losses": losses, "resumed_from": resumed, "seconds": seconds, "cpu_seconds": cpu,
              "s_per_step": seconds / max(1, args.steps - resumed), "threads": args.threads,
              "versions": {"torch": torch.__version__, "torchao": torchao.__version__,
                           "transformers": transformers.__version__},
              "config": json.loads(identity)}
    save_atomic(result, out / "result.json", lambda o, t: Path(t).write_text(json.dumps(o, indent=1)))


if __name__ == "__main__":
    main()
