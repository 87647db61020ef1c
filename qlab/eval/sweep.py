"""Resumable sweeps: a grid of (model, recipe) configurations -> one pandas table.

A configuration is a plain dict::

    {"label": "int4 g128 asym",                       # for tables and plots only
     "model": "smollm2-135m-instruct",                # anything qlab.models.load_model takes
     "recipe": {"model.layers.*": "int4-g128-asym-minmax"},
     "mode": "fake"}                                  # optional, "fake" (default) or "packed"

or, for a calibrated method on every block Linear (any method of ``qlab.methods.METHODS``)::

    {"label": "GPTQ int4 g128", "method": "gptq", "spec": "int4-g128-asym-minmax",
     "calib_windows": 32, "options": {"act_order": False}}  # options go to the method

A recipe may mix methods per layer (``qlab.models.walker``), calibrated ones included::

    {"label": "GPTQ 4-bit, 8-bit ends", "calib_windows": 32,
     "recipe": {"model.embed_tokens": "int8-channel-sym-absmax", "lm_head": "int8-channel-sym-absmax",
                "model.layers.*": "gptq:int4-g128-asym-minmax"}}

whose calibration windows come from the protocol's calibration articles (never the evaluated ones),
and an evaluation protocol (:class:`EvalProtocol`) says which windows are scored. Each finished
configuration is written at once to ``<results_dir>/<key>.json``, where ``key`` is a hash of the
configuration (label excluded) and the protocol; a re-run reads those files and skips them, so
killing a sweep loses only the configuration it was working on.

Columns of the table: label, model, method, recipe, mode, calib_windows, key, ppl, ppl_ref, delta_ppl_pct, kl_mean,
kl_median, kl_p99, top1, quantized_bpw, linear_bpw, size_mb, quant_seconds, eval_seconds,
s_per_window, aligned_q4_1 (True when a spec groups weights in 32s, i.e. exactly the embedded
checkpoint's Q4_1 blocks, see :mod:`qlab.study.gridalign`), protocol.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from qlab.models.walker import quantize_model
from qlab.models import EMBEDDED, REPO_ROOT

DEFAULT_RESULTS = REPO_ROOT / "results"


@dataclass(frozen=True)
class EvalProtocol:
    """Which WikiText-2 windows a sweep scores (see :func:`qlab.models.data.wikitext2_windows`)."""

    part: str = "evaluation"
    seq_len: int = 512
    n_windows: int = 40
    pick: str = "spread"
    n_calibration: int = 8
    seed: int = 0

    def describe(self) -> str:
        where = "whole test split" if self.part == "all" else (
            f"{self.part} articles of WikiText-2 test (seed {self.seed}, {self.n_calibration} articles held out for calibration)"
        )
        return f"{self.n_windows} non-overlapping windows of {self.seq_len} tokens ({self.pick}), {where}, no BOS"


def config_key(config: dict, protocol: EvalProtocol) -> str:
    """12-hex-digit hash of everything that changes the numbers (not the label)."""
    payload = {k: v for k, v in config.items() if k != "label"}
    payload.setdefault("mode", "fake")
    payload["protocol"] = asdict(protocol)
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def aligned_q4_1(recipe: dict) -> bool:
    """Does any spec of the recipe group weights in blocks of 32 (the Q4_1 checkpoint's blocks)?"""
    for spec in recipe.values():
        s = str(spec).lower()
        if s in ("q4_1", "gguf:q4_1") or "-g32-" in s + "-" or "-b32-" in s + "-":
            return True
    return False


class _Session:
    """Models, windows and reference log-probs shared by the configs of one sweep run."""

    def __init__(self, protocol, batch_size, load, progress):
        self.protocol, self.batch_size, self.load, self.progress = protocol, batch_size, load, progress
        self.models, self.refs, self.calibs = {}, {}, {}

    def model(self, name):
        if name not in self.models:
            self.models.clear()
            self.refs.clear()  # keep one model (and its reference and calibration windows) in memory at a time
            self.calibs.clear()
            self.models[name] = self.load(name)
        return self.models[name]

    def calibration(self, name, n_windows):
        from qlab.models.data import wikitext2_windows

        key = (name, n_windows)
        if key not in self.calibs:
            _, tokenizer = self.model(name)
            p = self.protocol
            self.calibs[key] = wikitext2_windows(tokenizer, "calibration", p.seq_len, n_windows, "spread", p.n_calibration, p.seed)
        return self.calibs[key]

    def reference(self, name):
        from qlab.models.data import wikitext2_windows
        from qlab.eval import reference_logprobs

        if name not in self.refs:
            model, tokenizer = self.model(name)
            p = self.protocol
            windows = wikitext2_windows(tokenizer, p.part, p.seq_len, p.n_windows, p.pick, p.n_calibration, p.seed)
            self.refs[name] = reference_logprobs(model, windows, self.batch_size, progress=self.progress)
        return self.refs[name]


def _default_load(name):
    from qlab.models import load_model

    return load_model(name)


# options of a method configuration that belong to the walker rather than to the method
WALKER_OPTIONS = ("true_sequential", "batch_size")


def config_recipe(config: dict) -> tuple[dict, dict]:
    """(recipe, walker options) of a configuration: its 'recipe', or for a calibrated-method configuration
    ``{"method", "spec", "options"}`` every block Linear with that method (W8A8 with an ``alpha`` option is
    SmoothQuant)."""
    from qlab.models.walker import weight_only

    method = config.get("method", "rtn")
    if method == "rtn" or "recipe" in config:
        if "recipe" not in config:
            raise ValueError(f"an RTN configuration needs a 'recipe', got keys {sorted(config)}")
        return config["recipe"], {}
    if "spec" not in config or config.get("mode", "fake") != "fake":
        raise ValueError(f"method {method!r} needs a 'spec' and works in fake-quant mode")
    options = dict(config.get("options", {}))
    walker_options = {k: options.pop(k) for k in WALKER_OPTIONS if k in options}
    if method == "w8a8" and options.get("alpha") is not None:
        method = "smoothquant"
    options = {k: v for k, v in options.items() if not (k == "alpha" and v is None)}
    return weight_only({"method": method, "spec": config["spec"], **options}), walker_options


def _calib_windows(config: dict) -> int:
    """How many calibration windows a configuration uses (0 when no method in it calibrates)."""
    from qlab.methods import get_method
    from qlab.models.walker import entry

    recipe, _ = config_recipe(config)
    entries = [entry(v) for v in recipe.values()]
    needs = any(e is not None and (get_method(e.method).wants_inputs(e.options) or get_method(e.method).folds_into)
                for e in entries)
    return config.get("calib_windows", 32) if needs else 0


def _quantize(config: dict, model, session):
    """(quantized model, SizeReport, the recipe it amounts to) for one configuration."""
    recipe, walker_options = config_recipe(config)
    n_calib = _calib_windows(config)
    calib = session.calibration(config.get("model", EMBEDDED), n_calib) if n_calib else None
    qmodel, size = quantize_model(model, recipe, calib, mode=config.get("mode", "fake"), **walker_options)
    return qmodel, size, recipe


def run_one(config: dict, session: _Session) -> dict:
    from qlab.eval import evaluate
    from qlab.models.walker import entry

    name = config.get("model", EMBEDDED)
    model, _ = session.model(name)
    ref = session.reference(name)
    t0 = time.perf_counter()
    qmodel, size, recipe = _quantize(config, model, session)
    quant_seconds = time.perf_counter() - t0
    metrics = evaluate(qmodel, ref.windows, ref, session.batch_size, progress=session.progress)
    del qmodel
    return {
        "label": config.get("label", ""),
        "model": name,
        "method": config.get("method", "rtn"),
        "recipe": {k: (None if v is None else str(entry(v))) for k, v in recipe.items()},
        "mode": config.get("mode", "fake"),
        "calib_windows": _calib_windows(config),
        **{k: metrics[k] for k in ("ppl", "ppl_ref", "delta_ppl_pct", "kl_mean", "kl_median", "kl_p99", "top1", "window_nll")},
        **size.summary(),
        "quant_seconds": quant_seconds,
        "eval_seconds": metrics["seconds"],
        "s_per_window": metrics["s_per_window"],
        "aligned_q4_1": aligned_q4_1(recipe),
        "protocol": session.protocol.describe(),
    }


def run_sweep(
    configs: list[dict],
    protocol: EvalProtocol = EvalProtocol(),
    results_dir: str | Path = DEFAULT_RESULTS / "sweep",
    batch_size: int = 1,
    progress: bool = True,
    load=_default_load,
) -> pd.DataFrame:
    """Run every configuration not already on disk; return the table of all of them.

    ``load(name) -> (model, tokenizer)`` is injectable (tests use a tiny model).
    """
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    keys = [config_key(c, protocol) for c in configs]
    if len(set(keys)) != len(keys):
        raise ValueError("two configurations are identical (same model, recipe, mode)")
    session = _Session(protocol, batch_size, load, progress)
    todo = [(k, c) for k, c in zip(keys, configs) if not (results_dir / f"{k}.json").exists()]
    for key, config in tqdm(todo, desc="sweep", disable=not progress):
        row = run_one(config, session)
        row["key"] = key
        tmp = results_dir / f"{key}.json.tmp"
        tmp.write_text(json.dumps(row, indent=1))
        tmp.rename(results_dir / f"{key}.json")  # atomic: a killed run never leaves half a file
    rows = [json.loads((results_dir / f"{k}.json").read_text()) for k in keys]
    for row, config in zip(rows, configs):
        row["label"] = config.get("label", row["label"])
    return pd.DataFrame(rows)


def pareto_front(df: pd.DataFrame, x: str = "quantized_bpw", y: str = "ppl") -> pd.DataFrame:
    """Rows not dominated by another (no other row has x <= and y <= with one strict), sorted by x."""
    d = df.sort_values([x, y])
    best, keep = float("inf"), []
    for idx, val in d[y].items():
        if val < best:
            keep.append(idx)
            best = val
    return d.loc[keep]


def rtn_grid(
    bits=(8, 6, 5, 4, 3, 2),
    groups=(None, 128, 64, 32),
    symmetric=(True, False),
    extras=("nf4", "fp8_e4m3-channel"),
    model: str = EMBEDDED,
) -> list[dict]:
    """Weight-only round-to-nearest configurations for every block linear.

    ``groups=None`` means per output channel. ``extras`` are spec strings added as they are.
    """
    from qlab.models.walker import weight_only
    from qlab.core.spec import QuantSpec

    configs = []
    for b in bits:
        for g in groups:
            for sym in symmetric:
                spec = QuantSpec.integer(b, g, symmetric=sym)
                gran = "per-channel" if g is None else f"g{g}"
                configs.append({"label": f"int{b} {gran} {'sym' if sym else 'asym'}", "model": model,
                                "recipe": weight_only(str(spec))})
    for e in extras:
        configs.append({"label": str(QuantSpec.parse(e)), "model": model, "recipe": weight_only(str(QuantSpec.parse(e)))})
    return configs
