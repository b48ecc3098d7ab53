"""Where ``fetchpool fetch`` and ``stats`` write: results to stdout (the terminal view or JSON
lines), a body to ``-o FILE``, and how wide the progress bar on stderr is."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

__all__ = ["OutputFailed", "bar_size", "emit", "show", "why_unwritable"]


class OutputFailed(Exception):
    """Results could not be written (to stdout or to -o FILE); the message says where and why."""


def emit(text: str) -> None:
    """Write ``text`` to stdout at once. A closed pipe raises BrokenPipeError (see :func:`fetchpool.cli.main`);
    any other write error (a full disk, ...) raises OutputFailed."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise OutputFailed(f"cannot write to stdout: {exc.strerror or exc}") from None


def why_unwritable(path: str) -> str | None:
    """Why -o PATH cannot be written, found before anything is fetched; None when it can be.

    A new or regular file is opened for writing as the write will open it (os.access says yes to
    root for any file, and knows nothing of read-only mounts), without truncating it, and sent
    zero bytes (which /proc files refuse), then removed again when the check created it. A device
    or a pipe is left to the write: opening a pipe is seen by its reader as a writer that left.
    """
    target = Path(path)
    if target.is_dir():
        return f"{path} is a directory"
    if not target.parent.is_dir():
        return f"the directory {target.parent} does not exist"
    if target.exists() and not target.is_file():
        return None
    try:
        try:
            fd, created = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL), True
        except FileExistsError:
            fd, created = os.open(path, os.O_WRONLY), False
        try:
            os.write(fd, b"")
        finally:
            os.close(fd)
            if created:
                os.unlink(path)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _save(path: str, body: bytes) -> None:
    """Write the body to -o PATH; raises OutputFailed."""
    try:
        Path(path).write_bytes(body)
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise OutputFailed(f"cannot write -o {path}: {exc.strerror or exc}") from None


def show(result: Any, args: argparse.Namespace, terminal: bool, several: bool) -> None:
    """Print one result: the terminal view or a JSON line; its body to -o FILE when given. With
    --fail, an HTTP status of 400 or more shows no body (nothing at a terminal, a JSON line with
    a null body) and says so on stderr, as curl -f does. Raises OutputFailed or BrokenPipeError
    when it cannot be written."""
    from tqdm import tqdm

    from fetchpool import render

    refused = args.fail and not result.HasField("error") and result.status_code >= 400
    saved = bool(args.output) and not refused and not result.HasField("error")
    if refused:  # tqdm.write: above the progress bar, when one is shown
        tqdm.write(f"fetchpool fetch: The requested URL returned error: {result.status_code}"
                   + (f" ({result.url})" if several else ""), file=sys.stderr)
    if saved:
        _save(args.output, result.body)
    if not terminal:
        body = "omit" if args.output or refused else args.body or "base64"
        emit(json.dumps(render.result_json(result, body), ensure_ascii=False) + "\n")
    elif not refused:
        lines = [f"--- [{result.index}] {result.url}"] if several else []
        if args.verbose:
            lines += render.verbose_lines(result)
        emit("".join(line + "\n" for line in lines)
             + render.result_view(result, body="omit" if args.output else args.body or "text"))
    if saved:  # last: after the view of the result it belongs to (the -v lines, the headers)
        tqdm.write(f"fetchpool fetch: saved {len(result.body)} bytes to {args.output}", file=sys.stderr)


def bar_size() -> dict[str, int]:
    """tqdm's ncols/nrows for the progress bar: none (tqdm follows the terminal on stderr), or for
    a terminal that reports 0 columns and rows (a pty whose size was never set, where tqdm hides
    the bar) the fallback of :func:`shutil.get_terminal_size` ($COLUMNS and $LINES, else 80x24)."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError):  # not a terminal: no bar anyway
        return {}
    if size.columns and size.lines:
        return {}
    fallback = shutil.get_terminal_size()
    return {"ncols": size.columns or fallback.columns, "nrows": size.lines or fallback.lines}
