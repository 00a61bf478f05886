"""The `ragtune` command line.

Each area of the project contributes its own subcommands through an `add_commands(subparsers)`
function, imported lazily so that `ragtune crds` works without torch and `ragtune train` works
without kopf.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# module that provides `add_commands(subparsers)` -> the extra it needs (for the error message)
_COMMAND_MODULES = {
    "ragtune_trainer.cli": "trainer",  # train, dataset validate, models prepare, eval
    "ragtune_local.cli": "dev",  # dev up / down / status / build
    "ragtune.pods.cli": "operator",  # adapters fetch, eval online (the pods' entry points)
    "ragtune.rag.cli": "base",  # prompt render
    "ragtune.operator": "operator",  # operator run
}


def _cmd_crds(args: argparse.Namespace) -> int:
    from ragtune.api.crdgen import build_crds, render

    failures = 0
    for out in args.out:
        out = Path(out)
        for name, crd in build_crds().items():
            path = out / name
            text = render(crd)
            if args.check:
                if not path.exists() or path.read_text() != text:
                    print(f"{path}: differs from the API models; run `make crds`", file=sys.stderr)
                    failures += 1
                continue
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    return 1 if failures else 0


def _cmd_docs(args: argparse.Namespace) -> int:
    from ragtune.api.docgen import render_reference

    path, text = Path(args.out), render_reference()
    if args.check:
        if not path.exists() or path.read_text() != text:
            print(f"{path}: differs from the API models; run `make crds`", file=sys.stderr)
            return 1
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ragtune",
        description="Fine-tune RAG generators and roll LoRA adapters into TGI behind evaluation gates.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    crds = sub.add_parser("crds", help="generate the CRDs from the API models")
    crds.add_argument("--out", action="append", default=None,
                      help="output directory (repeatable; default: crds/ and charts/ragtune/crds/)")
    crds.add_argument("--check", action="store_true", help="fail if the files differ instead of writing")
    crds.set_defaults(func=_cmd_crds)

    docs = sub.add_parser("docs", help="generate the API reference (docs/api-reference.md) from the models")
    docs.add_argument("--out", default="docs/api-reference.md")
    docs.add_argument("--check", action="store_true", help="fail if the file differs instead of writing")
    docs.set_defaults(func=_cmd_docs)

    for module_name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Only hide the area when the *module itself* is absent (slim image), not a bug inside it.
            if exc.name and (module_name.startswith(exc.name) or exc.name in module_name):
                continue
            raise
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "crds" and args.out is None:
        args.out = ["crds", "charts/ragtune/crds"]
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
