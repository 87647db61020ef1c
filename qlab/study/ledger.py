"""The claims ledger: every checkable statement of five articles on LLM quantization, checked.

The rows live in ``ledger.yaml`` beside this module, one mapping per claim:

    id           a short unique name, ``s<article>-<subject>`` (s003-kv-llama3-8b-8k)
    seed, section  which article (000-004) and which of its sections states it
    topic        memory, formats, theory, ptq, gguf, outliers, hardware, kv, two_bit, qat
    claim        the statement in our own words (the articles are never quoted)
    traces_to    the paper or documentation it cites or should cite, or "a common statement"
    check        how it is checked: a closed form, a measurement on the embedded model, a published table
    found        what the check gives, as text with units
    verdict      holds | wrong | depends | untestable  (:data:`VERDICTS`)
    verdict_note on what it depends, why it is wrong, or why it cannot be tested here
    evidence     where to look: a qlab function (``qlab.study.memory.kv_cache_bytes``), a notebook cell
                 (``notebooks/15_memory_calculator.ipynb#seed-figures``, the cell's id), a README section
                 (``README.md#<heading>``) or a test (``tests/core/test_handmath.py::test_symmetric_int8``)
    live, value, tol   a cheap check (a name in :data:`CHECKS`, or ``figure:<id>`` of
                 :data:`qlab.study.memory.SEED_FIGURES`) that returns the number found, the number recorded, and the
                 relative tolerance allowed between them (absolute when the recorded number is 0)
    from         or, for an expensive measurement, the committed source of the number (README.md#<heading>)
    conflicts_with  the ids of rows in other articles that say the opposite

:func:`load` reads and validates the rows; :func:`run_live` runs every live check and compares it with the
recorded number (the ledger notebook asserts they agree); :func:`evidence_problems` says which evidence does not
exist. Example: the Llama-3-8B KV cache at 8192 tokens, 2 x 32 x 8 x 128 x 8192 x 2 B:

>>> round(check("figure:s003-kv-llama3-8b-8k"), 3)   # GB; an article prints 8
1.074
"""
from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
import re

import pandas as pd
import torch

from qlab.study import memory

LEDGER = Path(__file__).with_name("ledger.yaml")
ROOT = Path(__file__).resolve().parents[2]
VERDICTS = ("holds", "wrong", "depends", "untestable")
TOPICS = ("memory", "formats", "theory", "ptq", "gguf", "outliers", "hardware", "kv", "two_bit", "qat")
REQUIRED = ("id", "seed", "section", "topic", "claim", "traces_to", "check", "found", "verdict", "verdict_note",
            "evidence")
SEEDS = ("000", "001", "002", "003", "004")


# ---------------------------------------------------------------- loading and validation

def load(path: str | Path = LEDGER) -> list[dict]:
    """The ledger's rows, validated (:func:`validate`)."""
    import yaml

    rows = yaml.safe_load(Path(path).read_text())
    validate(rows)
    return rows


def validate(rows: list[dict]) -> None:
    """Every row has the required fields, a known verdict, seed and topic, and either a live check with a recorded
    value or a committed source; ids are unique and conflicts point at existing rows. Raises ValueError naming
    the row and the field."""
    if not isinstance(rows, list) or not rows:
        raise ValueError("the ledger must be a non-empty list of rows (mappings)")
    ids = [r.get("id") for r in rows]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise ValueError(f"duplicate ids in the ledger: {sorted(dup)}")
    for r in rows:
        rid = r.get("id", "<no id>")
        for field in REQUIRED:
            if r.get(field) in (None, "", []):
                raise ValueError(f"row {rid}: field {field!r} is missing or empty")
        if r["verdict"] not in VERDICTS:
            raise ValueError(f"row {rid}: verdict {r['verdict']!r} is not one of {VERDICTS}")
        if str(r["seed"]) not in SEEDS:
            raise ValueError(f"row {rid}: seed {r['seed']!r} is not one of {SEEDS}")
        if r["topic"] not in TOPICS:
            raise ValueError(f"row {rid}: topic {r['topic']!r} is not one of {TOPICS}")
        if "live" in r:
            if r["live"] not in CHECKS and not str(r["live"]).startswith("figure:"):
                raise ValueError(f"row {rid}: live check {r['live']!r} is not in CHECKS (nor figure:<id>)")
            if not isinstance(r.get("value"), (int, float)) or not isinstance(r.get("tol"), (int, float)):
                raise ValueError(f"row {rid}: a live check needs a numeric 'value' (the number recorded) and 'tol'")
        for other in r.get("conflicts_with", []):
            if other not in ids:
                raise ValueError(f"row {rid}: conflicts_with names {other!r}, which is not a row")
        if not isinstance(r["evidence"], list):
            raise ValueError(f"row {rid}: evidence must be a list of references")


