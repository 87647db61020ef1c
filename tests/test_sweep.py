"""Resumable sweeps: results keyed by config hash, a killed run loses nothing finished."""
import json

import pytest

import embedded as emb
from qlab import sweep
from qlab.apply import weight_only

PROTOCOL = sweep.EvalProtocol(seq_len=32, n_windows=2, pick="first")


class ByteTokenizer:
    """Token = byte value (vocabulary 256): enough to drive a tiny model through the real data path."""

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": list(text.encode("utf-8"))}


def _load(name):
    return emb.tiny_llama(vocab=256, hidden=64, layers=2), ByteTokenizer()


def _configs(bad_second=False):
    second = {"*.no_such_layer": "int4"} if bad_second else weight_only("int4-g32-asym-minmax")
    return [
        {"label": "int8", "model": "tiny", "recipe": weight_only("int8-channel-sym-absmax")},
        {"label": "int4 g32", "model": "tiny", "recipe": second},
        {"label": "int2", "model": "tiny", "recipe": weight_only("int2-tensor-sym-absmax")},
    ]


def test_config_key_ignores_label_but_not_recipe_or_protocol():
    a, b = _configs()[:2]
    assert sweep.config_key(a, PROTOCOL) == sweep.config_key({**a, "label": "renamed"}, PROTOCOL)
    assert sweep.config_key(a, PROTOCOL) != sweep.config_key(b, PROTOCOL)
    assert sweep.config_key(a, PROTOCOL) != sweep.config_key(a, sweep.EvalProtocol(seq_len=64, n_windows=2))
    assert sweep.config_key(a, PROTOCOL) == sweep.config_key({**a, "mode": "fake"}, PROTOCOL)


def test_resume_after_a_crash_redoes_nothing(tmp_path, monkeypatch):
    calls = []
    real_run_one = sweep.run_one
    monkeypatch.setattr(sweep, "run_one", lambda c, s: calls.append(c["label"]) or real_run_one(c, s))

    # 1st run dies on the second config (its pattern matches no layer) after the first finished
    with pytest.raises(ValueError, match="matches no linear"):
        sweep.run_sweep(_configs(bad_second=True), PROTOCOL, tmp_path, progress=False, load=_load)
    assert calls == ["int8", "int4 g32"]
    first = tmp_path / f"{sweep.config_key(_configs()[0], PROTOCOL)}.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]  # no half-written files
    stamp = first.stat().st_mtime_ns

    # 2nd run (fixed grid) computes only the two missing configs
    calls.clear()
    df = sweep.run_sweep(_configs(), PROTOCOL, tmp_path, progress=False, load=_load)
    assert calls == ["int4 g32", "int2"]
    assert first.stat().st_mtime_ns == stamp
    assert list(df.label) == ["int8", "int4 g32", "int2"]
    assert df.aligned_q4_1.tolist() == [False, True, False]
    assert (df.ppl_ref == df.ppl_ref[0]).all() and df.top1.between(0, 1).all()
    assert df.loc[0, "quantized_bpw"] < df.loc[1, "quantized_bpw"] + 8  # sane numbers, and:
    assert df.loc[2, "kl_mean"] > df.loc[0, "kl_mean"]  # int2 per-tensor hurts more than int8

    # 3rd run: nothing to do, same table
    calls.clear()
    again = sweep.run_sweep(_configs(), PROTOCOL, tmp_path, progress=False, load=_load)
    assert calls == [] and again.equals(df)
    assert json.loads(first.read_text())["key"] == first.stem


def test_duplicate_configs_rejected(tmp_path):
    c = _configs()[0]
    with pytest.raises(ValueError, match="identical"):
        sweep.run_sweep([c, {**c, "label": "again"}], PROTOCOL, tmp_path, progress=False, load=_load)


def test_pareto_front_by_hand():
    import pandas as pd

    df = pd.DataFrame({"quantized_bpw": [8, 4, 4.5, 3, 5], "ppl": [30, 32, 31, 40, 33]})
    assert sweep.pareto_front(df).index.tolist() == [3, 1, 2, 0]  # (5, 33) is dominated by (4.5, 31)


def test_rtn_grid_is_the_issue_grid():
    grid = sweep.rtn_grid()
    assert len(grid) == 6 * 4 * 2 + 2
    specs = [c["recipe"]["model.layers.*"] for c in grid]
    assert "int3-g64-asym-minmax" in specs and "int8-channel-sym-absmax" in specs
    assert specs[-2:] == ["nf4-b64-sym-absmax", "fp8_e4m3-channel-sym-absmax"]


CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
import test_sweep as t
from qlab import sweep
real = sweep.run_one
def run_one(config, session):
    if config["label"] == "int4 g32":  # the second config never finishes: the parent kills us here
        open({marker!r}, "w").close()
        time.sleep(600)
    return real(config, session)
sweep.run_one = run_one
sweep.run_sweep(t._configs(), t.PROTOCOL, {results!r}, progress=False, load=t._load)
"""


def test_killed_sweep_process_loses_nothing_finished(tmp_path, monkeypatch):
    """A sweep in another process is SIGKILLed while working on its second configuration; a re-run
    computes only the second and third."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    results, marker = tmp_path / "results", tmp_path / "working-on-second"
    code = CHILD.format(tests=str(Path(__file__).parent), marker=str(marker), results=str(results))
    child = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert child.poll() is None, "the sweep process died before reaching its second configuration"
            assert time.monotonic() < deadline, "the sweep process never reached its second configuration"
            time.sleep(0.2)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    first = results / f"{sweep.config_key(_configs()[0], PROTOCOL)}.json"
    assert sorted(p.name for p in results.iterdir()) == [first.name]
    stamp = first.stat().st_mtime_ns

    calls = []
    real_run_one = sweep.run_one
    monkeypatch.setattr(sweep, "run_one", lambda c, s: calls.append(c["label"]) or real_run_one(c, s))
    df = sweep.run_sweep(_configs(), PROTOCOL, results, progress=False, load=_load)
    assert calls == ["int4 g32", "int2"]
    assert first.stat().st_mtime_ns == stamp
    assert list(df.label) == ["int8", "int4 g32", "int2"]
