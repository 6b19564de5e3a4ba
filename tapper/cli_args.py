"""What every `tapper` subcommand shares: argument helpers and the one-line error type.

A module of its own so that the command modules (tapper/*/cli.py, and the outer layers' commands found through
the `tapper.commands` entry points) import it without importing tapper/cli.py, which imports them.
"""

from __future__ import annotations

import argparse


def add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--task",
        help="LaMP task: LaMP_1, LaMP_2N, LaMP_2M, LaMP_3, LaMP_4, LaMP_5 (6, 7); default: from the outputs file",
    )
    p.add_argument("--questions", required=required, help="LaMP questions JSON")
    p.add_argument("--outputs", required=required, help="LaMP outputs JSON (golds)")


def add_backbone_arg(p: argparse.ArgumentParser, default: str | None = "tiny") -> None:
    p.add_argument(
        "--backbone", default=default, help="tiny | smollm2 | <HF hub id or local path> (default: %(default)s)"
    )


def add_set_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set stage2.epochs=6 --set stage1.lr=1e-3 (repeatable)",
    )


class CLIError(Exception):
    """A failure the command has already put into words: printed as one line, exit code `code`."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def one_line(err: BaseException) -> str:
    """An exception as one line that names what failed: its message (first line, else the type), with a
    missing file's path spelled out."""
    if isinstance(err, FileNotFoundError) and err.filename and not str(err).startswith(("file not found", "no ")):
        return f"file not found: {err.filename}"
    text = str(err).strip()
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        text = err.args[0]  # KeyError's str() adds quotes
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    head = lines[0] + (" (...)" if len(lines) > 1 else "")
    return head if isinstance(err, (CLIError, ValueError, FileNotFoundError)) else f"{type(err).__name__}: {head}"
