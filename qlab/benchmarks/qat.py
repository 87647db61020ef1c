"""Benchmark: quantization-aware training (QAT) of the embedded model against RTN (issue 13).

    python -m qlab.benchmarks.qat                          # int4, the float control, int3 (see --configs)
    python -m qlab.benchmarks.qat --configs int4,float --steps 40 --out results/qat --runs runs/qat

What is trained. A copy of the model (the *student*) whose block Linears (``model.layers.*``) are
:class:`qlab.methods.train.QATLinear` with the same spec as the RTN row it is compared with
(``int4-g128-asym-minmax``: the scale and zero point follow the current weight each step, the weight learns
through the straight-through estimator). The token embedding (tied to the head) stays frozen and float; every
other parameter of the blocks and the final norm trains. The *teacher* is the float model itself.

The loss is knowledge distillation, the KL divergence from the teacher's next-token distribution P to the
student's Q, averaged over positions:

    L = (1 / T) sum_t sum_v P_t(v) (log P_t(v) - log Q_t(v))

on windows of the *calibration* articles (``qlab.models.data.split_documents``: 8 of WikiText-2 test's 62
articles, seed 0), which are disjoint from the articles the 16 evaluation windows come from
(:func:`check_split` asserts it). Distillation asks the student to recover the float model's predictions, not
to learn Wikipedia. The control is the float model trained the same way (same loss, data, steps, schedule):
its loss starts at exactly 0, so whatever it does is what training alone does to the metrics.

Evaluation: notebook 08's protocol (``qlab.eval.sweep.EvalProtocol(n_windows=16)``: 16 windows of 512
tokens spread over the evaluation articles) with ``qlab.eval.evaluate`` against the float model: perplexity,
KL, top-1. The trained layers are converted to real quantized layers first (``convert``: the same outputs bit
for bit). The fraction of RTN's KL gap that QAT recovers is

    recovered = (KL_RTN - KL_QAT) / KL_RTN                      (1: the float model's predictions, 0: RTN's)

Weight oscillation (Nagel et al. 2022, "Overcoming oscillations in QAT"): for one tracked layer the integer
codes are read before every step; ``flips`` counts codes that changed since the previous step, ``flip_backs``
those that returned to the code they had two steps ago (a weight bouncing across a rounding boundary).

Every run writes, beside its checkpoint (``<runs>/<name>/``, every ``--every`` steps, atomically; run the same
command again after a kill and it continues), ``steps.json``: loss, learning rate, flips per step. Each finished
configuration is one JSON row in ``<out>/<name>.json`` (written atomically; a rerun skips it).
The peak resident memory (``resource.getrusage(...).ru_maxrss``) of the process is in every row.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from qlab.core.atomic import atomic_path, write_json
from qlab.eval import evaluate, reference_logprobs
from qlab.eval.sweep import EvalProtocol
from qlab.methods.train import QATLinear, convert, lr_factor, prepare, train
from qlab.methods.train.qat import ACT_INT8_TOKEN
from qlab.models import REPO_ROOT
from qlab.models.data import load_wikitext2, split_documents, wikitext2_windows
from qlab.models.modules import QuantLinear

BLOCKS = "model.layers.*"
PROTOCOL = EvalProtocol(part="evaluation", seq_len=512, n_windows=16, pick="spread")  # notebook 08's


@dataclass(frozen=True)
class QATRun:
    """One QAT configuration. ``spec=None`` is the float control (same training, no quantizer)."""

    name: str
    spec: str | None
    act_spec: str | None = None
    learned_scale: bool = False
    steps: int = 40
    seq_len: int = 128
    batch: int = 2
    lr: float = 5e-5
    warmup: int = 4

    def recipe(self) -> dict:
        if self.spec is None:
            return {}
        return {BLOCKS: {"spec": self.spec, "act_spec": self.act_spec, "learned_scale": self.learned_scale}}


# the configurations of the issue, in the order of the compute budget's priorities
RUNS = {
    "int4": QATRun("int4", "int4-g128-asym-minmax"),
    "float": QATRun("float", None),
    "int3": QATRun("int3", "int3-g128-asym-minmax"),
    "w4a8": QATRun("w4a8", "int4-g128-asym-minmax", act_spec=ACT_INT8_TOKEN),
    "int2": QATRun("int2", "int2-g128-asym-minmax"),
    # the side-by-side with torchao, whose groups must divide the row (576 = 4.5 x 128): groups of 64, fp32 scales
    "int4-g64": QATRun("int4-g64", "int4-g64-asym-minmax-sfp32"),
    "torchao-int4-g64": QATRun("torchao-int4-g64", "int4-g64-asym-minmax-sfp32"),
}
PTQ_ONLY = {"ternary-ptq": QATRun("ternary-ptq", "ternary", steps=0)}  # no training: BitNet's grid after the fact
PEER_PREFIX = "torchao-"  # runs trained by qlab/benchmarks/peer_qat.py in torchao's venv
PEER_SCRIPT = Path(__file__).with_name("peer_qat.py")
DEFAULT_PEER = Path(os.environ.get("QLAB_TORCHAO_PEER", REPO_ROOT.parent / "peers" / "torchao"))


# ---- data ------------------------------------------------------------------------------------------------
def check_split(protocol: EvalProtocol = PROTOCOL) -> str:
    """The calibration articles (training data) and the evaluation articles are disjoint: asserted, then
    described in one sentence."""
    split = split_documents(load_wikitext2(), protocol.n_calibration, protocol.seed)
    common = set(split.calibration_docs) & set(split.evaluation_docs)
    if common:
        raise AssertionError(f"articles {sorted(common)} are both trained on and evaluated")
    return (f"{split.describe()}; training windows come from the calibration articles "
            f"{list(split.calibration_docs)}, the evaluation windows from the others (no article in both)")


def training_windows(tokenizer, run: QATRun, protocol: EvalProtocol = PROTOCOL) -> torch.Tensor:
    """Every non-overlapping window of ``run.seq_len`` tokens of the calibration articles."""
    return wikitext2_windows(tokenizer, "calibration", run.seq_len, None, "first", protocol.n_calibration,
                             protocol.seed)


def batch_at(windows: torch.Tensor, step: int, batch: int) -> torch.Tensor:
    """The batch of ``step``: windows taken in order, wrapping around (a pure function of the step, so a
    resumed run sees the data an uninterrupted one would)."""
    idx = [(step * batch + i) % len(windows) for i in range(batch)]
    return windows[idx]


# ---- the loss --------------------------------------------------------------------------------------------
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(P_teacher || Q_student) (see the module docstring), in nats.

    >>> z = torch.tensor([[[0.0, 1.0]]])
    >>> float(kd_loss(z, z))
    0.0
    """
    log_q = F.log_softmax(student_logits.float(), dim=-1).flatten(0, -2)
    log_p = F.log_softmax(teacher_logits.float(), dim=-1).flatten(0, -2)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def recovered(kl_rtn: float, kl_qat: float) -> float:
    """The fraction of RTN's KL gap that QAT closes: (KL_RTN - KL_QAT) / KL_RTN.

    >>> recovered(0.20, 0.05)   # (0.20 - 0.05) / 0.20
    0.7500000000000001
    """
    if not kl_rtn > 0:
        raise ValueError(f"RTN's KL must be > 0 to measure a recovery, got {kl_rtn}")
    return (kl_rtn - kl_qat) / kl_rtn


