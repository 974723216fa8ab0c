"""The `sterling` command line.

Each subcommand lives in its own module under `sterling.launch` and exposes
``register(subparsers)``; the module list below is the whole CLI. A module
whose optional dependencies are missing is skipped with a note in `--help`
rather than breaking every other command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "build_parser", "DefaultsHelpFormatter"]

# One module per subcommand; a module that does not exist yet is skipped.
_COMMAND_MODULES: tuple[str, ...] = (
    "sterling.launch.demo_cmd",
    "sterling.launch.build_cmd",
    "sterling.launch.query_cmd",
    "sterling.launch.plan_cmd",
    "sterling.launch.retier_cmd",
    "sterling.launch.shard_cmd",
    "sterling.launch.serve_cmd",
    "sterling.launch.update_cmd",
    "sterling.launch.launch_cmd",
    "sterling.launch.bench_cmd",
    "sterling.launch.train_cmd",
    "sterling.launch.eval_cmd",
)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to every option whose default is a value (not None, False or suppressed)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if "%(default)" in text or d is None or d is False or d == argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _all_parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _all_parsers(child)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sterling")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sterling",
        description="Sterling: recommendation retrieval as one PyTorch model.",
    )
    parser.add_argument("--version", action="version", version=f"sterling {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is not None and e.name.startswith("sterling."):
                continue  # command not built yet
            raise
        module.register(sub)
    for p in _all_parsers(parser):
        p.formatter_class = DefaultsHelpFormatter
        for a in p._actions:  # an option without help text would hide its default
            if a.option_strings and a.help is None:
                a.help = a.dest.replace("_", " ")
    return parser


def main(argv: list[str] | None = None) -> int:
    from sterling.model.errors import SterlingError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except SterlingError as e:
        print(f"sterling {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
