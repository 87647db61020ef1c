"""run_sweep(backend="ray") on a local Ray cluster of 2 worker processes with the tiny Llama: rows land in
the same checked store, a worker killed mid-run loses only its own configuration, and a rerun computes
that one alone."""
import json
import os
import signal
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")  # the optional 'ray' extra; make env installs it, so CI runs this

import psutil  # noqa: E402  (a dependency of ray)

import embedded as emb  # noqa: E402
from qlab.eval import sweep  # noqa: E402
from qlab.models.walker import weight_only  # noqa: E402

PROTOCOL = sweep.EvalProtocol(seq_len=32, n_windows=2, pick="first")
HERE = Path(__file__).resolve().parent


class ByteTokenizer:
    """Token = byte value (vocabulary 256)."""

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": list(text.encode("utf-8"))}


def load(name):
    """The sweep's load= (module level, so Ray pickles it by reference). Model "tiny-crash" SIGKILLs the Ray
    worker that loads it, once: it leaves a marker file first (QLAB_TEST_CRASH_MARKER), so a rerun survives.
    Each load inside a task is logged, with the worker's pid, to QLAB_TEST_LOAD_LOG."""
    in_task = ray.is_initialized() and ray.get_runtime_context().get_task_id() is not None
    if in_task:
        with open(os.environ["QLAB_TEST_LOAD_LOG"], "a") as f:
            f.write(f"{os.getpid()} {name}\n")
    marker = Path(os.environ["QLAB_TEST_CRASH_MARKER"])
    if name == "tiny-crash" and in_task and not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)  # the worker process dies for real, mid-task
    return emb.tiny_llama(vocab=256, hidden=64, layers=2), ByteTokenizer()


CONFIGS = [
    {"label": "int8", "model": "tiny", "recipe": weight_only("int8-channel-sym-absmax")},
    {"label": "int4 g32 (killed)", "model": "tiny-crash", "recipe": weight_only("int4-g32-asym-minmax")},
    {"label": "int4 g32", "model": "tiny", "recipe": weight_only("int4-g32-asym-minmax")},
    {"label": "int2", "model": "tiny", "recipe": weight_only("int2-tensor-sym-absmax")},
]


def _start_ray(env: dict, attempts: int = 3) -> float:
    """ray.init of a local 2-CPU cluster; return its start time in seconds. Ray 2.60's raylet gives its
    dashboard agent a fixed 15 s to start (node_manager.cc, WaitForDashboardAgentPorts), which a machine
    busy with other work can exceed: then the processes of the failed start are stopped and it tries again."""
    for attempt in range(attempts):
        t0 = time.perf_counter()
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
            return time.perf_counter() - t0
        except Exception:  # Ray raises a bare Exception when its node times out during startup
            ray.shutdown()
            for child in psutil.Process().children(recursive=True):  # only this test's own Ray processes
                try:
                    if "ray" in " ".join(child.cmdline()):
                        child.kill()
                except psutil.Error:  # already gone, or a zombie its parent will reap
                    pass
            if attempt == attempts - 1:
                raise


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray cluster with 2 CPUs (2 worker processes at a time), shut down after the module."""
    state = tmp_path_factory.mktemp("ray-state")
    env = {"QLAB_TEST_CRASH_MARKER": str(state / "crashed"), "QLAB_TEST_LOAD_LOG": str(state / "loads.log"),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           # the workers import this module (load= is pickled by reference) and tests/embedded.py
           "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    os.environ.update({k: v for k, v in env.items() if k.startswith("QLAB_TEST")})
    print(f"ray.init: {_start_ray(env):.1f} s")
    yield state
    ray.shutdown()


def _files(folder: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.glob("*.json")}


def test_killed_worker_loses_only_its_configuration(cluster, tmp_path, one_thread):
    keys = [sweep.config_key(c, PROTOCOL) for c in CONFIGS]
    with pytest.warns(sweep.SweepTaskWarning, match=r"configuration 1 'int4 g32 \(killed\)' failed on Ray"):
        df = sweep.run_sweep(CONFIGS, PROTOCOL, tmp_path, progress=False, load=load, backend="ray", max_retries=0)
    killed = int((cluster / "crashed").read_text())  # the worker that took the configuration is gone
    assert not psutil.pid_exists(killed) or psutil.Process(killed).status() == psutil.STATUS_ZOMBIE
    assert list(df.label) == ["int8", "int4 g32", "int2"]  # the killed one is missing, the others finished
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{k}.json" for k in keys if k != keys[1])
    for i in (0, 2, 3):  # each row verifies: the store reads it back as sound
        row, why = sweep._read_row(tmp_path / f"{keys[i]}.json", keys[i], CONFIGS[i], PROTOCOL)
        assert why is None and row["label"] == CONFIGS[i]["label"] and row["ppl"] > 1
    # the same numbers as the in-process backend computes (one thread each)
    local = sweep.run_sweep([CONFIGS[0]], PROTOCOL, tmp_path / "local", progress=False, load=load)
    assert local.ppl[0] == df.ppl[0] and local.kl_mean[0] == df.kl_mean[0]

    before = _files(tmp_path)
    loads = (cluster / "loads.log").read_text().splitlines()
    df = sweep.run_sweep(CONFIGS, PROTOCOL, tmp_path, progress=False, load=load, backend="ray", max_retries=0)
    assert list(df.label) == [c["label"] for c in CONFIGS]
    after = _files(tmp_path)
    assert set(after) - set(before) == {f"{keys[1]}.json"}
    assert all(after[name] == before[name] for name in before)  # stored rows read, not recomputed or rewritten
    new_loads = (cluster / "loads.log").read_text().splitlines()[len(loads):]
    assert [line.split()[1] for line in new_loads] == ["tiny-crash"]  # one task ran: the killed configuration
    row = json.loads((tmp_path / f"{keys[1]}.json").read_text())
    assert row["config_hash"] == sweep.config_hash(CONFIGS[1], PROTOCOL)


def test_bad_backend_arguments_are_clear(tmp_path):
    with pytest.raises(ValueError, match="backend must be one of local, ray"):
        sweep.run_sweep(CONFIGS, PROTOCOL, tmp_path, load=load, backend="dask")
    with pytest.raises(ValueError, match="address= joins a Ray cluster: pass backend='ray'"):
        sweep.run_sweep(CONFIGS, PROTOCOL, tmp_path, load=load, address="auto")
    with pytest.raises(ValueError, match="cpus_per_task must be a number > 0"):
        sweep.run_sweep(CONFIGS, PROTOCOL, tmp_path, load=load, backend="ray", cpus_per_task=0)
    with pytest.raises(ValueError, match="max_retries must be an integer >= 0"):
        sweep.run_sweep(CONFIGS, PROTOCOL, tmp_path, load=load, backend="ray", max_retries=-1)
    assert not list(tmp_path.iterdir())  # refused before anything was written