def frame(rows: list[dict] | None = None) -> pd.DataFrame:
    """The ledger as a table, one row per claim, sorted by topic, verdict and id."""
    rows = load() if rows is None else rows
    df = pd.DataFrame(rows)
    df["evidence"] = df["evidence"].map(lambda e: ", ".join(e))
    order = {v: i for i, v in enumerate(VERDICTS)}
    return df.sort_values(["topic", "verdict", "id"], key=lambda c: c.map(order) if c.name == "verdict" else c)


def verdict_counts(rows: list[dict] | None = None) -> pd.DataFrame:
    """Rows per article (index) and verdict (columns), with totals."""
    df = pd.DataFrame(load() if rows is None else rows)
    table = pd.crosstab(df["seed"].astype(str), df["verdict"]).reindex(columns=list(VERDICTS), fill_value=0)
    table["total"] = table.sum(axis=1)
    return table


# ---------------------------------------------------------------- evidence

def _notebook_cell_ids(path: Path) -> set:
    return {c.get("id") for c in json.loads(path.read_text())["cells"]}


def _slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def evidence_problems(ref: str, root: Path = ROOT) -> str | None:
    """None if the reference exists, else what is wrong with it. A reference is a dotted qlab name (importable),
    ``<file>.ipynb#<cell id>``, ``<file>.md#<heading anchor>``, ``<file>.py::<function>`` or a plain file."""
    if ref.startswith("qlab."):
        try:
            importlib.import_module(ref)  # a module
            return None
        except ImportError:
            pass
        module, _, name = ref.rpartition(".")
        try:
            obj = importlib.import_module(module)
        except ImportError:
            return f"{ref}: cannot import {module}"
        return None if hasattr(obj, name) else f"{ref}: {module} has no {name!r}"
    path, sep, anchor = ref.partition("#") if "#" in ref else ref.partition("::")
    file = root / path
    if not file.exists():
        return f"{ref}: {path} does not exist"
    if not sep:
        return None
    if path.endswith(".ipynb"):
        return None if anchor in _notebook_cell_ids(file) else f"{ref}: no cell with id {anchor!r} in {path}"
    if path.endswith(".md"):
        slugs = {_slug(line.lstrip("#")) for line in file.read_text().splitlines() if line.startswith("#")}
        return None if anchor in slugs else f"{ref}: no heading with anchor {anchor!r} in {path}"
    if path.endswith(".py"):
        return None if re.search(rf"^\s*def {re.escape(anchor)}\(", file.read_text(), re.M) else \
            f"{ref}: no function {anchor!r} in {path}"
    return f"{ref}: cannot resolve an anchor in {path}"


# ---------------------------------------------------------------- the live checks: each returns the number found

HAND = torch.tensor([0.32, -1.54, 0.87, -0.21, 1.23, -0.76, 0.05, -1.91])  # article 003's eight weights


def _hand_max_error(spec: str) -> float:
    from qlab.core.quant import quantize

    return float((HAND - quantize(HAND, spec).dequantize()).abs().max())


