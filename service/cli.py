"""The command line of `sse-relay` (`python -m service`): `--help`, `--version`, and every setting as a flag.

The flags are generated from the fields of `Settings` (their environment variable, default and help), so the
command line, README's configuration table and the code cannot drift apart. A flag is only another way to set
its environment variable: `--port 9000` is `PORT=9000`, a flag wins over the environment, and it is checked by
the same parser, so an error names both (`--port (PORT)`). The values are put into the process's environment
before the settings are read, which is what worker processes (WORKERS > 1) read too.

JWT_SECRET and ADMIN_API_KEY have no flag: a command line is visible to every user of the machine (`ps`).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import MutableMapping, Sequence
from dataclasses import Field, fields

from .config import ConfigError, Settings, parse_setting
from .version import __version__

__all__ = ["EXIT_CODES", "apply_command_line", "flag_of", "parser"]

# Exit statuses of `sse-relay`, in its --help and README.
EXIT_CODES = {
    0: "stopped cleanly (drained after SIGTERM/SIGINT), or --help/--version",
    1: "the server stopped on an error (a worker failed; with WORKERS > 1, also a port that is taken)",
    2: "a bad flag or setting; the message names it",
    3: "the server could not listen (the address or port is taken; uvicorn's startup failure)",
}

_NO_FLAG = {"JWT_SECRET", "ADMIN_API_KEY"}  # secrets stay out of the process list


def flag_of(f: Field[object]) -> str:
    """`--redis-url` for the field `redis_url` (env REDIS_URL)."""
    return "--" + f.name.replace("_", "-")


def _flagged() -> list[Field[object]]:
    return [f for f in fields(Settings) if f.metadata["env"] not in _NO_FLAG]


def _help(f: Field[object]) -> str:
    text = re.sub(r"`([^`]*)`", r"\1", str(f.metadata["help"])).replace("%", "%%")
    default = f.default
    shown = "unset" if default is None else ",".join(default) if isinstance(default, tuple) else str(default)
    if f.name == "frontend_dir":
        shown = "the packaged chat page"
    return f"{text} [env {f.metadata['env']}; default {shown or '(empty)'}]"


def parser() -> argparse.ArgumentParser:
    """The parser of `sse-relay`: one option per setting, grouped in a single list, exit codes in the epilog."""
    p = argparse.ArgumentParser(
        prog="sse-relay",
        usage="sse-relay [--help] [--version] [--SETTING VALUE ...]",
        description="Run the sse-relay service: a Redis-backed Server-Sent Events relay (uvicorn, uvloop, "
                    "httptools). Every option is also an environment variable (shown in brackets); an option given "
                    "here wins over the environment. JWT_SECRET and ADMIN_API_KEY are read from the environment only.",
        epilog="exit status: " + "; ".join(f"{code}: {what}" for code, what in EXIT_CODES.items())
               + ". Documentation: README.md and docs/ of the project.",
    )
    p.add_argument("--version", action="version", version=f"sse-relay {__version__}")
    group = p.add_argument_group("settings (README's configuration table)")
    for f in _flagged():
        if isinstance(f.default, bool):
            group.add_argument(flag_of(f), dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=_help(f))
        else:
            group.add_argument(flag_of(f), dest=f.name, metavar=str(f.metadata["env"]), default=None, help=_help(f))
    return p


def apply_command_line(argv: Sequence[str] | None = None,
                       environ: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Parse `argv`, check every given value, and write it into `environ` (default `os.environ`) under its
    variable. `--help`/`--version` exit 0 and a bad flag exits 2 (argparse's SystemExit), before anything starts."""
    env = os.environ if environ is None else environ
    p = parser()
    args = p.parse_args(argv)
    for f in _flagged():
        value = getattr(args, f.name)
        if value is None:
            continue
        raw = ("true" if value else "false") if isinstance(value, bool) else str(value)
        try:
            parse_setting(f"{flag_of(f)} ({f.metadata['env']})", raw, f.default, f.metadata["min"], f.type)
        except ConfigError as exc:
            p.error(str(exc))
        env[str(f.metadata["env"])] = raw
    return env
