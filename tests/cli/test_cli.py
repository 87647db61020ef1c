"""The qlab command line: help, and each command writing what it says (on the embedded model, kept short)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlab.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_help_of_every_command():
    script = Path(sys.executable).parent / "qlab"  # the console script pyproject installs
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "qlab.cli"]
    out = subprocess.run(cmd + ["--help"], capture_output=True, text=True, check=True).stdout
    for command in ("quantize", "eval", "sweep", "export"):
        assert command in out
        sub = subprocess.run(cmd + [command, "--help"], capture_output=True, text=True, check=True).stdout
        assert "--out" in sub


def test_bad_arguments_are_clear(capsys):
    with pytest.raises(SystemExit, match="not valid JSON"):
        main(["quantize", "--recipe", "{model.layers", "--out", "x"])
    assert main(["eval", "--recipe", "int4-g128-g64", "--n-windows", "1", "--seq-len", "32"]) == 2
    assert "granularity twice" in capsys.readouterr().err


@pytest.mark.model
def test_quantize_writes_tensors_that_load(tmp_path):
    from qlab import quantize
    from qlab.core.tensor import from_state_dict
    from qlab.models import load_model

    out = tmp_path / "q"
    assert main(["quantize", "--recipe", '{"model.layers.0.mlp.*": "int4-g32-asym-minmax"}', "--out", str(out)]) == 0
    states = torch.load(out / "qtensors.pt", weights_only=True)
    assert sorted(states) == [f"model.layers.0.mlp.{n}" for n in ("down_proj", "gate_proj", "up_proj")]
    model, _ = load_model()
    W = model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(from_state_dict(states["model.layers.0.mlp.up_proj"]).dequantize(),
                       quantize(W, "int4-g32-asym-minmax").dequantize())
    assert (out / "layers.csv").read_text().count("int4-g32-asym-minmax") == 3
    assert json.loads((out / "recipe.json").read_text())["n_quantized"] == 3


@pytest.mark.model
def test_eval_and_sweep_write_their_results(tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--recipe", '{"model.layers.0.*": "int4-g32-asym-minmax"}', "--n-windows", "1",
                 "--seq-len", "64", "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["n_windows"] == 1 and row["ppl"] > 1 and 0 < row["kl_mean"] and 0 < row["top1"] <= 1
    configs = tmp_path / "configs.json"
    configs.write_text(json.dumps([{"label": "int8 first layer", "recipe": {"model.layers.0.*": "int8"}}]))
    table = tmp_path / "sweep.csv"
    assert main(["sweep", str(configs), "--results", str(tmp_path / "results"), "--n-windows", "1",
                 "--seq-len", "64", "--out", str(table)]) == 0
    assert "int8 first layer" in table.read_text() and len(list((tmp_path / "results").glob("*.json"))) == 1


@pytest.mark.model
def test_export_writes_a_gguf_that_reads_back(tmp_path):
    from qlab.gguf.files import read_gguf

    out = tmp_path / "m.gguf"
    assert main(["export", "--mix", "Q8_0", "--out", str(out)]) == 0
    f = read_gguf(out)
    assert {t.qtype for t in f.tensors.values() if hasattr(t, "qtype")} == {"Q8_0"}


@pytest.mark.model
def test_export_compressed_tensors_folder(tmp_path):
    from safetensors import safe_open

    out = tmp_path / "ct"
    assert main(["export", "--format", "compressed-tensors", "--recipe", '{"model.layers.0.mlp.*": "int4-g64-asym-minmax"}',
                 "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "model.layers.0.mlp.up_proj.weight_packed" in f.keys()


def test_sweep_backend_flags_reach_run_sweep(tmp_path, monkeypatch, capsys):
    """--backend/--address/--cpus-per-task/--gpus-per-task/--max-retries go to run_sweep as they are; an
    --address without --backend ray is refused with run_sweep's message."""
    import pandas as pd

    from qlab.eval import sweep

    seen = {}

    def fake_run_sweep(configs, protocol, results, **kw):
        seen.update(kw, configs=configs, n_windows=protocol.n_windows)
        sweep._check_backend(kw["backend"], kw["address"], kw["cpus_per_task"], kw["gpus_per_task"], kw["max_retries"])
        return pd.DataFrame([{"label": "a", "quantized_bpw": 8.2, "ppl": 10.0, "kl_mean": 0.01, "top1": 0.9}])

    monkeypatch.setattr(sweep, "run_sweep", fake_run_sweep)
    configs = tmp_path / "configs.json"
    configs.write_text(json.dumps([{"label": "a", "recipe": {"model.layers.*": "int8"}}]))
    common = ["sweep", str(configs), "--results", str(tmp_path / "r"), "--out", str(tmp_path / "t.csv"), "--n-windows", "3"]
    assert main(common + ["--backend", "ray", "--address", "ray://head:10001", "--cpus-per-task", "2",
                          "--max-retries", "0"]) == 0
    assert seen == {"backend": "ray", "address": "ray://head:10001", "cpus_per_task": 2.0, "gpus_per_task": None,
                    "max_retries": 0, "configs": [{"label": "a", "recipe": {"model.layers.*": "int8"}}], "n_windows": 3}
    assert main(common) == 0 and seen["backend"] == "local" and seen["address"] is None
    assert main(common + ["--address", "auto"]) == 2
    assert "address= joins a Ray cluster: pass backend='ray'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(common + ["--backend", "dask"])