def _hand_grid_end(end: str) -> float:
    """The lowest or highest value the per-tensor asymmetric int4 grid of article 003's weights can hold."""
    from qlab.core.quant import quantize

    qt = quantize(HAND, "int4-tensor-asym-minmax-sfp32")
    code = 0 if end == "low" else 15
    return float(((code - qt.zero_point.float()) * qt.scales()).reshape(-1)[0])


def _fmt(name: str) -> dict:
    from qlab.study.precision import format_properties, grid_by_name

    return format_properties(grid_by_name(name))


def _spacing(x: float) -> float:
    from qlab.study.precision import FP32, float_spacing

    return float(float_spacing(FP32, torch.tensor(x, dtype=torch.float64)))


def _e8_error_reduction_pct() -> float:
    """100 (1 - G(E8) / G(Z)): E8's mean squared error per dimension below the integer grid's 1/12 (Monte Carlo,
    20,000 points, seed 0; the exact G(E8) = 929/12960 gives 13.98%)."""
    from qlab.core.formats.lattice import normalized_second_moment

    return 100 * (1 - normalized_second_moment("E8", samples=20_000)[0] * 12)


def _fp8_nan_codes() -> float:
    """How many of the 256 E4M3 (fn) bit patterns are NaN: S.1111.111, both signs."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return float(torch.isnan(codes).sum())


def _half_cast_distinct() -> float:
    """Distinct values an fp16 cast leaves among 20,001 points of [-448, 448]; FP8 E4M3 has only 253 finite ones."""
    return float(torch.linspace(-448, 448, 20001).half().unique().numel())


def _detach_gradient() -> float:
    """|dL/dW| through detach(round(W/s) s), the form one article gives for QAT: detach stops every gradient."""
    w = torch.linspace(-1, 1, 11, requires_grad=True)
    w_tilde = (torch.round(w / 0.25) * 0.25).detach()
    return 0.0 if not w_tilde.requires_grad else float(torch.autograd.grad(w_tilde.sum(), w)[0].abs().sum())


def _ste_gradient() -> float:
    """Mean dL/dW through qlab's straight-through fake quantization (int4 per tensor, every value inside the grid)."""
    from qlab.core.quant import fake_quant_ste

    w = torch.linspace(-0.9, 0.9, 11, requires_grad=True)
    fake_quant_ste(torch.cat([w, torch.ones(1)]), "int4-tensor-sym-absmax")[:-1].sum().backward()  # scale 1/7
    return float(w.grad.mean())


def _hadamard_orthogonality() -> float:
    from qlab.core.rotations import hadamard

    H = hadamard(256)
    return float((H @ H.T / 256 - torch.eye(256, dtype=H.dtype)).abs().max())


def _hadamard_spike_peak() -> float:
    """Peak / RMS of a single spike after the normalized Hadamard transform (before: sqrt(256) = 16; after: 1)."""
    from qlab.core.rotations import hadamard

    x = torch.zeros(256, dtype=torch.float64)
    x[17] = 5.0
    y = hadamard(256) @ x / 16
    return float(y.abs().max() / y.pow(2).mean().sqrt())


def _gemv(bits: float, group_size=None, zero_point=False) -> dict:
    from qlab.study.roofline import matmul_cost

    return matmul_cost(1, 4096, 4096, bits, group_size, zero_point)


def _fits(model: str, weights, gpu_gib: float, context: int = 4096) -> float:
    return float(memory.fits(memory.deployment_bytes(model, weights, context=context, activations="none"), gpu_gib))


def _kv_reduction(kv: str, model: str = "Llama-2-7B", context: int = 4096) -> float:
    arch = memory.as_arch(model)
    return memory.kv_format("fp16").nbytes(arch, context) / memory.kv_format(kv).nbytes(arch, context)


def _mix_bpw(mix: str) -> float:
    recipe = memory.gguf_mix_recipe("Llama-2-7B", mix)
    return 8 * memory.weights_gb("Llama-2-7B", recipe, unit=1) / memory.LLAMA2["7B"].count_params()


