"""Grammar compilation, matchers and masking, driven by random logits (no model needed).

Random logits emit garbage unless constrained, so every output parsing is real evidence.
"""

from __future__ import annotations

import json
import re
import time
import zlib
from pathlib import Path

import jsonschema
import pytest
import torch

from heteroserve.core.grammar.compile_pool import CompileLimits, GrammarCompilePool
from heteroserve.core.grammar.compiler import tokenizer_info
from heteroserve.core.grammar.matcher import BitmaskFiller, GrammarMatcher
from heteroserve.core.grammar.spec import GrammarError, GrammarSpec, spec_from_sampling_params
from heteroserve.core.models.tiny import build_tokenizer

from grammar_schemas import SCHEMAS

VOCAB = 512


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer(path, vocab_size=VOCAB)
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


class _Compiler:
    """The compile pool behind a blocking call, as the tests drive it."""

    def __init__(self, pool: GrammarCompilePool) -> None:
        self.pool = pool

    def compile(self, spec: GrammarSpec, timeout: float = 30) -> str:
        return self.pool.submit(spec).result(timeout=timeout + 60)


@pytest.fixture(scope="module")
def service(tokenizer_dir: Path):
    pool = GrammarCompilePool(str(tokenizer_dir), VOCAB, CompileLimits(timeout=30), workers=1)
    yield _Compiler(pool)
    pool.shutdown()


def _apply_mask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    from heteroserve.platforms.cpu.bitmask import apply_token_bitmask

    apply_token_bitmask(logits, bitmask, torch.tensor(rows, dtype=torch.int64))


def _closing_bias(tokenizer) -> torch.Tensor:
    """A "model" that likes to close brackets and stop, so unbounded grammars terminate."""
    bias = torch.zeros(VOCAB)
    for tok, i in tokenizer.get_vocab().items():
        if i < VOCAB and (i == tokenizer.eos_token_id or any(c in tok for c in "}]\"")):
            bias[i] = 6.0
    return bias