def recovered_ppl(row: dict) -> float:
    """The fraction of RTN's perplexity gap to the float model that QAT closes (torchao's measure):
    (ppl_RTN - ppl_QAT) / (ppl_RTN - ppl_float), from a row of :func:`run_one`.

    >>> recovered_ppl({"ppl": 25.0, "ppl_ref": 20.0, "rtn": {"ppl": 30.0}})
    0.5
    """
    gap = row["rtn"]["ppl"] - row["ppl_ref"]
    if not gap > 0:
        raise ValueError(f"RTN's perplexity must be above the float model's to measure a recovery, got "
                         f"{row['rtn']['ppl']} vs {row['ppl_ref']}")
    return (row["rtn"]["ppl"] - row["ppl"]) / gap


# ---- oscillations ----------------------------------------------------------------------------------------
class CodeFlips:
    """Counts a layer's integer codes that change from one step to the next (flips) and those that go back
    to the code of two steps before (flip_backs: oscillation across a rounding boundary)."""

    def __init__(self):
        self.prev = self.prev2 = None

    def update(self, codes: torch.Tensor) -> tuple[int | None, int | None]:
        flips = backs = None
        if self.prev is not None:
            changed = codes != self.prev
            flips = int(changed.sum())
            if self.prev2 is not None:
                backs = int((changed & (codes == self.prev2)).sum())
        self.prev2, self.prev = self.prev, codes
        return flips, backs


