"""`ragtune prompt render`: format a request exactly as an adapter was trained (its `prompt.json`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_contexts(path: str) -> list[dict[str, str]]:
    """Contexts as JSONL (`{"id", "text"}` per line) or one JSON array; errors name file:line."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{exc.lineno}: not JSON: {exc.msg}") from None
        numbered = list(enumerate(rows, 1))
    else:
        numbered = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    numbered.append((n, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not JSON: {exc.msg}") from None
    contexts = []
    for n, row in numbered:
        if not isinstance(row, dict) or row.get("id") is None or row.get("text") is None:
            raise ValueError(f"{path}:{n}: a context must be an object with 'id' and 'text'")
        contexts.append({"id": str(row["id"]), "text": str(row["text"])})
    return contexts


def _cmd_render(args: argparse.Namespace) -> int:
    from .prompt import PromptContract

    try:
        contract = PromptContract.load(args.prompt) if args.prompt else PromptContract()
        contexts = read_contexts(args.contexts) if args.contexts else []
        messages = contract.messages(question=args.question, contexts=contexts)
        if args.tokenizer_config:
            from ragtune.pods.online_eval import render_prompt

            config = json.loads(Path(args.tokenizer_config).read_text(encoding="utf-8"))
            template = config.get("chat_template")
            if not template:
                raise ValueError(f"{args.tokenizer_config}: no chat_template")
            specials = {k: config[k] for k in ("bos_token", "eos_token") if isinstance(config.get(k), str)}
            sys.stdout.write(render_prompt(template, specials, messages))
            return 0
    except (OSError, ValueError) as exc:
        print(f"ragtune prompt render: {exc}", file=sys.stderr)
        return 2
    json.dump({"messages": messages}, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


def add_commands(sub) -> None:
    prompt = sub.add_parser("prompt", help="the prompt contract an adapter was trained with")
    psub = prompt.add_subparsers(dest="prompt_command", metavar="COMMAND", required=True)
    render = psub.add_parser(
        "render", help="format a question and its contexts as the adapter was trained",
        description="Prints the chat messages (JSON, for /v1/chat/completions) or, with --tokenizer-config, "
                    "the prompt text in the adapter's chat template (for /v1/completions or TGI /generate).")
    render.add_argument("--prompt", help="the run's adapter/prompt.json (default: ragtune's default prompt)")
    render.add_argument("--question", required=True)
    render.add_argument("--contexts", help="JSONL file of {id, text} (or a JSON array)")
    render.add_argument("--tokenizer-config", help="the adapter's tokenizer_config.json: print the templated text")
    render.set_defaults(func=_cmd_render)
