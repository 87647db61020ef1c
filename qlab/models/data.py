"""Evaluation and calibration text: WikiText-2 raw, split by document, cut into token windows.

Where the text comes from (first match wins):

1. an explicit ``path`` argument;
2. the ``QLAB_DATA`` environment variable (a path to ``wiki.test.raw``);
3. ``../shared/data/wikitext-2-raw/wiki.test.raw`` relative to the repository root;
4. the ``datasets`` library (``Salesforce/wikitext``, ``wikitext-2-raw-v1``, test split) when online.

Line endings are normalised (CRLF -> LF). The test file holds 62 Wikipedia articles, each
starting with a level-1 heading line `` = Title = ``. Calibration text must never overlap
evaluation text, so :func:`split_documents` draws whole articles (seeded) for calibration and
keeps the rest, in their original order, for evaluation.

Windows follow the GPTQ protocol: tokenize the joined text once (no BOS token), cut it into
non-overlapping windows of ``seq_len`` tokens, drop the ragged tail. On the full test split
with the SmolLM2 tokenizer that is 301,948 tokens -> 589 windows of 512.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from qlab.models import REPO_ROOT

DEFAULT_WIKITEXT = REPO_ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
_ARTICLE_HEADING = re.compile(r"^ = [^=].* = $", re.MULTILINE)


def wikitext2_path(path: str | os.PathLike | None = None) -> Path | None:
    """The local ``wiki.test.raw`` to use, or ``None`` if there is none."""
    for candidate in (path, os.environ.get("QLAB_DATA"), DEFAULT_WIKITEXT):
        if candidate is None:
            continue
        candidate = Path(candidate)
        if candidate.exists():
            return candidate
        if candidate != DEFAULT_WIKITEXT:
            raise ValueError(f"WikiText-2 file {candidate} does not exist")
    return None


def load_wikitext2(path: str | os.PathLike | None = None) -> str:
    """The raw WikiText-2 test text with LF line endings (1,285,622 characters)."""
    local = wikitext2_path(path)
    if local is not None:
        text = local.read_bytes().decode("utf-8")
    else:  # online fallback
        from datasets import load_dataset

        rows = load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="test")["text"]  # one row per line
        text = "".join(rows)
    return text.replace("\r\n", "\n")


def documents(text: str) -> list[str]:
    """Cut text at level-1 headings (`` = Title = ``) into articles.

    The pieces are exact substrings: ``"".join(documents(t)) == t``.
    """
    starts = [m.start() for m in _ARTICLE_HEADING.finditer(text)]
    if not starts or starts[0] != 0:
        starts = [0] + starts
    bounds = starts + [len(text)]
    return [text[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


@dataclass(frozen=True)
class TextSplit:
    """Calibration and evaluation text drawn from disjoint sets of documents."""

    calibration: str
    evaluation: str
    calibration_docs: tuple[int, ...]
    evaluation_docs: tuple[int, ...]
    seed: int

    def describe(self) -> str:
        return (
            f"WikiText-2 test, seed {self.seed}: {len(self.calibration_docs)} articles "
            f"({len(self.calibration):,} chars) for calibration, {len(self.evaluation_docs)} "
            f"articles ({len(self.evaluation):,} chars) for evaluation"
        )


def split_documents(text: str, n_calibration: int = 8, seed: int = 0) -> TextSplit:
    """Draw ``n_calibration`` whole articles (seeded) for calibration; the rest evaluate.

    Each part keeps its articles in their original order, so ``n_calibration=0`` gives
    the whole test split as evaluation text.
    """
    docs = documents(text)
    if not 0 <= n_calibration < len(docs):
        raise ValueError(f"n_calibration must be in [0, {len(docs)}), got {n_calibration}")
    calib = sorted(random.Random(seed).sample(range(len(docs)), n_calibration))
    evals = [i for i in range(len(docs)) if i not in set(calib)]
    return TextSplit(
        calibration="".join(docs[i] for i in calib),
        evaluation="".join(docs[i] for i in evals),
        calibration_docs=tuple(calib),
        evaluation_docs=tuple(evals),
        seed=seed,
    )


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """1-D tensor of token ids for ``text``, without BOS/EOS."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_windows(
    tokens: torch.Tensor, seq_len: int, n_windows: int | None = None, pick: str = "first"
) -> torch.Tensor:
    """Non-overlapping windows ``[n, seq_len]`` of a 1-D token tensor.

    Window ``i`` is ``tokens[i*seq_len : (i+1)*seq_len]``; the ragged tail is dropped.
    ``n_windows`` keeps a subset: ``pick="first"`` the first ones (like llama.cpp's
    ``--chunks``), ``pick="spread"`` evenly spaced ones ``floor(k * total / n)``.

    >>> token_windows(torch.arange(10), 3).tolist()
    [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    >>> token_windows(torch.arange(10), 3, 2, pick="spread").tolist()
    [[0, 1, 2], [3, 4, 5]]
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    total = tokens.numel() // seq_len
    windows = tokens[: total * seq_len].view(total, seq_len)
    if n_windows is None:
        return windows
    if not 0 < n_windows <= total:
        raise ValueError(f"n_windows must be in [1, {total}], got {n_windows}")
    if pick == "first":
        return windows[:n_windows]
    if pick == "spread":
        return windows[[k * total // n_windows for k in range(n_windows)]]
    raise ValueError(f"pick must be 'first' or 'spread', got {pick!r}")


def wikitext2_windows(
    tokenizer,
    part: str = "evaluation",
    seq_len: int = 512,
    n_windows: int | None = None,
    pick: str = "first",
    n_calibration: int = 8,
    seed: int = 0,
    path: str | os.PathLike | None = None,
) -> torch.Tensor:
    """Token windows of one part of WikiText-2 test: ``"evaluation"``, ``"calibration"``,
    or ``"all"`` (the whole test split, as in the usual published perplexities)."""
    text = load_wikitext2(path)
    if part == "all":
        chosen = text
    elif part in ("evaluation", "calibration"):
        chosen = getattr(split_documents(text, n_calibration, seed), part)
    else:
        raise ValueError(f"part must be 'evaluation', 'calibration' or 'all', got {part!r}")
    return token_windows(tokenize(tokenizer, chosen), seq_len, n_windows, pick)
