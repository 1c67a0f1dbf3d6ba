"""The longest silent stretch of a command: how long its terminal output stood still.

Runs the command, reads its stdout and stderr as they come, and stamps every update (a line, or
a progress bar redrawn with a carriage return). Prints the longest gaps between updates and what
was on screen just before each, so a phase without progress shows up by name.

    python benchmarks/silence.py -- .venv/bin/mmlens demo --out /tmp/demo --overwrite
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import subprocess
import sys
import time

UPDATE = re.compile(rb"[\r\n]")


def watch(command: list[str]) -> tuple[int, list[tuple[float, str]]]:
    """Run `command`; return its exit code and (time since start, text) for every screen update."""
    start = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    selector = selectors.DefaultSelector()
    pending = {}
    for stream in (process.stdout, process.stderr):
        os.set_blocking(stream.fileno(), False)
        selector.register(stream, selectors.EVENT_READ)
        pending[stream] = b""
    updates = [(0.0, "(start)")]
    open_streams = 2
    while open_streams:
        for key, _ in selector.select():
            chunk = key.fileobj.read()
            if not chunk:
                selector.unregister(key.fileobj)
                open_streams -= 1
                continue
            now = time.monotonic() - start
            buffer = pending[key.fileobj] + chunk
            *complete, pending[key.fileobj] = UPDATE.split(buffer)
            for piece in complete:
                if piece.strip():
                    updates.append((now, piece.decode(errors="replace").strip()))
    code = process.wait()
    updates.append((time.monotonic() - start, "(exit)"))
    return code, updates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=8, help="how many of the longest gaps to print")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to watch after --")
    code, updates = watch(command)
    gaps = sorted(((b[0] - a[0], a[0], a[1]) for a, b in zip(updates, updates[1:])), reverse=True)
    print(f"exit code {code}; {updates[-1][0]:.1f} s in all; {len(updates) - 2} screen updates")
    print(f"longest silent stretches (seconds, starting at, last output before it):")
    for gap, at, text in gaps[: args.top]:
        print(f"  {gap:6.1f} s at {at:7.1f} s  after: {text[:110]}")
    return code


if __name__ == "__main__":
    sys.exit(main())
