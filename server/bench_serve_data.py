"""Workloads for ``heteroserve bench serve``: what each request sends.

Every workload is deterministic for its seed and returns :class:`BenchPrompt` rows:

- ``random``: random text. With a tokenizer, ``input_len`` random non-special token ids
  decoded to text (the server re-tokenizes it, so its prompt length can differ a little);
  without one, ``input_len`` random lower-case words.
- ``random-ids``: ``input_len`` random token ids in ``[1, vocab_size)`` sent as a token-id
  prompt (``/v1/completions`` only): the server sees exactly ``input_len`` tokens.
- ``shared-prefix``: ``num_groups`` random-text prefixes of ``prefix_len`` tokens (words); each
  prompt is its group's prefix, a blank line, and ``input_len`` tokens (words) of its own.
- ``jsonl``: one JSON object per line with ``prompt`` (text or a list of token ids) and
  optionally ``output_len`` (or ``max_tokens``); the first ``num_prompts`` lines are used.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

DATASETS = ("random", "random-ids", "shared-prefix", "jsonl")


class TextTokenizer(Protocol):
    """What the text workloads need from a tokenizer (transformers' tokenizers fit)."""

    all_special_ids: list[int]

    def __len__(self) -> int: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class BenchPrompt:
    """One request's prompt: text or token ids; ``input_len`` is the intended prompt length in
    tokens (exact for token ids; the server's ``usage.prompt_tokens`` wins when it reports one);
    ``output_len`` is the request's ``max_tokens``."""

    prompt: str | list[int]
    input_len: int
    output_len: int


@dataclass(frozen=True)
class WorkloadSpec:
    """The workload options of ``heteroserve bench serve`` (see the module docstring)."""

    dataset: str = "random-ids"
    num_prompts: int = 64
    input_len: int = 128
    output_len: int = 64
    vocab_size: int = 500
    num_groups: int = 4
    prefix_len: int = 256
    dataset_path: str | None = None
    seed: int = 1


class _TextSource:
    """Random text of about ``n`` tokens: decoded random ids, or random words."""

    def __init__(self, rng: random.Random, tokenizer: TextTokenizer | None) -> None:
        self._rng = rng
        self._tok = tokenizer
        if tokenizer is not None:
            special = set(tokenizer.all_special_ids)
            self._ids = [i for i in range(len(tokenizer)) if i not in special]

    def text(self, n: int) -> str:
        if self._tok is not None:
            return self._tok.decode([self._rng.choice(self._ids) for _ in range(n)])
        letters = string.ascii_lowercase
        return " ".join("".join(self._rng.choices(letters, k=self._rng.randint(2, 7)))
                        for _ in range(n))


def _read_jsonl(path: str, n: int, output_len: int) -> list[BenchPrompt]:
    rows: list[BenchPrompt] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if len(rows) == n:
                break
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not JSON ({exc.msg})") from None
            prompt = obj.get("prompt") if isinstance(obj, dict) else None
            ids_ok = isinstance(prompt, list) and prompt and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt)
            if not (isinstance(prompt, str) and prompt) and not ids_ok:
                raise ValueError(f"{where}: 'prompt' must be a non-empty string or list of "
                                 "token ids")
            out = obj.get("output_len", obj.get("max_tokens", output_len))
            if not isinstance(out, int) or out < 1:
                raise ValueError(f"{where}: 'output_len' must be an integer >= 1")
            length = len(prompt) if isinstance(prompt, list) else len(prompt.split())
            rows.append(BenchPrompt(prompt, length, out))
    if not rows:
        raise ValueError(f"--dataset-path {path}: no prompts")
    return rows


def make_prompts(spec: WorkloadSpec, tokenizer: TextTokenizer | None = None
                 ) -> list[BenchPrompt]:
    """The prompts of ``spec`` (see the module docstring). Raises ``ValueError`` naming the
    option at fault."""
    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(spec, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if spec.dataset not in DATASETS:
        raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}")
    if spec.dataset == "jsonl":
        if not spec.dataset_path:
            raise ValueError("--dataset jsonl needs --dataset-path")
        return _read_jsonl(spec.dataset_path, spec.num_prompts, spec.output_len)
    rng = random.Random(spec.seed)
    if spec.dataset == "random-ids":
        if spec.vocab_size < 2:
            raise ValueError("--vocab-size must be >= 2")
        return [BenchPrompt([rng.randrange(1, spec.vocab_size) for _ in range(spec.input_len)],
                            spec.input_len, spec.output_len) for _ in range(spec.num_prompts)]
    source = _TextSource(rng, tokenizer)
    if spec.dataset == "random":
        return [BenchPrompt(source.text(spec.input_len), spec.input_len, spec.output_len)
                for _ in range(spec.num_prompts)]
    if spec.num_groups < 1 or spec.prefix_len < 1:
        raise ValueError("--num-groups and --prefix-len must be >= 1")
    prefixes = [source.text(spec.prefix_len) for _ in range(spec.num_groups)]
    return [BenchPrompt(prefixes[i % spec.num_groups] + "\n\n" + source.text(spec.input_len),
                        spec.prefix_len + spec.input_len, spec.output_len)
            for i in range(spec.num_prompts)]


def load_tokenizer_for_text(path: str | None) -> TextTokenizer | None:
    """transformers' tokenizer from local folder ``path`` (never downloads), or None."""
    if not path:
        return None
    if not Path(path).is_dir():
        raise ValueError(f"--tokenizer {path}: not a folder")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)