def _q6k_share_attn_v() -> float:
    """Fraction of Llama-2-7B's attn_v matrices that Q4_K_M stores as Q6_K (llama.cpp's "more bits" layers)."""
    recipe = memory.gguf_mix_recipe("Llama-2-7B", "Q4_K_M")
    v = [f for n, f in recipe.items() if n.endswith("v_proj")]
    return v.count("Q6_K") / len(v)


def _m4max_bound() -> float:
    """Batch-1 decode bound of Llama-3-8B in Q4_K_M at 546 GB/s (Apple's M4 Max memory bandwidth), 4k context."""
    arch = memory.as_arch("Llama-3-8B")
    b = memory.deployment_bytes(arch, memory.gguf_mix_recipe(arch, "Q4_K_M"), context=4096, activations="none")
    return 546e9 / b["total"]


def _measured(label: str, column: str = "ppl") -> float:
    table = memory.MEASURED_PTQ.set_index("label")
    return float(table.loc[label, column])


def _ppl_increase_pct(label: str) -> float:
    return 100 * (_measured(label) / memory.FLOAT_PPL - 1)


CHECKS = {
    # hand arithmetic (article 003's eight weights, through qlab.core.quant)
    "hand_int8_max_error": lambda: _hand_max_error("int8-tensor-sym-absmax-sfp32"),
    "hand_int4_max_error": lambda: _hand_max_error("int4-tensor-asym-minmax-sfp32"),
    "hand_group_max_error": lambda: _hand_max_error("int4-g4-asym-minmax-sfp32"),
    "hand_int4_over_int8_error": lambda: _hand_max_error("int4-tensor-asym-minmax-sfp32")
    / _hand_max_error("int8-tensor-sym-absmax-sfp32"),
    "hand_float64_over_int8_bytes": lambda: HAND.double().numpy().nbytes / HAND.to(torch.int8).numpy().nbytes,
    "hand_fp32_over_int8_bytes": lambda: HAND.numpy().nbytes / HAND.to(torch.int8).numpy().nbytes,
    "outlier_example_zeroed": lambda: float((torch.round(torch.tensor([0.10, 0.18, 0.20]) / (127.4 / 127)) == 0).sum()),
    # floating point
    "eps_fp32": lambda: _fmt("fp32")["eps"],
    "eps_fp16": lambda: _fmt("fp16")["eps"],
    "eps_bf16": lambda: _fmt("bf16")["eps"],
    "eps_fp16_over_fp32": lambda: _fmt("fp16")["eps"] / _fmt("fp32")["eps"],
    "fp32_gap_at_million": lambda: _spacing(1e6),
    "fp32_gap_at_milli": lambda: _spacing(1e-3),
    "fp16_max": lambda: _fmt("fp16")["max"],
    "bf16_max": lambda: _fmt("bf16")["max"],
    "fp8_e4m3_max": lambda: _fmt("fp8_e4m3")["max"],
    "fp8_e5m2_max": lambda: _fmt("fp8_e5m2")["max"],
    "fp8_e4m3_mantissa_bits": lambda: float(_fmt("fp8_e4m3")["mantissa_bits"]),
    "fp8_e5m2_mantissa_bits": lambda: float(_fmt("fp8_e5m2")["mantissa_bits"]),
    "fp8_e4m3_nan_codes": _fp8_nan_codes,
    "half_cast_distinct": _half_cast_distinct,
    "nf4_gap_below_1": lambda: _fmt("nf4")["gap_below_1"],
    "digits_fp16": lambda: _fmt("fp16")["decimal_digits"],
    "fp16_rounding_error": lambda: abs(1.23456789 - float(torch.tensor(1.23456789, dtype=torch.float64).half())),
    "hand_int4_grid_low": lambda: _hand_grid_end("low"),
    "hand_int4_grid_high": lambda: _hand_grid_end("high"),
    # theory
    "sqnr_sine_4bit": lambda: _sqnr("sine"),
    "sqnr_uniform_4bit": lambda: _sqnr("uniform"),
    "sqnr_gaussian_absmax_4bit": lambda: _gaussian_sqnr(),
    "rd_one_bit_factor": lambda: float(_rd(1.0) / _rd(2.0)),
    "rd_half_bit_factor": lambda: float(_rd(1.0) / _rd(1.5)),
    "e8_error_reduction_pct": _e8_error_reduction_pct,
    "hadamard_orthogonality": _hadamard_orthogonality,
    "hadamard_spike_peak_over_rms": _hadamard_spike_peak,
    "ternary_bits": lambda: math.log2(3),
    "ternary_vs_fp16": lambda: 16 / math.log2(3),
    "bits_4_to_2_factor": lambda: 4 / 2,
    "bits_16_to_15_factor": lambda: 16 / 15,
    "ste_detach_gradient": _detach_gradient,
    "ste_gradient": _ste_gradient,
    # roofline (a 4096 x 4096 GEMV at batch 1, fp16 activations)
    "gemv_int4_g128_speedup_bound": lambda: _gemv(16)["bytes"] / _gemv(4, 128, True)["bytes"],
    "gemv_fp16_intensity": lambda: _gemv(16)["intensity"],
    "a100_ridge": lambda: _device("A100-SXM-80GB").ridge,
    "m4max_llama3_8b_q4km_bound": _m4max_bound,
    # formats and mixes
    "q8_0_bpw": lambda: _gguf_bpw("Q8_0"),
    "q2_k_bpw": lambda: _gguf_bpw("Q2_K"),
    "q4_k_bpw": lambda: _gguf_bpw("Q4_K"),
    "q4_k_m_bpw": lambda: _mix_bpw("Q4_K_M"),
    "q5_k_m_bpw": lambda: _mix_bpw("Q5_K_M"),
    "q5km_over_q4km": lambda: _mix_bpw("Q5_K_M") / _mix_bpw("Q4_K_M"),
    "q4km_q6k_share_attn_v": _q6k_share_attn_v,
    "awq_over_gptq_bytes": lambda: memory.weights_gb("Llama-2-7B", "awq:int4-g128-asym-minmax")
    / memory.weights_gb("Llama-2-7B", "gptq:int4-g128-asym-minmax"),
    "int4_g128_over_fp16_7b": lambda: memory.weights_gb("Llama-2-7B")
    / memory.weights_gb("Llama-2-7B", "int4-g128-asym-minmax"),
    "quip_70b_over_fp16": lambda: memory.weights_gb("Llama-2-70B") / memory.weights_gb("Llama-2-70B", 2.0),
    "mixtral_int4_gb": lambda: 46.7e9 * 0.5 / 1e9,
    "nominal_70b_3bit_gb": lambda: 70e9 * 3 / 8 / 1e9,
    "nominal_70b_2bit_gb": lambda: 70e9 * 2 / 8 / 1e9,
    "nominal_70b_1bit_gb": lambda: 70e9 / 8 / 1e9,
    "nominal_175b_int4_gb": lambda: 175e9 / 2 / 1e9,
    "training_13b_gb": lambda: 16 * 13e9 / 1e9,
    "nominal_7b_int4_gb": lambda: float(memory.weights_table().loc["7B", "int4"]),
    "nominal_7b_fp32_gb": lambda: float(memory.weights_table().loc["7B", "fp32"]),
    "gemv_fp8_over_fp16_bytes": lambda: _gemv(16)["bytes"] / _gemv(8)["bytes"],
    "kv_equals_weights_tokens_7b": lambda: memory.weights_gb("Llama-2-7B", unit=1)
    / memory.kv_cache_bytes(memory.LLAMA2["7B"], 1),
    # does it fit? (1 = yes; fp16 KV cache at 4096 tokens unless stated)
    "fits_70b_int4_24gib": lambda: _fits("Llama-2-70B", "int4-g128-asym-minmax", 24),
    "fits_70b_int4_80gib": lambda: _fits("Llama-2-70B", "int4-g128-asym-minmax", 80),
    "fits_70b_fp16_80gib": lambda: _fits("Llama-2-70B", None, 80),
    "fits_70b_fp16_160gib": lambda: _fits("Llama-2-70B", None, 160),
    "gpus_80gib_for_70b_fp32": lambda: float(math.ceil(memory.weights_gb("Llama-2-70B", dtype="fp32", unit=memory.GiB)
                                                        / 80)),
    "fits_65b_nf4_24gib": lambda: _fits("LLaMA-1-65B", "nf4-b64-dq", 24, context=0),
    "fits_33b_int4_24gib": lambda: _fits("LLaMA-1-33B", "int4-g128-asym-minmax", 24, context=2048),
    "fits_7b_int4_10gib": lambda: _fits("Llama-2-7B", "int4-g128-asym-minmax", 10),
    "fits_13b_int4_24gib": lambda: _fits("Llama-2-13B", "int4-g128-asym-minmax", 24),
    "fits_70b_q4km_96gib": lambda: _fits("Llama-2-70B", memory.gguf_mix_recipe("Llama-2-70B", "Q4_K_M"), 96),
    # KV cache formats (Llama-2-7B, 4096 tokens, batch 1)
    "kv_fp8_reduction": lambda: _kv_reduction("fp8"),
    "kv_kivi2_reduction": lambda: _kv_reduction("kivi2"),
    "kv_kivi4_reduction": lambda: _kv_reduction("kivi4"),
    "kv_gear2_reduction": lambda: _kv_reduction("gear2"),
    "kv_gear4_reduction": lambda: _kv_reduction("gear4"),
    "kv_over_weights_7b_4k": lambda: memory.kv_cache_bytes(memory.LLAMA2["7B"], 4096)
    / (memory.weights_gb("Llama-2-7B", unit=1)),
    # measured on the embedded model (memory.MEASURED_PTQ, from the README's full-mode tables)
    "ppl_increase_gptq4": lambda: _ppl_increase_pct("GPTQ int4 g128"),
    "ppl_increase_awq4": lambda: _ppl_increase_pct("AWQ int4 g128"),
    "ppl_increase_rtn4": lambda: _ppl_increase_pct("RTN int4 g128"),
    "ppl_increase_w8a8_sq": lambda: _ppl_increase_pct("W8A8 SmoothQuant (a=0.5)"),
    "ppl_increase_w8a8": lambda: _ppl_increase_pct("W8A8 naive"),
    "ppl_ratio_quip2": lambda: _measured("QuIP# E8P 2-bit") / memory.FLOAT_PPL,
    "ppl_ratio_rtn2": lambda: _measured("RTN int2 g128") / memory.FLOAT_PPL,
    "kl_awq_over_gptq4": lambda: _measured("AWQ int4 g128", "kl") / _measured("GPTQ int4 g128", "kl"),
    "ppl_nf4_over_rtn4": lambda: _measured("NF4 b64 (bitsandbytes)") / _measured("RTN int4 g128"),
}


