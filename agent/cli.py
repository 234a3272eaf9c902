"""`planetlab-agent`: the node agent's command line.

Each group of subcommands lives in its own module and registers itself here, so
that the sliver debugging commands, the image commands and the agent's own
commands stay small and separate.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# Modules that contribute subcommands; each defines `register(subparsers)`.
# A module that does not exist yet is skipped.
SUBCOMMAND_MODULES = (
    "agent.cli_agent",
    "agent.cli_sliver",
    "agent.cli_image",
    "agent.cli_ops",
)

DEFAULT_STATE_DIR = "/var/lib/planetlab"


def build_parser() -> argparse.ArgumentParser:
    from planetlab.version import version_line

    parser = argparse.ArgumentParser(prog="planetlab-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=version_line("planetlab-agent"))
    parser.add_argument("--config", metavar="FILE", help="agent.toml (see `init-config`)")
    parser.add_argument(
        "--state-dir", metavar="DIR", default=None,
        help=f"persistent state (default {DEFAULT_STATE_DIR}, or the config's state_dir)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Each subcommand sets `func(args) -> int` with set_defaults.
    try:
        return int(args.func(args) or 0)
    except PermissionError as exc:   # a command run without the rights it needs
        where = f" {exc.filename}" if exc.filename else ""
        print(f"planetlab-agent {args.command}: permission denied{where}: "
              f"{exc.strerror or exc} (run as root)", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        from agent.lockfile import AlreadyRunning

        if not isinstance(exc, AlreadyRunning):
            raise
        print(f"planetlab-agent {args.command}: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:   # `status | head`: the reader left; not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())   # no second error when Python flushes
        return 0


if __name__ == "__main__":
    sys.exit(main())