def _constrained_decode(service, tokenizer, spec: GrammarSpec, seed: int,
                        max_tokens: int = 160, bias: torch.Tensor | None = None) -> str:
    info = tokenizer_info(tokenizer, VOCAB)
    matcher = GrammarMatcher(service.compile(spec, timeout=30), info,
                             json_output=spec.kind in ("json_schema", "json_object"))
    gen = torch.Generator().manual_seed(seed)
    filler = BitmaskFiller()
    out: list[int] = []
    for _ in range(max_tokens):
        filler.start([matcher], VOCAB)
        logits = torch.randn((1, VOCAB), generator=gen) * 3
        if bias is not None:
            logits += bias
        bitmask, rows = filler.result()
        _apply_mask(logits, bitmask, rows)
        token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        assert matcher.accept(token), "a masked sampler produced an illegal token"
        if matcher.is_terminated():
            break
        out.append(token)
    else:
        pytest.fail(f"{spec.kind} did not terminate within {max_tokens} tokens")
    return tokenizer.decode(out)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_outputs_validate(service, tokenizer, name: str) -> None:
    schema = SCHEMAS[name]
    text = _constrained_decode(service, tokenizer, GrammarSpec("json_schema", json.dumps(schema)),
                               seed=zlib.crc32(name.encode()) % 1000)
    jsonschema.validate(json.loads(text), schema,
                        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def test_json_object_and_regex_and_choice_and_ebnf(service, tokenizer) -> None:
    for seed in range(3):
        json.loads(_constrained_decode(service, tokenizer, GrammarSpec("json_object", ""), seed,
                                       bias=_closing_bias(tokenizer)))
        pattern = r"(yes|no)-[0-9]{1,3}"
        text = _constrained_decode(service, tokenizer, GrammarSpec("regex", pattern), seed)
        assert re.fullmatch(pattern, text), text
        choices = ["alpha", "beta", "gamma delta"]
        text = _constrained_decode(service, tokenizer, GrammarSpec("choice", json.dumps(choices)),
                                   seed)
        assert text in choices
        ebnf = 'root ::= "(" num ("," num)* ")"\nnum ::= [0-9]+'
        text = _constrained_decode(service, tokenizer, GrammarSpec("ebnf", ebnf), seed)
        assert re.fullmatch(r"\([0-9]+(,[0-9]+)*\)", text), text


@pytest.mark.parametrize("spec, needle", [
    (GrammarSpec("regex", "a(b"), "parenthesis"),
    (GrammarSpec("json_schema", '{"type": 5}'), "Type should be a string"),
    (GrammarSpec("json_schema", "{not json"), "invalid JSON schema"),
    (GrammarSpec("ebnf", "root ::= foo"), "not defined"),
    (GrammarSpec("choice", "[]"), "non-empty"),
])
def test_invalid_grammars_raise_with_xgrammars_message(service, spec, needle) -> None:
    with pytest.raises(GrammarError, match=needle):
        service.compile(spec, timeout=30)


def test_slow_or_huge_compiles_are_killed_and_the_pool_recovers(tokenizer_dir: Path) -> None:
    """A schema that compiles too long is stopped at the limit (its worker killed, its memory
    returned); one over the size cap is refused before compiling; the pool then still
    compiles; results are cached within the byte limit."""
    limits = CompileLimits(timeout=1.0, max_spec_bytes=200_000, cache_bytes=1 << 20)
    pool = GrammarCompilePool(str(tokenizer_dir), VOCAB, limits, workers=1)
    try:
        assert pool.submit(GrammarSpec("regex", "[0-9]+")).result(120)  # worker started
        props = {f"p{i}": {"type": "string"} for i in range(2000)}
        huge = json.dumps({"type": "object", "properties": props, "required": list(props)})
        started = time.monotonic()
        with pytest.raises(GrammarError, match="longer than 1s"):
            pool.submit(GrammarSpec("json_schema", huge)).result(120)
        assert time.monotonic() - started < 30
        with pytest.raises(GrammarError, match="larger than 200000 bytes"):
            pool.submit(GrammarSpec("regex", "a" * 200_001))
        again = pool.submit(GrammarSpec("regex", "x[0-9]"))
        assert again.result(120) and pool.cache_bytes <= limits.cache_bytes
        assert pool.submit(GrammarSpec("regex", "x[0-9]")).done()  # from the cache
    finally:
        pool.shutdown()


@pytest.mark.parametrize("prestart", [True, False])
def test_prestarted_workers_are_ready_before_the_first_compile(tokenizer_dir: Path,
                                                               prestart: bool) -> None:
    """``start()`` with ``prestart``: each worker's process starts (and says ready) before any
    job, so the first compile does not pay the start; without it, none starts before a
    compile. Shutdown reaps a process either way."""
    pool = GrammarCompilePool(str(tokenizer_dir), VOCAB, CompileLimits(timeout=30), workers=1,
                              prestart=prestart)
    worker = pool._workers[0]
    try:
        pool.start()
        if prestart:
            assert worker.prestarted.wait(120)
            assert worker.proc is not None and worker.proc.poll() is None
        else:
            time.sleep(1.0)
            assert worker.proc is None and not worker.prestarted.is_set()
        assert pool.submit(GrammarSpec("regex", "[0-9]+")).result(120)
    finally:
        pool.shutdown()
    assert worker.proc is None or worker.proc.poll() is not None


def test_spec_from_sampling_params() -> None:
    assert spec_from_sampling_params({"temperature": 1.0}) is None
    assert spec_from_sampling_params({"json_schema": {"type": "integer"}}).text == '{"type": "integer"}'
    assert spec_from_sampling_params({"regex": "a+"}).kind == "regex"
    with pytest.raises(GrammarError, match="only one"):
        spec_from_sampling_params({"regex": "a", "ebnf": "root ::= \"a\""})


def test_unconstrained_rows_untouched(service, tokenizer) -> None:
    info = tokenizer_info(tokenizer, VOCAB)
    m = GrammarMatcher(service.compile(GrammarSpec("regex", "[0-9]+"), 30), info)
    filler = BitmaskFiller()
    filler.start([None, m, None], VOCAB)
    bitmask, rows = filler.result()
    assert rows == [1]
    logits = torch.randn(3, VOCAB)
    before = logits.clone()
    _apply_mask(logits, bitmask, rows)
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert allowed and all(tokenizer.decode([t]).isdigit() for t in allowed)
