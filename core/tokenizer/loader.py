"""Load a Hugging Face tokenizer from a local folder and wrap what the engine needs from it.

Loading never touches the network (``local_files_only=True``), so it behaves the same with
``HF_HUB_OFFLINE=1`` and on air-gapped machines.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class TokenizerError(ValueError):
    """A tokenizer cannot be loaded or cannot do what was asked (one-line message)."""


class Tokenizer:
    """A thin wrapper around a transformers tokenizer.

    ``hf`` is the underlying ``PreTrainedTokenizerBase``. Token ids are plain ``int``.
    ``eos_token_ids`` is the set of ids that end generation by default (the tokenizer's EOS
    plus any ``eos_token_id`` listed in the model's ``generation_config.json`` / ``config.json``).
    """

    def __init__(self, hf: Any, path: str, extra_eos: Sequence[int] = ()) -> None:
        self.hf = hf
        self.path = path
        eos = {int(i) for i in extra_eos}
        if hf.eos_token_id is not None:
            eos.add(int(hf.eos_token_id))
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        self.vocab_size: int = len(hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (BOS added when the tokenizer adds one and
        ``add_special_tokens``)."""
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; invalid or partial UTF-8 decodes to U+FFFD."""
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens,
                              clean_up_tokenization_spaces=False)

    def id_to_text(self, token_id: int) -> str:
        """Text of one token decoded alone (used for logprob entries)."""
        return self.hf.decode([int(token_id)], skip_special_tokens=False,
                              clean_up_tokenization_spaces=False)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def apply_chat_template(self, messages: Sequence[dict[str, Any]],
                            add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render ``messages`` (``[{"role", "content"}, ...]``) with the model's chat template
        and return the prompt text (encode it with ``add_special_tokens=False``).

        Extra ``kwargs`` (``tools``, ``enable_thinking``...) reach the template. Raises
        :class:`TokenizerError` when the model has no chat template or rendering fails.
        """
        if not self.has_chat_template:
            raise TokenizerError(f"the tokenizer at {self.path} has no chat template; "
                                 "send a plain prompt instead of chat messages")
        try:
            text = self.hf.apply_chat_template(list(messages), tokenize=False,
                                               add_generation_prompt=add_generation_prompt,
                                               **kwargs)
        except Exception as exc:  # jinja errors carry the template's own message
            raise TokenizerError(f"chat template failed: {exc}") from None
        if not isinstance(text, str):
            raise TokenizerError("chat template did not render to text")
        return text


def _generation_eos(path: Path) -> list[int]:
    import json

    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        f = path / name
        if not f.exists():
            continue
        try:
            value = json.loads(f.read_text()).get("eos_token_id")
        except (OSError, ValueError):
            continue
        if isinstance(value, int):
            ids.append(value)
        elif isinstance(value, list):
            ids += [int(v) for v in value if isinstance(v, int)]
    return ids


#: the longest ``--chat-template`` file or inline text accepted
MAX_CHAT_TEMPLATE_BYTES = 1 << 20


def resolve_chat_template(value: str) -> str:
    """The Jinja text of ``--chat-template``: the contents of the file ``value`` names, or
    ``value`` itself when it is inline Jinja (has ``{{`` or ``{%``). Raises
    :class:`TokenizerError` when it is neither, is over :data:`MAX_CHAT_TEMPLATE_BYTES`, or
    does not parse as Jinja."""
    path = Path(value).expanduser()
    if "{{" not in value and "{%" not in value:
        if not path.is_file():
            raise TokenizerError(f"--chat-template {value!r} is neither a file nor inline "
                                 "Jinja ({{ ... }} / {% ... %})")
        if path.stat().st_size > MAX_CHAT_TEMPLATE_BYTES:
            raise TokenizerError(f"--chat-template file {value} is over "
                                 f"{MAX_CHAT_TEMPLATE_BYTES} bytes")
        value = path.read_text(encoding="utf-8")
    if len(value.encode()) > MAX_CHAT_TEMPLATE_BYTES:
        raise TokenizerError(f"--chat-template is over {MAX_CHAT_TEMPLATE_BYTES} bytes")
    import jinja2

    try:
        jinja2.Environment().parse(value)
    except jinja2.TemplateSyntaxError as exc:
        raise TokenizerError(f"--chat-template does not parse: {exc.message} "
                             f"(line {exc.lineno})") from None
    return value


def load_tokenizer(path: str | os.PathLike[str], chat_template: str | None = None,
                   trust_remote_code: bool = False) -> Tokenizer:
    """Load the tokenizer in folder ``path`` (never downloads).

    ``chat_template`` (a file or inline Jinja, see :func:`resolve_chat_template`) replaces
    the tokenizer's own template. ``trust_remote_code`` lets transformers run a tokenizer
    class shipped in the folder. Raises :class:`TokenizerError` with one line when the folder
    or its tokenizer files are missing or unreadable, or the template is bad.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise TokenizerError(f"tokenizer folder {str(path)!r} does not exist")
    template = resolve_chat_template(chat_template) if chat_template else None
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                           trust_remote_code=trust_remote_code)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TokenizerError(f"cannot load a tokenizer from {folder}: {first}") from None
    if template is not None:
        hf.chat_template = template
    return Tokenizer(hf, str(folder), _generation_eos(folder))