def _sqnr(source: str) -> float:
    from qlab.study.theory import sqnr_full_scale_db

    return sqnr_full_scale_db(4, source)


def _gaussian_sqnr() -> float:
    from qlab.study.theory import measured_sqnr, signal

    return measured_sqnr(signal("gaussian", 100_000, seed=0), 4)["absmax"]


def _rd(rate: float) -> float:
    from qlab.study.theory import gaussian_rd

    return float(gaussian_rd(rate))


def _device(name: str):
    from qlab.study.roofline import DEVICES

    return DEVICES[name]


def _gguf_bpw(name: str) -> float:
    from qlab.gguf.blocks import get_format

    return get_format(name).bits_per_weight


def check(name: str) -> float:
    """Run one live check by name (a key of :data:`CHECKS`, or ``figure:<id>`` of memory.SEED_FIGURES)."""
    if name.startswith("figure:"):
        key = name.removeprefix("figure:")
        if key not in memory.SEED_FIGURES:
            raise ValueError(f"no memory figure {key!r}; known: {', '.join(memory.SEED_FIGURES)}")
        return float(memory.SEED_FIGURES[key][4]())
    if name not in CHECKS:
        raise ValueError(f"no live check {name!r}; known: {', '.join(CHECKS)}")
    return float(CHECKS[name]())


