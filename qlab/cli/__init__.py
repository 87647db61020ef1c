"""The ``qlab`` command line: the jobs people script, each writing its result where it says.

    qlab quantize --recipe '{"model.layers.*": "gptq:int4-g128-asym-minmax"}' --calib 32 --out runs/q4
    qlab eval --recipe int4-g32-asym-minmax --n-windows 16 --out runs/eval.json
    qlab sweep configs.json --results results/mine --n-windows 16 --out runs/sweep.csv
    qlab sweep configs.json --results results/mine --out runs/sweep.csv --backend ray --address auto --cpus-per-task 2
    qlab export --mix Q4_K_M --out runs/model-Q4_K_M.gguf
    qlab export --format compressed-tensors --recipe int4-g64-asym-minmax --out runs/smollm2-w4g64

``--recipe`` is a JSON recipe (name patterns -> entries, see ``qlab.models.walker``) or a single entry
('int4-g128-asym-minmax', 'awq:int4-g128-asym-minmax', 'q4_1'), which then applies to every block Linear.
Every command takes ``--model`` (default: the embedded SmolLM2-135M) and shows a progress bar on long work.
The top layer of the package: it may import from every other.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _recipe(text: str) -> dict:
    from qlab.models.walker import weight_only

    text = text.strip()
    if text.startswith("{"):
        try:
            recipe = json.loads(text)
        except json.JSONDecodeError as e:
            raise SystemExit(f"--recipe is not valid JSON ({e}); give a JSON object or a single entry such as "
                             f"'int4-g128-asym-minmax'")
        return recipe
    return weight_only(text)


def _windows(tokenizer, part, seq_len, n):
    from qlab.models.data import wikitext2_windows

    return wikitext2_windows(tokenizer, part, seq_len, n, pick="spread")


def _quantized_model(args, model, tokenizer):
    from qlab.models.walker import needs_calibration, quantize_model

    recipe = _recipe(args.recipe)
    calib = _windows(tokenizer, "calibration", args.seq_len, args.calib) if needs_calibration(recipe) else None
    return quantize_model(model, recipe, calib, progress=True)


def cmd_quantize(args):
    """Quantize a model with a recipe; write every quantized tensor (qlab.save_qtensor format), the size
    report and the recipe to --out."""
    import torch

    from qlab.models import load_model

    model, tokenizer = load_model(args.model)
    qmodel, report = _quantized_model(args, model, tokenizer)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({name: qt.state_dict() for name, qt in report.qtensors.items()}, out / "qtensors.pt")
    report.layers.to_csv(out / "layers.csv", index=False)
    (out / "recipe.json").write_text(json.dumps({"model": args.model, "recipe": _recipe(args.recipe),
                                                 **report.summary()}, indent=1, default=str))
    print(json.dumps({"out": str(out), **report.summary()}))


def cmd_eval(args):
    """Perplexity, KL and top-1 of the model (quantized with --recipe if given) against the float model."""
    from qlab.eval import evaluate, reference_logprobs
    from qlab.models import load_model

    model, tokenizer = load_model(args.model)
    windows = _windows(tokenizer, args.part, args.seq_len, args.n_windows)
    ref = reference_logprobs(model, windows, progress=True)
    target, summary = model, {}
    if args.recipe:
        target, report = _quantized_model(args, model, tokenizer)
        summary = report.summary()
    metrics = evaluate(target, windows, ref, progress=True)
    row = {"model": args.model, "recipe": args.recipe, "part": args.part, "seq_len": args.seq_len,
           **{k: metrics[k] for k in ("ppl", "ppl_ref", "delta_ppl_pct", "kl_mean", "top1", "n_windows", "n_tokens")
              if k in metrics}, **summary}
    text = json.dumps(row, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)


def cmd_sweep(args):
    """Run a resumable sweep over the configurations of a JSON file (a list of qlab.eval.sweep configurations)."""
    from qlab.eval.sweep import EvalProtocol, run_sweep

    try:
        configs = json.loads(Path(args.configs).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"cannot read the configurations {args.configs}: {e}")
    if not isinstance(configs, list):
        raise SystemExit(f"{args.configs} must hold a JSON list of configurations, got {type(configs).__name__}")
    protocol = EvalProtocol(seq_len=args.seq_len, n_windows=args.n_windows)
    df = run_sweep(configs, protocol, args.results, backend=args.backend, address=args.address,
                   cpus_per_task=args.cpus_per_task, gpus_per_task=args.gpus_per_task, max_retries=args.max_retries)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.drop(columns=["window_nll"], errors="ignore").to_csv(out, index=False)
    print(df[["label", "quantized_bpw", "ppl", "kl_mean", "top1"]].to_string(index=False))
    print(f"-> {out}")


def cmd_export(args):
    """Write a .gguf that llama.cpp loads (the embedded GGUF, or --src, re-quantized with a llama.cpp --mix), or a
    compressed-tensors folder that transformers and vLLM load (the model quantized with --recipe)."""
    from qlab.models.export import export

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.format == "gguf":
        from qlab.models import embedded_gguf_path

        if not args.mix:
            raise SystemExit("--format gguf needs --mix (Q4_K_M, Q8_0, ...)")
        export(Path(args.src) if args.src else embedded_gguf_path(), None, out, format="gguf", mix=args.mix, progress=True)
        print(json.dumps({"out": str(out), "mix": args.mix, "bytes": out.stat().st_size}))
        return
    from qlab.models import load_model

    if not args.recipe:
        raise SystemExit("--format compressed-tensors needs --recipe (e.g. int4-g64-asym-minmax)")
    model, tokenizer = load_model(args.model)
    qmodel, report = _quantized_model(args, model, tokenizer)
    export(qmodel, report, out, tokenizer)
    print(json.dumps({"out": str(out), **report.summary()}))


def parser() -> argparse.ArgumentParser:
    from qlab.models import EMBEDDED

    p = argparse.ArgumentParser(prog="qlab", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(q, recipe_required=False):
        q.add_argument("--model", default=EMBEDDED, help="embedded name, Hugging Face id or local folder")
        q.add_argument("--recipe", required=recipe_required, default=None,
                       help="JSON recipe or one entry applied to every block Linear")
        q.add_argument("--calib", type=int, default=32, help="calibration windows for calibrated methods")
        q.add_argument("--seq-len", type=int, default=512)

    q = sub.add_parser("quantize", help=cmd_quantize.__doc__)
    common(q, recipe_required=True)
    q.add_argument("--out", required=True, help="folder for qtensors.pt, layers.csv, recipe.json")
    q.set_defaults(fn=cmd_quantize)

    q = sub.add_parser("eval", help=cmd_eval.__doc__)
    common(q)
    q.add_argument("--part", default="evaluation", choices=["evaluation", "calibration", "all"])
    q.add_argument("--n-windows", type=int, default=16)
    q.add_argument("--out", default=None, help="also write the JSON here")
    q.set_defaults(fn=cmd_eval)

    q = sub.add_parser("sweep", help=cmd_sweep.__doc__)
    q.add_argument("configs", help="JSON file: a list of configurations (see qlab.eval.sweep)")
    q.add_argument("--results", required=True, help="folder of per-configuration results (resumable)")
    q.add_argument("--n-windows", type=int, default=16)
    q.add_argument("--seq-len", type=int, default=512)
    q.add_argument("--out", required=True, help="CSV of the table")
    q.add_argument("--backend", default="local", choices=["local", "ray"],
                   help="local: one configuration after the other in this process; ray: one Ray task each")
    q.add_argument("--address", default=None,
                   help="ray: a running cluster to join ('auto', 'ray://head:10001'); default: start a local one")
    q.add_argument("--cpus-per-task", type=float, default=1, help="ray: CPUs each configuration's task reserves")
    q.add_argument("--gpus-per-task", type=float, default=None,
                   help="ray: GPUs each task reserves (default: 1 when the cluster has GPUs, else 0)")
    q.add_argument("--max-retries", type=int, default=1, help="ray: retries of a task whose worker or node died")
    q.set_defaults(fn=cmd_sweep)

    q = sub.add_parser("export", help=cmd_export.__doc__)
    common(q)
    q.add_argument("--format", default="gguf", choices=["gguf", "compressed-tensors"])
    q.add_argument("--mix", default=None, help="gguf: the llama.cpp mix (Q4_K_M, Q8_0, ...)")
    q.add_argument("--src", default=None, help="gguf: the source .gguf (default: the embedded model's)")
    q.add_argument("--out", required=True, help="the .gguf to write (atomically), or the folder")
    q.set_defaults(fn=cmd_export)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        args.fn(args)
    except ValueError as e:  # qlab's errors say what to fix: show them without a traceback
        print(f"qlab {args.command}: {e}", file=sys.stderr)
        return 2
    return 0
