"""`retriever <stage>`: one subcommand per stage, each a thin shell over a library function.

Heavy libraries are imported inside the commands so `retriever --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from retriever.config import ConfigError, load_config
from retriever.registry import Registry

Command = Callable[[argparse.Namespace], int]
COMMANDS: Registry[tuple[str, Callable[[argparse.ArgumentParser], None], Command]] = Registry("command")


def command(name: str, help_text: str, configure: Callable[[argparse.ArgumentParser], None]):
    def add(func: Command) -> Command:
        COMMANDS.add(name, (help_text, configure, func))
        return func

    return add


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="experiment YAML (e.g. configs/quickstart.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-4")


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


# --------------------------------------------------------------------------------------------------- backbones
@command("backbones", "list the backbone presets with their parameter counts", lambda p: None)
def _backbones(args: argparse.Namespace) -> int:
    from retriever.models.backbone import BACKBONES, build_meta_model, count_parameters

    for name, preset in BACKBONES.items():
        params = count_parameters(build_meta_model(name))
        source = preset.hub_id or "random init (seeded)"
        print(f"{name:14s} {preset.kind:6s} {params:>15,d}  {source}")
    return 0


# --------------------------------------------------------------------------------------------------- convert
def _convert_args(parser: argparse.ArgumentParser) -> None:
    formats = parser.add_subparsers(dest="format", required=True)
    llama2c = formats.add_parser("llama2c", help="llama2.c checkpoint + tokenizer → HF LlamaForCausalLM directory")
    llama2c.add_argument("checkpoint", type=Path, help="llama2.c model .bin (legacy format)")
    llama2c.add_argument("tokenizer", type=Path, help="llama2.c tokenizer .bin (e.g. tok512.bin)")
    llama2c.add_argument("out_dir", type=Path, help="output directory (HF format)")


@command("convert", "import external model formats as Hugging Face models", _convert_args)
def _convert(args: argparse.Namespace) -> int:
    from retriever.models.llama2c import convert_llama2c

    out = convert_llama2c(args.checkpoint, args.tokenizer, args.out_dir)
    print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------------------------------- plan
def _plan_args(parser: argparse.ArgumentParser) -> None:
    _config_args(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output")


@command("plan", "print the FLOP-budget plan of every sweep cell", _plan_args)
def _plan(args: argparse.Namespace) -> int:
    from retriever.flops import format_plan, plan_grid, plan_to_json

    cfg = load_config(args.config, args.overrides)
    cells = plan_grid(cfg)
    if args.json:
        _print_json(plan_to_json(cells))
    else:
        print(format_plan(cells))
    return 0


# --------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retriever", description="Scaling sparse and dense retrievers built on decoder-only LLMs, on Ray."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, configure, func) in COMMANDS.items():
        child = sub.add_parser(name, help=help_text, description=help_text)
        configure(child)
        child.set_defaults(func=func)
    return parser


# Errors that describe bad input (what, where, how to fix): printed without a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, ValueError, KeyError, RuntimeError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        if os.environ.get("RETRIEVER_DEBUG"):
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
