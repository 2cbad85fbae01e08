"""xgrammar's view of the model's tokenizer, shared by the compile workers and the matchers.

Compiling happens in :mod:`heteroserve.core.grammar.compile_pool` (worker processes); the
engine process rebuilds compiled grammars in :mod:`heteroserve.core.grammar.matcher`.
"""

from __future__ import annotations

from typing import Any


def tokenizer_info(tokenizer: Any, vocab_size: int) -> Any:
    """xgrammar's ``TokenizerInfo`` for a Hugging Face tokenizer, padded to the model's
    vocab size (the logits' width)."""
    import xgrammar as xgr

    return xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
