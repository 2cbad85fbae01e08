"""A word-level tokenizer for benchmarks on dummy-weight models of real vocabulary sizes.

Every id decodes to a whole word (``w123``; id 0 is ``<eos>``), so each generated token
yields text and a streamed reply shows one text chunk per token, as a real tokenizer mostly
does. (A small tokenizer next to a 128k-vocabulary model would decode most generated ids to
nothing, and a streaming benchmark would then count only the rare chunks with text.)

    python benchmarks/word_tokenizer.py OUT_DIR --vocab-size 128256
"""

from __future__ import annotations

import argparse
from pathlib import Path


def build_word_tokenizer(out_dir: str | Path, vocab_size: int) -> Path:
    """Write the tokenizer (``tokenizer.json`` and its config) to ``out_dir``; returns it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--vocab-size", type=int, default=128256)
    args = parser.parse_args()
    print(build_word_tokenizer(args.out_dir, args.vocab_size))


if __name__ == "__main__":
    main()
