"""Resumable sweeps: results keyed by config hash, a killed run loses nothing finished."""
import json

import pytest
import torch

import embedded as emb
from qlab.eval import sweep
from qlab.models.walker import weight_only

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


def test_bf16_autocast_is_part_of_the_key_and_float32_keeps_the_keys_of_earlier_results():
    config = {"recipe": {"model.layers.*": "int4-g128-asym-minmax"}}
    assert sweep.config_key(config, PROTOCOL) == "00bad142e889"  # computed by qlab before autocast existed
    cast = sweep.EvalProtocol(seq_len=32, n_windows=2, pick="first", autocast="bf16")
    assert sweep.config_key(config, cast) != sweep.config_key(config, PROTOCOL)
    assert cast.describe().endswith("no BOS, bf16 autocast") and PROTOCOL.describe().endswith("no BOS")
    with pytest.raises(ValueError, match=r"autocast=...\) must be one of \[None, 'bf16'\], got 'fp16'"):
        sweep.EvalProtocol(autocast="fp16")


def test_a_methods_revision_changes_the_keys_of_its_configurations_only():
    """AWQ's revision 2 (calibrated on the float model's activations) moves its numbers: its rows cached before
    must not be read, whether it is named as the method or in a recipe; GPTQ's keys stay those of its rows."""
    gptq = {"method": "gptq", "spec": "int4-g128-asym-minmax", "calib_windows": 32}
    awq = {**gptq, "method": "awq"}
    mixed = {"calib_windows": 32, "recipe": {"model.layers.*": "awq:int4-g128-asym-minmax", "lm_head": "int8"}}
    # (the keys qlab computed before revisions existed)
    assert sweep.config_key(gptq, PROTOCOL) == "0db657c83d4b"
    assert sweep.config_key(awq, PROTOCOL) != "f20201e139ab"
    assert sweep.config_key({**mixed, "recipe": {"model.layers.*": "awq:int4-g128-asym-minmax"}}, PROTOCOL) != "5134e0a807e2"
    assert '"revisions": {"awq": 2}' in sweep._config_text(mixed, PROTOCOL)


def test_a_bf16_autocast_sweep_has_its_own_rows(tmp_path):
    configs = _configs()[:1]
    cast = sweep.EvalProtocol(seq_len=32, n_windows=2, pick="first", autocast="bf16")
    fp32 = sweep.run_sweep(configs, PROTOCOL, tmp_path, progress=False, load=_load)
    bf16 = sweep.run_sweep(configs, cast, tmp_path, progress=False, load=_load)
    assert len(list(tmp_path.glob("*.json"))) == 2  # one row each, neither read in place of the other
    assert bf16.loc[0, "protocol"].endswith("bf16 autocast") and not fp32.loc[0, "protocol"].endswith("autocast")
    assert bf16.loc[0, "ppl_ref"] != fp32.loc[0, "ppl_ref"]  # the reference is scored under autocast too


def test_config_key_is_shared_between_notebooks_that_do_and_do_not_name_the_embedded_model():
    """05 names the model, 08 and 09 do not: the same RTN configuration must be one row of results/sweep."""
    from qlab.models import EMBEDDED

    named = {"label": "int3 g128 asym", "model": EMBEDDED, "recipe": weight_only("int3-g128-asym-minmax")}
    unnamed = {"label": "RTN 3-bit", "recipe": {"model.layers.*": "int3-g128-asym-minmax"}}
    assert sweep.config_key(named, PROTOCOL) == sweep.config_key(unnamed, PROTOCOL)
    assert sweep.config_key(named, PROTOCOL) != sweep.config_key({**unnamed, "model": "tiny"}, PROTOCOL)


