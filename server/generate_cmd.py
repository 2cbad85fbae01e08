"""``heteroserve generate``: run prompts through an in-process engine and print the outputs."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from heteroserve.server.args import add_server_args, server_args_from_namespace

# sampling flags -> SGLang sampling-parameter names (only flags given are sent)
_SAMPLING_FLAGS = ("max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "min_p",
                   "repetition_penalty", "frequency_penalty", "presence_penalty", "seed",
                   "stop", "ignore_eos", "n")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``generate`` subcommand."""
    p = sub.add_parser("generate", help="generate text for prompts with an in-process engine")
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                   help="a prompt (repeat for a batch)")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user message with the model's chat template")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--stream", action="store_true", help="print tokens as they arrive (one prompt)")
    p.add_argument("--json", action="store_true", help="print one JSON object per output")
    p.add_argument("--return-logprob", action="store_true")
    p.add_argument("--top-logprobs-num", type=int, default=0)
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--min-new-tokens", type=int, default=None,
                   help="tokens before EOS, stop tokens or stop strings may end the output")
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--frequency-penalty", type=float, default=None)
    g.add_argument("--presence-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", default=None)
    g.add_argument("--n", type=int, default=None, help="choices per prompt")
    add_server_args(p)
    p.set_defaults(run=run)


def sampling_params_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling-parameter dict for the flags the user gave."""
    return {name: getattr(args, name) for name in _SAMPLING_FLAGS
            if getattr(args, name, None) is not None}


def _check_sampling_params(params: dict[str, Any]) -> None:
    """Fail before the engine starts when the sampling flags are invalid."""
    from heteroserve.core.scheduler.sampling_params import SamplingParams

    try:  # the vocabulary is not known yet: token-id checks wait for admission
        SamplingParams.from_dict({k: v for k, v in params.items() if k != "n"}).validate(2 ** 31)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid sampling params: {exc}") from None


def _prompts(engine: Any, args: argparse.Namespace) -> list[str]:
    if not args.chat:
        return list(args.prompt)
    out = []
    for prompt in args.prompt:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt})
        out.append(engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    return out


def _print_output(i: int, prompt: str, out: dict[str, Any], as_json: bool, chat: bool) -> None:
    meta = out["meta_info"]
    if as_json:
        print(json.dumps({"prompt_index": i, "prompt": prompt, "chat": chat, **out}, default=str))
        return
    print(f"=== [{i}] {prompt!r}" + (" (chat template applied)" if chat else ""))
    print(out["text"])
    print(f"--- finish={meta['finish_reason']} prompt_tokens={meta['prompt_tokens']} "
          f"completion_tokens={meta['completion_tokens']} cached_tokens={meta['cached_tokens']} "
          f"latency={meta.get('e2e_latency', 0.0):.3f}s")


def run(args: argparse.Namespace) -> int:
    """Start an engine, generate for every ``--prompt``, print, shut down. Returns 0."""
    from heteroserve.core.engine import Engine

    server_args = server_args_from_namespace(args)
    params = sampling_params_from_args(args)
    _check_sampling_params(params)
    kwargs = {k: v for k, v in vars(server_args).items() if k not in ("model_path", "platform")}
    kwargs["lazy_grammar_workers"] = True  # no flag here asks for a structured output
    with Engine(server_args.model_path, server_args.platform, **kwargs) as engine:
        prompts = _prompts(engine, args)
        if args.stream:
            if len(prompts) != 1:
                raise ValueError("--stream takes a single --prompt")
            printed = 0
            last: dict[str, Any] = {}
            for chunk in engine.generate(prompts[0], params, stream=True,
                                         return_logprob=args.return_logprob,
                                         top_logprobs_num=args.top_logprobs_num):
                sys.stdout.write(chunk["text"][printed:])
                sys.stdout.flush()
                printed = len(chunk["text"])
                last = chunk
            print()
            if args.json:
                print(json.dumps(last, default=str))
            return 0
        outs = engine.generate(prompts, params, return_logprob=args.return_logprob,
                               top_logprobs_num=args.top_logprobs_num)
        per_prompt = max(1, len(outs) // len(prompts))
        for j, out in enumerate(outs):
            _print_output(j // per_prompt, args.prompt[j // per_prompt], out, args.json,
                          args.chat)
    return 0