def agrees(found: float, recorded: float, tol: float) -> bool:
    """|found - recorded| <= tol x |recorded| (absolute tol when recorded is 0)."""
    return abs(found - recorded) <= tol * (abs(recorded) if recorded else 1.0)


def run_live(rows: list[dict] | None = None, progress: bool = True) -> pd.DataFrame:
    """Every row with a live check: id, check, the recorded value, the value found now, tol and whether they agree."""
    from tqdm.auto import tqdm

    rows = load() if rows is None else rows
    out = []
    for r in tqdm([r for r in rows if "live" in r], desc="live checks", disable=not progress):
        found = check(r["live"])
        out.append(dict(id=r["id"], live=r["live"], recorded=r["value"], found=found, tol=r["tol"],
                        agrees=agrees(found, r["value"], r["tol"])))
    return pd.DataFrame(out).set_index("id")


def copied_runs(text: str, sources: list[str], n: int = 8) -> set:
    """The n-word runs of ``text`` that also occur in any of ``sources`` (words: lower-case letters and digits)."""
    def grams(s):
        words = re.findall(r"[a-z0-9]+", s.lower())
        return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}

    theirs = set().union(*(grams(s) for s in sources)) if sources else set()
    return grams(text) & theirs


# ---------------------------------------------------------------- figures

