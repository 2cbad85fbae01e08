"""``python -m heteroserve.core.grammar.compile_worker``: one grammar-compiling process.

Protocol on stdin/stdout, each message a 4-byte big-endian length then a pickle: first
``(tokenizer_path, vocab_size)``; then any number of :class:`~heteroserve.core.grammar.spec.
GrammarSpec`, each answered with ``("ok", serialised grammar)`` or ``("error", message)``.
The parent kills this process to stop a compile that runs too long or grows too large.
"""

from __future__ import annotations

import json
import pickle
import struct
import sys
from typing import Any, BinaryIO


def read_message(stream: BinaryIO) -> Any:
    """The next message, or raises ``EOFError`` when the stream ends."""
    head = stream.read(4)
    if len(head) < 4:
        raise EOFError
    size = struct.unpack(">I", head)[0]
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return pickle.loads(data)


def write_message(stream: BinaryIO, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack(">I", len(data)) + data)
    stream.flush()


def compile_spec(compiler: Any, spec: Any) -> str:
    """xgrammar's serialised grammar for ``spec``. Raises ``GrammarError``."""
    from heteroserve.core.grammar.spec import GrammarError, choice_to_ebnf

    try:
        if spec.kind == "json_schema":
            json.loads(spec.text)
            compiled = compiler.compile_json_schema(spec.text, any_whitespace=False)
        elif spec.kind == "json_object":
            compiled = compiler.compile_builtin_json_grammar()
        elif spec.kind == "regex":
            compiled = compiler.compile_regex(spec.text)
        elif spec.kind == "ebnf":
            compiled = compiler.compile_grammar(spec.text)
        else:
            compiled = compiler.compile_grammar(choice_to_ebnf(json.loads(spec.text)))
    except json.JSONDecodeError as exc:
        raise GrammarError(f"invalid JSON schema: {exc}") from None
    except GrammarError:
        raise
    except Exception as exc:  # xgrammar raises RuntimeError/ValueError with its message
        text = str(exc).strip()
        message = text.splitlines()[-1] if text else type(exc).__name__
        raise GrammarError(f"invalid {spec.kind}: {message}") from None
    return compiled.serialize_json()


def main() -> None:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but protocol messages on the real stdout
    import xgrammar as xgr

    from heteroserve.core.grammar.compiler import tokenizer_info
    from heteroserve.core.tokenizer import load_tokenizer

    path, vocab_size, trust_remote_code = read_message(stdin)
    info = tokenizer_info(load_tokenizer(path, trust_remote_code=trust_remote_code).hf,
                          vocab_size)
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    write_message(stdout, ("ready", None))
    while True:
        try:
            spec = read_message(stdin)
        except EOFError:
            return
        try:
            write_message(stdout, ("ok", compile_spec(compiler, spec)))
        except Exception as exc:
            write_message(stdout, ("error", str(exc) or type(exc).__name__))


if __name__ == "__main__":
    main()