def tracked_layer(student) -> str | None:
    """The layer whose code flips are counted: the middle QATLinear named ``*.mlp.down_proj`` (of the
    embedded model, ``model.layers.15.mlp.down_proj``), or None when nothing is quantized."""
    names = [n for n, m in student.named_modules() if isinstance(m, QATLinear) and n.endswith("mlp.down_proj")]
    return names[len(names) // 2] if names else None


def layer_codes(layer) -> torch.Tensor | None:
    """The integer codes a QATLinear's weight has now (None for a float layer)."""
    if not isinstance(layer, QATLinear):
        return None
    return layer.quantized_weight().codes()


# ---- one run ---------------------------------------------------------------------------------------------
def make_student(teacher: torch.nn.Module, run: QATRun, frozen=("embed_tokens", "lm_head")) -> torch.nn.Module:
    """A copy of the teacher with QATLinears per ``run.recipe()`` (none for the control); the parameters
    whose name holds one of ``frozen`` do not train."""
    student = copy.deepcopy(teacher)
    if run.recipe():
        prepare(student, run.recipe())
    for name, p in student.named_parameters():
        p.requires_grad_(not any(f in name for f in frozen))
    return student


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, GB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def train_qat(teacher, student, windows: torch.Tensor, run: QATRun, folder=None, every: int = 10,
              progress: bool = True):
    """Distil ``teacher`` into ``student`` (module docstring) with ``qlab.methods.train.train``; returns
    (TrainLog, per-step records). With ``folder``, checkpoints and ``steps.json`` go there and a rerun
    resumes."""
    teacher.eval()
    tracked = tracked_layer(student)
    layer = None if tracked is None else student.get_submodule(tracked)
    flips = CodeFlips()
    steps_path = None if folder is None else Path(folder) / "steps.json"
    records = {}
    if steps_path is not None and steps_path.exists():
        records = {int(k): v for k, v in json.loads(steps_path.read_text()).items()}

    def loss_at(model, step):
        codes = layer_codes(layer)
        f, b = flips.update(codes) if codes is not None else (None, None)
        x = batch_at(windows, step, run.batch)
        with torch.no_grad():
            target = teacher(input_ids=x, use_cache=False).logits
        loss = kd_loss(model(input_ids=x, use_cache=False).logits, target)
        records[step] = {"loss": float(loss.detach()), "lr": run.lr * lr_factor(step, run.steps, run.warmup, True),
                         "flips": f, "flip_backs": b}
        if steps_path is not None:
            write_json(steps_path, {k: records[k] for k in sorted(records)})
        return loss

    config = {k: v for k, v in asdict(run).items() if k not in ("steps", "lr", "warmup")}
    config.update(tracked=tracked, windows=list(windows.shape), first_window=windows[0, :8].tolist())
    log = train(student, loss_at, config, run.steps, run.lr, folder=folder, every=every, warmup=run.warmup,
                cosine=True, progress=progress)
    records = {k: v for k, v in records.items() if k < log.steps}
    return log, [records[k] for k in sorted(records)]


def rtn_row(teacher, run: QATRun, reference, progress: bool = True) -> dict:
    """Metrics of the post-training counterpart of ``run``: its student before any step, converted to real
    quantized layers, which is round to nearest with the same spec (W4A8: plus the same int8 per-token
    activations)."""
    model = convert(make_student(teacher, run), QuantLinear)
    out = evaluate(model, reference.windows, reference, progress=progress)
    bits = [(m.qweight.bits_per_weight, m.qweight.numel) for m in model.modules() if isinstance(m, QuantLinear)]
    bpw = sum(b * n for b, n in bits) / sum(n for _, n in bits)
    return {**{k: out[k] for k in ("ppl", "kl_mean", "kl_median", "top1", "delta_ppl_pct")}, "quantized_bpw": bpw}


def run_one(teacher, train_windows, reference, run: QATRun, runs_dir=None, progress: bool = True,
            every: int = 10) -> dict:
    """Train one configuration, convert it to real quantized layers, evaluate it and its RTN counterpart."""
    t0, c0 = time.perf_counter(), time.process_time()
    student = make_student(teacher, run)
    folder = None if runs_dir is None else Path(runs_dir) / run.name
    log, records = train_qat(teacher, student, train_windows, run, folder, every=every, progress=progress)
    train_seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    ran = log.steps - log.resumed_from  # steps trained by this process (0: a finished run, resumed to evaluate)
    convert(student, QuantLinear)
    out = evaluate(student, reference.windows, reference, progress=progress)
    row = {"name": run.name, "run": asdict(run), "steps_done": log.steps, "resumed_from": log.resumed_from,
           **{k: out[k] for k in ("ppl", "ppl_ref", "delta_ppl_pct", "kl_mean", "kl_median", "top1")},
           "losses": log.losses, "flips": [r["flips"] for r in records],
           "flip_backs": [r["flip_backs"] for r in records],
           "train_seconds": train_seconds, "s_per_step": train_seconds / ran if ran else None,  # None: all resumed
           "cpu_s_per_step": cpu_seconds / ran if ran else None,  # CPU time: the fairer measure on a shared machine
           "tokens_seen": run.steps * run.batch * run.seq_len, "peak_rss_gb": peak_rss_gb(),
           "threads": torch.get_num_threads()}
    if run.spec is not None:
        rtn = rtn_row(teacher, run, reference, progress)
        row.update(rtn=rtn, recovered_kl=recovered(rtn["kl_mean"], out["kl_mean"]))
    return row


def peer_python(peer=DEFAULT_PEER) -> Path:
    """The torchao venv's python, or a ValueError saying how to build it."""
    python = Path(peer) / "bin" / "python"
    if not python.exists():
        raise ValueError(f"no torchao peer venv at {peer} (set QLAB_TORCHAO_PEER or run `make qat-peer`)")
    return python


def torchao_row(teacher, train_windows, reference, run: QATRun, runs_dir, model_folder, peer=DEFAULT_PEER,
                threads: int = 1) -> dict:
    """Train ``run`` with torchao's QAT in its venv (``peer_qat.py``, the same data, steps, schedule and loss),
    then evaluate the weights it hands back, and those of its untrained model (torchao's round to nearest), with
    qlab's evaluation. ``rtn_values_differing`` counts the weights where torchao's untrained, converted model
    differs from qlab's ``fake_quant(W, run.spec)`` (``same_rtn_as_qlab``: none). On the embedded model 8,518 of
    106M differ, each by one grid step, at weights half-way between two levels (a rounding tie)."""
    import subprocess

    from safetensors.torch import load_file

    from qlab.benchmarks.peers import load_peer_weights
    from qlab.core.quant import fake_quant

    folder = Path(runs_dir) / run.name
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(train_windows, folder / "train.pt")
    group = int(run.spec.split("-g")[1].split("-")[0])
    cmd = [str(peer_python(peer)), str(PEER_SCRIPT), "--model", str(model_folder), "--train", str(folder / "train.pt"),
           "--steps", str(run.steps), "--batch", str(run.batch), "--lr", str(run.lr), "--warmup", str(run.warmup),
           "--group-size", str(group), "--threads", str(threads), "--out", str(folder)]
    with open(folder / "peer.log", "a") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": ""})
    if proc.returncode != 0:
        raise RuntimeError(f"torchao's QAT failed ({proc.returncode}); see {folder / 'peer.log'}")
    result = json.loads((folder / "result.json").read_text())
    rtn_weights = load_file(folder / "weights_rtn.safetensors")
    differ = total = 0  # torchao's de-quantized weights vs qlab's round to nearest, value by value
    for n, w in rtn_weights.items():
        ours = fake_quant(teacher.get_submodule(n).weight.detach(), run.spec)
        differ, total = differ + int((ours != w).sum()), total + w.numel()
    metrics = {}
    for which, path in (("rtn", "weights_rtn.safetensors"), ("qat", "weights.safetensors")):
        model = load_peer_weights(teacher, load_file(folder / path))
        out = evaluate(model, reference.windows, reference)
        metrics[which] = {k: out[k] for k in ("ppl", "ppl_ref", "delta_ppl_pct", "kl_mean", "kl_median", "top1")}
        del model
    return {"name": run.name, "run": asdict(run), "steps_done": len(result["losses"]),
            "resumed_from": result["resumed_from"], **metrics["qat"], "rtn": metrics["rtn"],
            "recovered_kl": recovered(metrics["rtn"]["kl_mean"], metrics["qat"]["kl_mean"]),
            "losses": result["losses"], "flips": [], "flip_backs": [], "train_seconds": result["seconds"],
            "s_per_step": result["s_per_step"], "tokens_seen": run.steps * run.batch * run.seq_len,
            "cpu_s_per_step": result["cpu_seconds"] / max(1, len(result["losses"]) - result["resumed_from"]),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9,
            "threads": threads, "versions": result["versions"], "same_rtn_as_qlab": differ == 0,
            "rtn_values_differing": differ, "rtn_values": total}


def run_all(teacher, tokenizer, runs: list[QATRun], out_dir, runs_dir=None, protocol: EvalProtocol = PROTOCOL,
            progress: bool = True, every: int = 10) -> list[dict]:
    """Every run whose row is not yet in ``out_dir`` (one JSON each); returns all rows."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for r in runs:  # a stored row of other settings is never passed off as this run's
        path = out_dir / f"{r.name}.json"
        if path.exists():
            row = json.loads(path.read_text())
            if row["run"] != asdict(r) or row["protocol"] != protocol.describe():
                raise ValueError(f"{path} holds a run with other settings ({row['run']}, {row['protocol']}); "
                                 f"delete it or pass another --out")
    todo = [r for r in runs if not (out_dir / f"{r.name}.json").exists()]
    reference = None
    if todo:
        evals = wikitext2_windows(tokenizer, protocol.part, protocol.seq_len, protocol.n_windows, protocol.pick,
                                  protocol.n_calibration, protocol.seed)
        cached = None if runs_dir is None else Path(runs_dir) / f"reference-{protocol.n_windows}x{protocol.seq_len}.pt"
        if cached is not None and cached.exists():
            reference = torch.load(cached, weights_only=False)
        if reference is None or not torch.equal(reference.windows, evals):
            reference = reference_logprobs(teacher, evals, progress=progress)
            if cached is not None:
                with atomic_path(cached) as tmp:
                    torch.save(reference, tmp)
    for run in todo:
        windows = training_windows(tokenizer, run, protocol)
        if run.steps == 0:
            row = {"name": run.name, "run": asdict(run), "steps_done": 0,
                   **{k: v for k, v in rtn_row(teacher, run, reference, progress).items()}}
        elif run.name.startswith(PEER_PREFIX):
            from qlab.models import EMBEDDED, cache_dir

            try:
                peer_python()
            except ValueError as e:  # a user without the peer venv still gets qlab's rows
                warnings.warn(f"{run.name} skipped: {e}", stacklevel=2)
                continue
            row = torchao_row(teacher, windows, reference, run, runs_dir, cache_dir() / EMBEDDED,
                              threads=torch.get_num_threads())
        else:
            row = run_one(teacher, windows, reference, run, runs_dir, progress, every)
        row.update(protocol=protocol.describe(), split=check_split(protocol))
        write_json(out_dir / f"{run.name}.json", row)
    return [json.loads((out_dir / f"{r.name}.json").read_text()) for r in runs if (out_dir / f"{r.name}.json").exists()]


# ---- the calibrated PTQ methods at the same bits ------------------------------------------------------------
PTQ_METHODS = ("gptq", "awq")


def ptq_configs(runs: list[QATRun], calib_windows: int = 32) -> list[dict]:
    """``run_sweep`` configurations of GPTQ and AWQ with the spec of every weight-only qlab QAT run (so the same
    bits per weight), calibrated on ``calib_windows`` windows of 512 tokens of the calibration articles, the
    articles QAT trains on. W4A8 and the torchao, ternary and float runs get none."""
    out, seen = [], set()
    for r in runs:
        if r.spec is None or r.act_spec or r.steps == 0 or r.name.startswith(PEER_PREFIX) or r.spec in seen:
            continue
        seen.add(r.spec)
        out += [{"label": f"{m}:{r.spec}", "recipe": {BLOCKS: f"{m}:{r.spec}"}, "calib_windows": calib_windows}
                for m in PTQ_METHODS]
    return out


def ptq_rows(runs: list[QATRun], sweep_dir=None, protocol: EvalProtocol = PROTOCOL, calib_windows: int = 32,
             load=None) -> dict:
    """GPTQ and AWQ next to the QAT runs (``ptq_configs``), through ``qlab.eval.sweep.run_sweep`` on the same
    evaluation windows, with rows cached in ``sweep_dir`` (default: the notebooks' shared ``results/sweep``,
    where notebook 08 leaves its GPTQ and AWQ rows at int3 and int2 g128). Returns {spec: {method: {ppl,
    kl_mean, top1, quantized_bpw, quant_seconds}}}."""
    from qlab.eval.sweep import DEFAULT_RESULTS, config_key, run_sweep

    configs = ptq_configs(runs, calib_windows)
    if not configs:
        return {}
    kwargs = {} if load is None else {"load": load}
    df = run_sweep(configs, protocol, Path(sweep_dir or DEFAULT_RESULTS / "sweep"), **kwargs).set_index("key")
    out = {}
    for c in configs:  # rows are found by their key (a stored row of the same job may carry another label)
        method, spec = c["label"].split(":", 1)
        r = df.loc[config_key(c, protocol)]
        out.setdefault(spec, {})[method] = {k: float(r[k]) for k in
                                            ("ppl", "ppl_ref", "kl_mean", "top1", "quantized_bpw", "quant_seconds")}
    return out


def table(rows: list[dict], ptq: dict | None = None):
    """One line per configuration: ppl, KL, top-1 of QAT and RTN, the recovered fraction, and (``ptq`` from
    :func:`ptq_rows`) the KL of GPTQ and AWQ with the same spec."""
    import pandas as pd

    out = []
    for r in rows:
        rtn = r.get("rtn", {})
        line = {"config": r["name"], "steps": r["steps_done"], "ppl_qat": r["ppl"], "ppl_rtn": rtn.get("ppl"),
                "kl_qat": r["kl_mean"], "kl_rtn": rtn.get("kl_mean"), "top1_qat": r["top1"],
                "top1_rtn": rtn.get("top1"), "recovered_kl": r.get("recovered_kl"),
                "recovered_ppl": recovered_ppl(r) if rtn and rtn["ppl"] > r["ppl_ref"] else None}
        if ptq is not None:
            same = {} if r["name"].startswith(PEER_PREFIX) else ptq.get(r["run"]["spec"], {})
            line.update({f"kl_{m}": same.get(m, {}).get("kl_mean") for m in PTQ_METHODS})
        line.update(s_per_step=r.get("s_per_step"), cpu_s_per_step=r.get("cpu_s_per_step"),
                    peak_rss_gb=r.get("peak_rss_gb"))
        out.append(line)
    return pd.DataFrame(out)


# ---- figures (notebook 13) -------------------------------------------------------------------------------
def plot_losses(rows: list[dict], ax=None):
    """The distillation loss of every trained configuration, per step."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 4))
    for r in rows:
        if r.get("losses"):
            ax.plot(range(len(r["losses"])), r["losses"], marker=".", label=r["name"])
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("step")
    ax.set_ylabel("KL(teacher || student), nats per token")
    ax.set_title("distillation loss per step (training batches)")
    ax.legend(fontsize=8)
    return ax


def plot_flips(rows: list[dict], ax=None):
    """Codes of the tracked layer that changed (and that went back) at each step."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 4))
    for r in rows:
        steps = [i for i, f in enumerate(r.get("flips", [])) if f is not None]
        if steps:
            line, = ax.plot(steps, [r["flips"][i] for i in steps], marker="o", label=f"{r['name']}: flips")
            back = [i for i in steps if r["flip_backs"][i] is not None]
            ax.plot(back, [r["flip_backs"][i] for i in back], ls="--", marker="x", color=line.get_color(),
                    label=f"{r['name']}: back to the code of 2 steps before")
    ax.set_xlabel("step")
    ax.set_ylabel("weights of the tracked layer")
    ax.set_title("weight oscillation: codes that change per step")
    ax.legend(fontsize=8)
    return ax


def plot_vs_ptq(rows: list[dict], ptq: dict | None = None, ax=None):
    """Mean KL to the float model on the evaluation windows, per configuration: round to nearest, GPTQ and
    AWQ with the same spec (``ptq`` from :func:`ptq_rows`, where there is one) and QAT."""
    import matplotlib.pyplot as plt
    import numpy as np

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4.2))
    quantized = [r for r in rows if "rtn" in r]
    x = np.arange(len(quantized))
    ptq = ptq or {}
    bars = [("round to nearest (step 0)", lambda r: r["rtn"]["kl_mean"])]
    bars += [(m.upper(), lambda r, m=m: ptq.get(r["run"]["spec"], {}).get(m, {}).get("kl_mean", np.nan)
              if not r["name"].startswith(PEER_PREFIX) else np.nan) for m in PTQ_METHODS if ptq]
    bars += [("QAT (distilled)", lambda r: r["kl_mean"])]
    width = 0.8 / len(bars)
    for k, (label, get) in enumerate(bars):
        ax.bar(x - 0.4 + width * (k + 0.5), [get(r) for r in quantized], width, label=label)
    for i, r in enumerate(quantized):
        ax.annotate(f"{100 * r['recovered_kl']:.0f}%", (x[i] + 0.4 - width / 2, r["kl_mean"]), ha="center",
                    va="bottom", fontsize=8)
    control = [r for r in rows if r["name"] == "float"]
    if control:
        ax.axhline(control[0]["kl_mean"], color="grey", ls=":", label="float control after the same training")
    short = lambda spec: spec.split("-asym")[0].split("-sym")[0].replace("-", " ")  # noqa: E731  int4 g64
    ax.set_xticks(x, [f"{r['name']}\n{short(r['run']['spec'])}" + (" + int8 act." if r["run"].get("act_spec") else "")
                      for r in quantized], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("mean KL to the float model (log)")
    ax.set_title("QAT vs post-training methods at the same spec (label: share of RTN's KL recovered by QAT)",
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
    return ax


def smoke_rows(steps: int = 2, configs=("int4-g64", "float", "int3")) -> list[dict]:
    """The benchmark at toy size (notebook 13's smoke mode, seconds): a random 2-layer Llama as the teacher,
    random token windows, ``steps`` steps each; checks that everything runs, not the numbers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    teacher = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    train_windows, evals = torch.randint(0, 64, (8, 32), generator=g), torch.randint(0, 64, (2, 32), generator=g)
    reference = reference_logprobs(teacher, evals, progress=False)
    runs = [replace(RUNS[c], steps=steps, seq_len=32, batch=2, lr=1e-3, warmup=1) for c in configs]
    return [run_one(teacher, train_windows, reference, r, progress=False) for r in runs]


def main(argv=None):
    p = argparse.ArgumentParser(description="QAT of the embedded model vs RTN (issue 13)")
    p.add_argument("--configs", default="int4-g64,float,int3,torchao-int4-g64",
                   help=f"comma-separated, of {', '.join(RUNS)}, {', '.join(PTQ_ONLY)}")
    p.add_argument("--steps", type=int, default=QATRun.steps)
    p.add_argument("--seq-len", type=int, default=QATRun.seq_len)
    p.add_argument("--batch", type=int, default=QATRun.batch)
    p.add_argument("--lr", type=float, default=QATRun.lr)
    p.add_argument("--warmup", type=int, default=QATRun.warmup)
    p.add_argument("--eval-windows", type=int, default=PROTOCOL.n_windows,
                   help="windows of 512 tokens scored (notebook 08's protocol: 16)")
    p.add_argument("--every", type=int, default=10, help="checkpoint every N steps")
    p.add_argument("--calib", type=int, default=32,
                   help="calibration windows of 512 tokens for the GPTQ and AWQ rows at the same specs (0: none)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(REPO_ROOT / "results" / "qat"))
    p.add_argument("--runs", default=str(REPO_ROOT / "runs" / "qat"))
    args = p.parse_args(argv)
    known = {**RUNS, **PTQ_ONLY}
    unknown = [c for c in args.configs.split(",") if c not in known]
    if unknown:
        p.error(f"unknown configuration(s) {unknown}; choose from {', '.join(known)}")
    torch.set_num_threads(args.threads)
    from qlab.models import load_model

    teacher, tokenizer = load_model()
    runs = [PTQ_ONLY.get(c) or replace(RUNS[c], steps=args.steps, seq_len=args.seq_len, batch=args.batch, lr=args.lr,
                                       warmup=args.warmup) for c in args.configs.split(",")]
    protocol = replace(PROTOCOL, n_windows=args.eval_windows)
    print(check_split(protocol))
    rows = run_all(teacher, tokenizer, runs, args.out, args.runs, protocol, every=args.every)
    ptq = ptq_rows(runs, Path(args.out).parent / "sweep", protocol, args.calib) if args.calib else None
    print(table(rows, ptq).to_string(index=False))


if __name__ == "__main__":
    main()
