"""Tokenizer loading, chat templates, incremental detokenization and stop strings."""

from heteroserve.core.tokenizer.detokenizer import IncrementalDetokenizer
from heteroserve.core.tokenizer.loader import Tokenizer, TokenizerError, load_tokenizer
from heteroserve.core.tokenizer.stop import StopStringMatcher

__all__ = ["IncrementalDetokenizer", "StopStringMatcher", "Tokenizer", "TokenizerError",
           "load_tokenizer"]