VERDICT_COLORS = {"holds": "#1b9e77", "wrong": "#d95f02", "depends": "#7570b3", "untestable": "#999999"}
SEED_NAMES = {"000": "000 (hierarchy-to-deployment essay)", "001": "001 (QuIP#, GEAR, theory)",
              "002": "002 (int8 to BitNet overview)", "003": "003 (hand math, memory tables)",
              "004": "004 (encyclopedia entry)"}


def plot_verdicts(rows: list[dict] | None = None, by: str = "seed", ax=None):
    """Horizontal stacked bars: how many claims of each article (``by='seed'``) or topic (``by='topic'``) hold,
    are wrong, depend on something, or cannot be tested here; each segment labelled with its count."""
    import matplotlib.pyplot as plt

    df = pd.DataFrame(load() if rows is None else rows)
    table = pd.crosstab(df[by].astype(str), df["verdict"]).reindex(columns=list(VERDICTS), fill_value=0)
    if by == "seed":
        table.index = [SEED_NAMES.get(i, i) for i in table.index]
    table = table.iloc[::-1]  # first article on top
    if ax is None:
        fig, ax = plt.subplots(figsize=(8.5, 0.55 * len(table) + 1.4))
    left = pd.Series(0, index=table.index)
    for verdict in VERDICTS:
        counts = table[verdict]
        bars = ax.barh(table.index, counts, left=left, color=VERDICT_COLORS[verdict], label=verdict,
                       edgecolor="white")
        for bar, n in zip(bars, counts):
            if n:
                ax.text(bar.get_x() + bar.get_width() / 2, bar.get_y() + bar.get_height() / 2, str(n),
                        ha="center", va="center", color="white", fontsize=9 if n > 1 else 7, fontweight="bold")
        left += counts
    ax.set_xlabel("claims checked")
    ax.set_title(f"Verdicts per {'article' if by == 'seed' else by} ({len(df)} claims)")
    ax.legend(ncols=4, loc="upper center", bbox_to_anchor=(0.5, -0.18 if by == "seed" else -0.12), frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    ax.figure.tight_layout()
    return ax.figure
