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
killing a sweep loses only the configuration it was working on. The notebooks share one folder,
``results/sweep`` (the default), so a configuration one of them computed is read, not recomputed, by the
others (05's RTN rows in 08 and 09; 08's GPTQ and AWQ rows in 13). A configuration without ``"model"`` is
the embedded model's, and has the same key as one that names it.

The results store checks itself. Before anything is computed, every configuration of the grid is checked
(its keys, mode, method, specs and options, and its recipe patterns against the loaded model) and every bad one
is named in one error, and the results folder must be writable. Each result file stores its ``key``, the full
``config_hash`` (SHA-256 of the configuration and protocol, whose first 12 hex digits are the key), the
``config`` itself and a ``checksum`` (SHA-256 of the row). A file that is empty, half-written, not JSON, misses
fields, holds another configuration's row or was edited since it was written is moved aside to
``<key>.json.bad-<time>`` with a :class:`ResultFileWarning` naming it, and its configuration is computed again.
Files written before these checks existed (no hash, no checksum) are used when their key and description
(model, method, recipe, mode, protocol) match the configuration, and gain the checks.

``run_sweep(..., backend="ray")`` runs each configuration as a Ray task instead (``address=`` joins a running
cluster, ``cpus_per_task`` / ``gpus_per_task`` reserve resources); each task writes its own row with the same
atomic writer, so a worker killed mid-run loses only its configuration, which the next run computes.