def test_resume_after_a_crash_redoes_nothing(tmp_path, monkeypatch):
    calls = []
    real_run_one = sweep.run_one

    def crash_on_second(config, session):
        calls.append(config["label"])
        if config["label"] == "int4 g32":
            raise RuntimeError("the machine went down")
        return real_run_one(config, session)

    # 1st run dies on the second config after the first finished
    monkeypatch.setattr(sweep, "run_one", crash_on_second)
    with pytest.raises(RuntimeError, match="went down"):
        sweep.run_sweep(_configs(), PROTOCOL, tmp_path, progress=False, load=_load)
    assert calls == ["int8", "int4 g32"]
    first = tmp_path / f"{sweep.config_key(_configs()[0], PROTOCOL)}.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]  # no half-written files
    stamp = first.stat().st_mtime_ns
    monkeypatch.setattr(sweep, "run_one", lambda c, s: calls.append(c["label"]) or real_run_one(c, s))

    # 2nd run (fixed grid) computes only the two missing configs
    calls.clear()
    df = sweep.run_sweep(_configs(), PROTOCOL, tmp_path, progress=False, load=_load)
    assert calls == ["int4 g32", "int2"]
    assert first.stat().st_mtime_ns == stamp
    assert list(df.label) == ["int8", "int4 g32", "int2"]
    assert df.aligned_q4_1.tolist() == [False, True, False]
    assert (df.ppl_ref == df.ppl_ref[0]).all() and df.top1.between(0, 1).all()
    # the sizes, counted by hand from the block linears' shapes: codes + fp16 scales (+ 4-bit zero points)
    shapes = [m.weight.shape for name, m in _load("tiny")[0].named_modules()
              if isinstance(m, torch.nn.Linear) and name.startswith("model.layers.")]
    n = sum(o * i for o, i in shapes)  # 2 layers x (q 64x64, k, v 32x64, o 64x64, gate, up 128x64, down 64x128)
    bits = [8 * n + 16 * sum(o for o, _ in shapes),  # int8: one scale per output channel
            4 * n + (16 + 4) * (n // 32),  # int4 g32 asym: a scale and a zero point per 32 weights
            2 * n + 16 * len(shapes)]  # int2: one scale per tensor
    assert df.quantized_bpw.tolist() == pytest.approx([b / n for b in bits], rel=1e-12)  # 8.222, 4.625, 2.003
    lm_head = 256 * 64  # float, at 16 bits
    assert df.linear_bpw.tolist() == pytest.approx([(b + 16 * lm_head) / (n + lm_head) for b in bits], rel=1e-12)
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
sys.path[:0] = [{tests!r}, {root!r}]
import test_sweep as t
from qlab.eval import sweep
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
    code = CHILD.format(tests=str(Path(__file__).parent), root=str(Path(__file__).parents[1]), marker=str(marker), results=str(results))
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


def _calibrated_configs():
    spec = "int4-g32-asym-minmax"
    return [
        {"label": "RTN", "model": "tiny", "recipe": weight_only(spec)},
        {"label": "GPTQ", "model": "tiny", "method": "gptq", "spec": spec, "calib_windows": 4},
        {"label": "W8A8", "model": "tiny", "method": "w8a8", "spec": "int8-channel-sym-absmax", "calib_windows": 4},
        {"label": "SmoothQuant", "model": "tiny", "method": "w8a8", "spec": "int8-channel-sym-absmax",
         "calib_windows": 4, "options": {"alpha": 0.5}},
    ]


def test_calibrated_methods_in_a_sweep(tmp_path):
    """GPTQ and W8A8 rows sit in the same table as RTN: same windows, same size accounting."""
    df = sweep.run_sweep(_calibrated_configs(), PROTOCOL, tmp_path, progress=False, load=_load)
    assert df.method.tolist() == ["rtn", "gptq", "w8a8", "w8a8"]
    assert df.calib_windows.tolist() == [0, 4, 0, 4]  # naive W8A8 per token calibrates nothing
    assert df.quantized_bpw[0] == df.quantized_bpw[1]  # GPTQ stores the same grid as RTN
    assert df.quantized_bpw[2] == df.quantized_bpw[3] > 8  # int8 codes + an fp16 scale per row
    assert df.kl_mean[1] < df.kl_mean[0]  # GPTQ closer to the float model than RTN on the same grid
    assert df.top1.between(0, 1).all()
    # the calibration windows come from the calibration articles, which the evaluation never sees
    model, tokenizer = _load("tiny")
    session = sweep._Session(PROTOCOL, 1, _load, False)
    calib = session.calibration("tiny", 4)
    evals = session.reference("tiny").windows
    assert calib.shape == (4, PROTOCOL.seq_len)
    assert not {tuple(w) for w in calib.tolist()} & {tuple(w) for w in evals.tolist()}


def test_mixed_precision_recipe_in_a_sweep(tmp_path):
    """One configuration: GPTQ 4-bit on the blocks, int8 embedding and lm_head. The row records what is stored:
    the W8A8 row's recipe names the spec whose bytes it counts (fp16 scales: 8 + 16/in bits per weight)."""
    mixed = {"label": "GPTQ blocks, int8 ends", "model": "tiny", "calib_windows": 4,
             "recipe": {"model.embed_tokens": "int8-channel-sym-absmax", "lm_head": "int8-channel-sym-absmax",
                        "model.layers.*": "gptq:int4-g32-asym-minmax"}}
    w8a8 = {"label": "W8A8", "model": "tiny", "method": "w8a8", "spec": "int8-channel-sym-absmax", "calib_windows": 4}
    df = sweep.run_sweep([mixed, w8a8], PROTOCOL, tmp_path, progress=False, load=_load)
    row = df.iloc[0]
    assert row.calib_windows == 4 and row.recipe["model.layers.*"] == "gptq:int4-g32-asym-minmax" and row.method == "mixed"
    model, _ = _load("tiny")
    n_block = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.layers") and n.endswith("proj.weight"))
    vocab, hidden = model.model.embed_tokens.weight.shape
    block_bytes = sum(m.out_features * (m.in_features // 2 + -(-m.in_features // 32) * (2 + 0.5))
                      for n, m in model.named_modules() if n.startswith("model.layers") and isinstance(m, torch.nn.Linear))
    ends = vocab * (hidden + 2)  # int8 codes + one fp16 scale per row, the tied head counted once
    assert row.quantized_bpw == pytest.approx(8 * (block_bytes + ends) / (n_block + vocab * hidden), rel=1e-12)
    assert df.iloc[1].recipe == {"model.layers.*": "w8a8:int8-channel-sym-absmax"}
    assert df.iloc[1].quantized_bpw > 8 and df.iloc[1].kl_mean > 0


@pytest.mark.parametrize("config, message", [
    ({"method": "zeroshot", "spec": "int4"}, "unknown method"),
    ({"method": "gptq"}, "needs a 'spec'"),
    ({"method": "rtn"}, "needs a 'recipe'"),
    ({"method": "w8a8", "spec": "int4"}, "int8-channel-sym-absmax"),
])
def test_bad_method_configs(tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        sweep.run_sweep([{"model": "tiny", **config}], PROTOCOL, tmp_path, progress=False, load=_load)


# ---- the results store checks itself (issue 16, items 6, 10, 12, 13) ----

def _two_configs():
    return _configs()[1:]  # int4 g32, int2


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A finished two-configuration sweep: (results folder, its table). Tests copy the folder."""
    folder = tmp_path_factory.mktemp("stored")
    return folder, sweep.run_sweep(_two_configs(), PROTOCOL, folder, progress=False, load=_load)


def _copy(stored, tmp_path):
    import shutil

    shutil.copytree(stored[0], tmp_path / "results")
    return tmp_path / "results"


def _counting(monkeypatch):
    calls = []
    real_run_one = sweep.run_one
    monkeypatch.setattr(sweep, "run_one", lambda c, s: calls.append(c["label"]) or real_run_one(c, s))
    return calls


def _files(folder, key):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(key))


def test_a_stored_row_carries_its_key_config_hash_and_checksum(stored):
    folder, df = stored
    key = sweep.config_key(_two_configs()[0], PROTOCOL)
    row = json.loads((folder / f"{key}.json").read_text())
    assert row["key"] == key and row["config_hash"] == sweep.config_hash(_two_configs()[0], PROTOCOL)
    assert row["config_hash"][:12] == key and len(row["config_hash"]) == 64
    assert row["config"]["recipe"] == _two_configs()[0]["recipe"] and row["config"]["protocol"]["seq_len"] == 32
    assert row["checksum"] == sweep._checksum(row)
    assert list(df.columns[:2]) == ["label", "model"] and not {"config", "config_hash", "checksum"} & set(df.columns)


def _rewrite(path, change):
    row = json.loads(path.read_text())
    change(row)
    path.write_text(json.dumps(row, indent=1))


@pytest.mark.parametrize("damage, reason", [
    ("other_row", "holds the row of configuration"),  # int2's file copied over int4's (issue: int4 shows int2's ppl)
    ("other_row_renamed", "another configuration or protocol"),  # ... with its key edited to match the filename
    ("edited", "edited after it was written"),
])
def test_a_foreign_or_edited_row_is_moved_aside_and_recomputed(stored, tmp_path, monkeypatch, damage, reason):
    folder = _copy(stored, tmp_path)
    k4, k2 = (sweep.config_key(c, PROTOCOL) for c in _two_configs())
    target = folder / f"{k4}.json"
    if damage.startswith("other_row"):
        target.write_text((folder / f"{k2}.json").read_text())
        if damage == "other_row_renamed":
            _rewrite(target, lambda row: row.update(key=k4))
    else:
        _rewrite(target, lambda row: row.update(ppl=1.0))
    calls = _counting(monkeypatch)
    with pytest.warns(sweep.ResultFileWarning, match=f"{target}.*{reason}.*recomputing configuration 0 'int4 g32'"):
        df = sweep.run_sweep(_two_configs(), PROTOCOL, folder, progress=False, load=_load)
    assert calls == ["int4 g32"]
    assert df.ppl.tolist() == stored[1].ppl.tolist()  # the true int4 number again, not int2's or the edit
    aside = [n for n in _files(folder, k4) if ".bad-" in n]
    assert len(aside) == 1 and _files(folder, k4) == sorted([f"{k4}.json", aside[0]])
    # the recomputed file is sound: the next run computes nothing and warns about nothing
    calls.clear()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sweep.run_sweep(_two_configs(), PROTOCOL, folder, progress=False, load=_load).equals(df)
    assert calls == []


@pytest.mark.parametrize("content, reason", [
    (b"", "is empty"),
    ("half", "is not valid JSON"),  # the first half of a real result file
    (b"\x00\x01 junk \xff", "is not UTF-8 text"),
    (b"not json at all", "is not valid JSON"),
    (b"{}", "misses the fields"),  # used to raise KeyError: 'label'
    (b"[1, 2, 3]", "holds a JSON list"),
])
def test_a_damaged_result_file_is_named_moved_aside_and_recomputed(stored, tmp_path, monkeypatch, content, reason):
    folder = _copy(stored, tmp_path)
    key = sweep.config_key(_two_configs()[1], PROTOCOL)
    target = folder / f"{key}.json"
    if content == "half":
        text = target.read_bytes()
        content = text[: len(text) // 2]
    target.write_bytes(content)
    calls = _counting(monkeypatch)
    with pytest.warns(sweep.ResultFileWarning, match=f"{target} {reason}.*moved it to {key}.json.bad-.*recomputing"):
        df = sweep.run_sweep(_two_configs(), PROTOCOL, folder, progress=False, load=_load)
    assert calls == ["int2"]
    assert df.ppl.tolist() == stored[1].ppl.tolist()
    (aside,) = [p for p in folder.iterdir() if ".bad-" in p.name]
    assert aside.read_bytes() == content  # kept for inspection, never deleted


def test_a_row_written_before_the_checksums_is_still_used(stored, tmp_path, monkeypatch):
    """Result files of earlier qlab versions (no config_hash, no checksum) are kept when their key and
    description match the configuration, and gain the checks; one describing another recipe is recomputed."""
    folder = _copy(stored, tmp_path)
    k4, k2 = (sweep.config_key(c, PROTOCOL) for c in _two_configs())
    def strip(row, **change):
        for f in ("config", "config_hash", "checksum"):
            del row[f]
        row.update(change)
    _rewrite(folder / f"{k4}.json", strip)
    _rewrite(folder / f"{k2}.json", lambda row: strip(row, recipe={"model.layers.*": "int8-channel-sym-absmax"}))
    calls = _counting(monkeypatch)
    with pytest.warns(sweep.ResultFileWarning, match=f"{k2}.json describes another configuration"):
        df = sweep.run_sweep(_two_configs(), PROTOCOL, folder, progress=False, load=_load)
    assert calls == ["int2"]
    timings = ["quant_seconds", "eval_seconds", "s_per_window"]
    assert df.drop(columns=timings).equals(stored[1].drop(columns=timings))
    upgraded = json.loads((folder / f"{k4}.json").read_text())
    assert upgraded["checksum"] == sweep._checksum(upgraded) and upgraded["config_hash"][:12] == k4


def test_a_read_only_results_folder_is_refused_before_computing(tmp_path, monkeypatch):
    import os
    import tempfile

    folder = tmp_path / "results"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make the folder refuse writes as a read-only mount would
        real_mkstemp = tempfile.mkstemp

        def mkstemp(*args, dir=None, **kwargs):
            if dir is not None and os.path.samefile(dir, folder):
                raise OSError(30, "Read-only file system")
            return real_mkstemp(*args, dir=dir, **kwargs)
        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    calls, loads = _counting(monkeypatch), []
    try:
        with pytest.raises(ValueError, match=f"results folder {folder} is not writable .*nothing was computed"):
            sweep.run_sweep(_configs(), PROTOCOL, folder, progress=False, load=lambda n: loads.append(n) or _load(n))
    finally:
        folder.chmod(0o755)
    assert calls == [] and loads == [] and list(folder.iterdir()) == []
    with pytest.raises(ValueError, match="is not a folder"):
        (tmp_path / "file").write_text("x")
        sweep.run_sweep(_configs(), PROTOCOL, tmp_path / "file", progress=False, load=_load)


def test_every_bad_configuration_is_named_before_anything_is_computed(tmp_path, monkeypatch):
    configs = [
        {"label": "fine", "model": "tiny", "recipe": weight_only("int8-channel-sym-absmax")},
        {"label": "typo spec", "model": "tiny", "recipe": weight_only("int4-g32-asym-minmx")},
        {"label": "fine too", "model": "tiny", "recipe": weight_only("int2-tensor-sym-absmax")},
        {"label": "no such method", "model": "tiny", "method": "zeroshot", "spec": "int4"},
        _configs(bad_second=True)[1],  # a pattern that matches no layer of the model
        {"label": "typo key", "model": "tiny", "recipe": weight_only("int4"), "calib_window": 4},
        {"label": "bad mode", "model": "tiny", "recipe": weight_only("int4"), "mode": "real"},
    ]
    calls = _counting(monkeypatch)
    with pytest.raises(ValueError) as err:
        sweep.run_sweep(configs, PROTOCOL, tmp_path, progress=False, load=_load)
    text = str(err.value)
    assert text.startswith("5 of 7 configurations are invalid; nothing was computed")
    for i in (1, 3, 4, 5, 6):
        assert f"\n  #{i} {configs[i]['label']!r}: " in text
    assert "#0" not in text and "#2" not in text
    assert "unknown method 'zeroshot'" in text and "matches no linear layer" in text
    assert "unknown key ['calib_window']" in text and "mode must be 'fake' or 'packed'" in text
    assert calls == [] and list(tmp_path.iterdir()) == []


def test_duplicate_configs_are_named(tmp_path):
    a, b = _configs()[:2]
    with pytest.raises(ValueError, match=r"configurations #0 'int8' and #2 'again' are identical"):
        sweep.run_sweep([a, b, {**a, "label": "again"}], PROTOCOL, tmp_path, progress=False, load=_load)