Columns of the table: label, model, method, recipe, mode, calib_windows, key, ppl, ppl_ref, delta_ppl_pct, kl_mean,
kl_median, kl_p99, top1, quantized_bpw, linear_bpw, size_mb, quant_seconds, eval_seconds,
s_per_window, aligned_q4_1 (True when a spec groups weights in 32s, i.e. exactly the embedded
checkpoint's Q4_1 blocks, see :mod:`qlab.study.gridalign`), protocol.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from qlab.core.atomic import write_json
from qlab.eval.metrics import AUTOCAST
from qlab.methods import METHODS
from qlab.models.walker import entry, quantize_model
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
    autocast: str | None = None  # "bf16": the evaluation's forward passes under bf16 autocast (qlab.eval.metrics)

    def __post_init__(self):
        if self.autocast not in AUTOCAST:
            raise ValueError(f"EvalProtocol(autocast=...) must be one of {list(AUTOCAST)}, got {self.autocast!r}")

    def describe(self) -> str:
        where = "whole test split" if self.part == "all" else (
            f"{self.part} articles of WikiText-2 test (seed {self.seed}, {self.n_calibration} articles held out for calibration)"
        )
        cast = f", {self.autocast} autocast" if self.autocast else ""
        return f"{self.n_windows} non-overlapping windows of {self.seq_len} tokens ({self.pick}), {where}, no BOS{cast}"


def _config_text(config: dict, protocol: EvalProtocol) -> str:
    """Canonical JSON of everything that changes the numbers (the configuration without its label, the protocol)."""
    payload = {k: v for k, v in config.items() if k != "label"}
    payload.setdefault("mode", "fake")
    payload.setdefault("model", EMBEDDED)  # so notebooks that name the default model share rows with those that don't
    payload["protocol"] = asdict(protocol)
    if protocol.autocast is None:  # float32: the keys of the results computed before autocast existed
        del payload["protocol"]["autocast"]
    revisions = _revisions(config)
    if revisions:  # (only methods past their first revision: the other keys stay those of the rows already cached)
        payload["revisions"] = revisions
    return json.dumps(payload, sort_keys=True, default=str)


def _revisions(config: dict) -> dict:
    """{method: revision} of the configuration's methods whose numbers have changed since their first version."""
    methods = {config["method"]} if "method" in config else set()
    for value in (config.get("recipe") or {}).values():
        try:
            e = entry(value)
        except ValueError:  # a bad entry: the grid check names it
            continue
        if e is not None:
            methods.add(e.method)
    return {m: METHODS[m].revision for m in sorted(methods) if m in METHODS and METHODS[m].revision > 1}


def config_hash(config: dict, protocol: EvalProtocol) -> str:
    """SHA-256 (64 hex digits) of everything that changes the numbers (not the label)."""
    return hashlib.sha256(_config_text(config, protocol).encode()).hexdigest()


def config_key(config: dict, protocol: EvalProtocol) -> str:
    """12-hex-digit hash of everything that changes the numbers (not the label): ``config_hash[:12]``."""
    return config_hash(config, protocol)[:12]


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
            self.refs[name] = reference_logprobs(model, windows, self.batch_size, progress=self.progress,
                                                 autocast=p.autocast)
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


def config_method(config: dict) -> str:
    """The method column of a configuration: its 'method', or the one method its recipe uses ('mixed' for
    several, 'float' for none)."""
    from qlab.models.walker import entry

    if "method" in config:
        return config["method"]
    methods = {e.method for e in map(entry, config.get("recipe", {}).values()) if e is not None}
    return methods.pop() if len(methods) == 1 else ("mixed" if methods else "float")


def _calib_windows(config: dict) -> int:
    """How many calibration windows a configuration uses (0 when no method in it calibrates)."""
    from qlab.models.walker import needs_calibration

    recipe, _ = config_recipe(config)
    return config.get("calib_windows", 32) if needs_calibration(recipe) else 0


def _quantize(config: dict, model, session):
    """(quantized model, SizeReport, the recipe it amounts to) for one configuration."""
    recipe, walker_options = config_recipe(config)
    n_calib = _calib_windows(config)
    calib = session.calibration(config.get("model", EMBEDDED), n_calib) if n_calib else None
    qmodel, size = quantize_model(model, recipe, calib, mode=config.get("mode", "fake"), **walker_options)
    return qmodel, size, recipe


def _recipe_text(recipe: dict) -> dict:
    """A recipe as stored in a result row: each entry as its string."""
    from qlab.models.walker import entry

    return {k: (None if v is None else str(entry(v))) for k, v in recipe.items()}


def run_one(config: dict, session: _Session) -> dict:
    from qlab.eval import evaluate

    name = config.get("model", EMBEDDED)
    model, _ = session.model(name)
    ref = session.reference(name)
    t0 = time.perf_counter()
    qmodel, size, recipe = _quantize(config, model, session)
    quant_seconds = time.perf_counter() - t0
    metrics = evaluate(qmodel, ref.windows, ref, session.batch_size, progress=session.progress,
                       autocast=session.protocol.autocast)
    del qmodel
    return {
        "label": config.get("label", ""),
        "model": name,
        "method": config_method(config),
        "recipe": _recipe_text(recipe),
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


# ---- checking the grid and the results folder before computing anything ----

CONFIG_KEYS = ("label", "model", "recipe", "mode", "method", "spec", "calib_windows", "options")


def _config_problem(config) -> str | None:
    """Why a configuration cannot run (without loading its model), or None."""
    if not isinstance(config, dict):
        return f"a configuration is a dict, got {type(config).__name__}"
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        return f"unknown key {unknown}; a configuration takes {', '.join(CONFIG_KEYS)}"
    if not isinstance(config.get("model", EMBEDDED), str):
        return f"'model' must be a model name (str), got {config['model']!r}"
    if config.get("mode", "fake") not in ("fake", "packed"):
        return f"mode must be 'fake' or 'packed', got {config['mode']!r}"
    if not isinstance(config.get("options", {}), dict):
        return f"'options' must be a dict of method options, got {config['options']!r}"
    n = config.get("calib_windows", 32)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return f"calib_windows must be an integer >= 1, got {n!r}"
    try:
        recipe, _ = config_recipe(config)
        if not isinstance(recipe, dict):
            return f"a recipe is a dict of name patterns -> entries, got {type(recipe).__name__}"
        _calib_windows(config)  # every entry parses: method, spec and options
    except (ValueError, KeyError, TypeError) as e:
        return str(e)
    return None


def _pattern_problem(config, model) -> str | None:
    """Why a configuration's recipe does not fit the loaded model (a pattern matching no layer), or None."""
    from qlab.models.walker import resolve

    try:
        resolve(model, config_recipe(config)[0])
    except (ValueError, KeyError, TypeError) as e:
        return str(e)
    return None


def _refuse(problems: dict, configs: list) -> None:
    if problems:
        lines = "".join(f"\n  #{i} {_label(configs[i])}: {p}" for i, p in sorted(problems.items()))
        raise ValueError(f"{len(problems)} of {len(configs)} configurations are invalid; nothing was computed "
                         f"(fix or drop them and run again):{lines}")


def _label(config) -> str:
    return repr(config.get("label", "")) if isinstance(config, dict) else "''"


def _check_writable(folder: Path) -> None:
    """The results folder exists (made if needed) and takes a new file, or a clear error before computing."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"results folder {folder} is not a folder (a file of that name exists): pass another "
                         f"results_dir")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"results folder {folder} is not writable ({e.strerror or e}), so finished configurations "
                         f"could not be kept; nothing was computed. Pass a results_dir you can write to, or fix the "
                         f"folder's permissions") from e


# ---- result files: written atomically, checked when read ----

class ResultFileWarning(UserWarning):
    """A result file was damaged or did not belong to its configuration: it was moved aside and recomputed."""


# fields every result row has, from the first qlab version that wrote them
ROW_FIELDS = ("label", "key", "model", "method", "recipe", "mode", "calib_windows", "ppl", "ppl_ref",
              "delta_ppl_pct", "kl_mean", "kl_median", "kl_p99", "top1", "quantized_bpw", "protocol")
# fields that check a row; kept out of the table
CHECK_FIELDS = ("config", "config_hash", "checksum")


def _checksum(row: dict) -> str:
    """SHA-256 of a row's canonical JSON (every field but the checksum)."""
    text = json.dumps({k: v for k, v in row.items() if k != "checksum"}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _write_row(path: Path, row: dict) -> None:
    """Write atomically (qlab.core.atomic): a killed run never leaves half a file."""
    write_json(path, row)


def _described(row: dict, config: dict, protocol: EvalProtocol) -> bool:
    """Does a row without hash and checksum (an earlier qlab's) describe this configuration?"""
    recipe, _ = config_recipe(config)
    expected = {"model": config.get("model", EMBEDDED), "method": config_method(config),
                "mode": config.get("mode", "fake"), "recipe": _recipe_text(recipe),
                "calib_windows": _calib_windows(config), "protocol": protocol.describe()}
    return all(row.get(k) == v for k, v in expected.items())


def _read_row(path: Path, key: str, config: dict, protocol: EvalProtocol) -> tuple[dict | None, str | None]:
    """``(row, None)`` for a sound result file of this configuration, ``(None, why not)`` otherwise."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None, "is not UTF-8 text (damaged)"
    if not text.strip():
        return None, "is empty (a write that never finished)"
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"is not valid JSON ({e.msg} at line {e.lineno}): half-written or damaged"
    if not isinstance(row, dict):
        return None, f"holds a JSON {type(row).__name__}, not a result row"
    missing = [f for f in ROW_FIELDS if f not in row]
    if missing:
        return None, f"misses the fields {missing}"
    if row["key"] != key:
        return None, f"holds the row of configuration {row['key']!r} (label {row['label']!r}), not of {key!r}"
    if any(f in row for f in CHECK_FIELDS):
        if row.get("config_hash") != config_hash(config, protocol):
            return None, "was computed for another configuration or protocol (its config_hash differs)"
        if row.get("checksum") != _checksum(row):
            return None, "was edited after it was written (its checksum differs)"
        return row, None
    if not _described(row, config, protocol):  # an earlier qlab's row: no hash, no checksum
        return None, "describes another configuration (model, method, recipe, mode or protocol differ)"
    _write_row(path, _with_checks(row, config, protocol))
    return row, None


def _with_checks(row: dict, config: dict, protocol: EvalProtocol) -> dict:
    row = {k: v for k, v in row.items() if k not in CHECK_FIELDS}
    row["config"] = json.loads(_config_text(config, protocol))
    row["config_hash"] = config_hash(config, protocol)
    row["checksum"] = _checksum(row)
    return row


def _move_aside(path: Path, why: str, index: int, config: dict) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = path.with_name(f"{path.name}.bad-{stamp}"), 1
    while aside.exists():
        aside, n = path.with_name(f"{path.name}.bad-{stamp}-{n}"), n + 1
    path.rename(aside)
    warnings.warn(f"result file {path} {why}; moved it to {aside.name} and recomputing configuration {index} "
                  f"{_label(config)}", ResultFileWarning, stacklevel=3)


def _compute(config: dict, key: str, session: _Session, protocol: EvalProtocol, results_dir: Path) -> dict:
    """Compute one configuration and write its checked row at once (the one writer: the in-process loop and
    the Ray tasks both come here); return the row as the file holds it."""
    row = run_one(config, session)
    row["key"] = key
    row = _with_checks(row, config, protocol)
    _write_row(results_dir / f"{key}.json", row)
    return json.loads(json.dumps(row))  # the table holds what the file holds


# ---- the Ray backend: one task per configuration ----

BACKENDS = ("local", "ray")


class SweepTaskWarning(UserWarning):
    """A configuration's Ray task failed (its worker died, its node was lost, or it raised): its row is
    missing from the table and from the results folder, and the next run computes it."""


# per Ray worker process: its session (model, reference log-probs, calibration windows), reused by the next
# task of the same sweep that the worker runs
_WORKER_SESSIONS: dict = {}


def _ray_task(config: dict, key: str, protocol: EvalProtocol, results_dir: str, batch_size: int, load,
              threads: int) -> dict:
    """One configuration in a Ray worker. The task writes its own row, so a finished configuration survives
    the driver being killed (results_dir on a filesystem every node shares); it also returns it."""
    import torch

    torch.set_num_threads(threads)
    Path(results_dir).mkdir(parents=True, exist_ok=True)  # a node that does not share the driver's folder
    name = (getattr(load, "__module__", None), getattr(load, "__qualname__", repr(load)))
    session_key = (name, protocol, batch_size)
    if session_key not in _WORKER_SESSIONS:
        _WORKER_SESSIONS.clear()  # one sweep's model in memory per worker
        _WORKER_SESSIONS[session_key] = _Session(protocol, batch_size, load, progress=False)
    return _compute(config, key, _WORKER_SESSIONS[session_key], protocol, Path(results_dir))


def _check_backend(backend, address, cpus_per_task, gpus_per_task, max_retries) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "local":
        if address is not None:
            raise ValueError("address= joins a Ray cluster: pass backend='ray' with it")
        return
    if isinstance(cpus_per_task, bool) or not isinstance(cpus_per_task, (int, float)) or cpus_per_task <= 0:
        raise ValueError(f"cpus_per_task must be a number > 0 (Ray's num_cpus per task), got {cpus_per_task!r}")
    if gpus_per_task is not None and (not isinstance(gpus_per_task, (int, float)) or gpus_per_task < 0):
        raise ValueError(f"gpus_per_task must be None (one per task when the cluster has GPUs) or a number >= 0, "
                         f"got {gpus_per_task!r}")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max_retries must be an integer >= 0, got {max_retries!r}")
    try:
        import ray  # noqa: F401
    except ImportError as e:
        raise ValueError("backend='ray' needs Ray: pip install -e '.[ray]' (make env installs it)") from e


def _run_on_ray(todo, protocol, results_dir: Path, batch_size, load, progress, address, cpus_per_task,
                gpus_per_task, max_retries) -> dict:
    """Submit each configuration of ``todo`` [(index, key, config)] as a Ray task; return {key: row} of the
    finished ones. A failed task is warned about (SweepTaskWarning) after every other task has finished."""
    import ray

    started = not ray.is_initialized()
    if started and address is None:  # a local cluster on this machine, for this sweep
        ray.init(include_dashboard=False)
    elif started:  # "auto" (this machine is a node of it) or "ray://head:10001" (Ray client)
        ray.init(address=address)
    try:
        gpus = gpus_per_task if gpus_per_task is not None else (1 if ray.cluster_resources().get("GPU", 0) else 0)
        task = ray.remote(_ray_task).options(num_cpus=cpus_per_task, num_gpus=gpus, max_retries=max_retries)
        threads = max(1, int(cpus_per_task))
        futures = {task.remote(config, key, protocol, str(results_dir), batch_size, load, threads): (i, key, config)
                   for i, key, config in todo}
        rows, failed, pending = {}, [], list(futures)
        with tqdm(total=len(pending), desc="sweep (ray)", disable=not progress) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                i, key, config = futures[done[0]]
                try:
                    rows[key] = ray.get(done[0])
                    # the task wrote the row already; the driver writes it too, for workers on other nodes
                    # whose results_dir is not shared with the driver (the same bytes, atomically)
                    _write_row(results_dir / f"{key}.json", rows[key])
                except ray.exceptions.RayError as e:  # worker killed, node lost, or the task raised
                    failed.append((i, config, e))
                bar.update()
    finally:
        if started:
            ray.shutdown()
    for i, config, e in failed:
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        warnings.warn(f"configuration {i} {_label(config)} failed on Ray ({type(e).__name__}: {why}); its row is "
                      f"missing: run the sweep again to compute it", SweepTaskWarning, stacklevel=3)
    return rows


def run_sweep(
    configs: list[dict],
    protocol: EvalProtocol = EvalProtocol(),
    results_dir: str | Path = DEFAULT_RESULTS / "sweep",
    batch_size: int = 1,
    progress: bool = True,
    load=_default_load,
    *,
    backend: str = "local",
    address: str | None = None,
    cpus_per_task: float = 1,
    gpus_per_task: float | None = None,
    max_retries: int = 1,
) -> pd.DataFrame:
    """Run every configuration not already on disk; return the table of all of them.

    Before computing anything: every configuration is checked (bad ones are all named in one error), the
    results folder must be writable, and stored result files are checked (a damaged or foreign one is moved
    aside and recomputed, see the module docstring). ``load(name) -> (model, tokenizer)`` is injectable
    (tests use a tiny model).

    ``backend="local"`` (default) computes in this process, one configuration after the other.
    ``backend="ray"`` submits each configuration as a Ray task with ``cpus_per_task`` CPUs and ``gpus_per_task``
    GPUs (None: one when the cluster has GPUs, else none); ``address=None`` starts a local Ray cluster (shut
    down at the end), ``"auto"`` or ``"ray://head:10001"`` joins a running one, and a Ray session already
    initialised in this process is used as it is. Each task writes its row itself, with the same atomic
    writer; ``load`` must be picklable (a module-level function) and every node needs the same qlab and
    access to the models. A task that fails (its worker killed, after ``max_retries`` retries of system
    failures; or an error in the configuration) leaves its row missing, with a :class:`SweepTaskWarning`
    once the other tasks have finished; the next run computes it.
    """
    _check_backend(backend, address, cpus_per_task, gpus_per_task, max_retries)
    configs = list(configs)
    problems = {i: p for i, c in enumerate(configs) if (p := _config_problem(c))}
    keys = {i: config_key(c, protocol) for i, c in enumerate(configs) if i not in problems}
    first = {}
    for i, k in keys.items():
        if k in first:
            j = first[k]
            raise ValueError(f"configurations #{j} {_label(configs[j])} and #{i} {_label(configs[i])} are identical "
                             f"(same model, recipe, mode; labels do not count): drop one")
        first[k] = i
    results_dir = Path(results_dir)
    _check_writable(results_dir)

    rows = {}
    for i, key in keys.items():
        path = results_dir / f"{key}.json"
        if path.exists():
            row, why = _read_row(path, key, configs[i], protocol)
            if row is None:
                _move_aside(path, why, i, configs[i])
            else:
                rows[key] = row
    todo = [(i, k, configs[i]) for i, k in keys.items() if k not in rows]

    # recipe patterns against each model, before computing anything: the models in reverse order, so that the
    # first one to compute is the one left loaded
    session = _Session(protocol, batch_size, load, progress)
    names = list(dict.fromkeys(c.get("model", EMBEDDED) for _, _, c in todo))
    for name in reversed(names):
        model, _ = session.model(name)
        problems.update({i: p for i, _, c in todo if c.get("model", EMBEDDED) == name
                         and (p := _pattern_problem(c, model))})
    _refuse(problems, configs)

    if backend == "ray":
        session.models.clear()  # the workers load their own copies
        rows.update(_run_on_ray(todo, protocol, results_dir, batch_size, load, progress, address, cpus_per_task,
                                gpus_per_task, max_retries))
    else:
        for _, key, config in tqdm(todo, desc="sweep", disable=not progress):
            rows[key] = _compute(config, key, session, protocol, results_dir)
    table = []
    for key, config in zip(keys.values(), configs):
        if key not in rows:  # its Ray task failed (warned about above)
            continue
        row = {k: v for k, v in rows[key].items() if k not in CHECK_FIELDS}
        row["label"] = config.get("label", row["label"])
        table.append(row)
    return pd.DataFrame(table)


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
