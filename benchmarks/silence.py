"""The longest silent stretch of a command: how long its terminal output stood still.

Runs the command, reads its stdout and stderr as they come, and stamps every update (a line, or
a progress bar redrawn with a carriage return) with the wall clock and with the CPU seconds the
command has used so far (its own threads and waited-for children, from /proc). Prints the
longest gaps between updates and what was on screen just before each, so a phase without
progress shows up by name. On a shared, loaded machine wall-clock gaps stretch with the load;
CPU-second gaps do not, and for a CPU-bound phase they bound the wall-clock gap the same phase
would have on an idle machine (wall = CPU seconds / threads busy, at least one).

    python benchmarks/silence.py --log /tmp/demo.log -- .venv/bin/mmlens demo --out /tmp/demo --overwrite
    python benchmarks/silence.py --read /tmp/demo.log     # the gaps so far, while it runs
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
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` and its waited-for children (0 once it is gone)."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return (utime + stime + cutime + cstime) / TICKS


def watch(command: list[str], log=None) -> tuple[int, list[tuple[float, float, str]]]:
    """Run `command`; return its exit code and (wall seconds since start, CPU seconds used, text)
    for every screen update, each also written to `log` as it happens (tab-separated)."""
    start = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    selector = selectors.DefaultSelector()
    pending = {}
    for stream in (process.stdout, process.stderr):
        os.set_blocking(stream.fileno(), False)
        selector.register(stream, selectors.EVENT_READ)
        pending[stream] = b""
    updates = [(0.0, 0.0, "(start)")]
    open_streams = 2
    while open_streams:
        for key, _ in selector.select():
            chunk = key.fileobj.read()
            if not chunk:
                selector.unregister(key.fileobj)
                open_streams -= 1
                continue
            now, cpu = time.monotonic() - start, cpu_seconds(process.pid)
            buffer = pending[key.fileobj] + chunk
            *complete, pending[key.fileobj] = UPDATE.split(buffer)
            for piece in complete:
                if piece.strip():
                    updates.append((now, cpu, piece.decode(errors="replace").strip()))
                    if log is not None:
                        log.write(f"{now:.2f}\t{cpu:.2f}\t{updates[-1][2]}\n")
                        log.flush()
    cpu = cpu_seconds(process.pid)  # read before wait() reaps it
    code = process.wait()
    updates.append((time.monotonic() - start, cpu, "(exit)"))
    return code, updates


def print_gaps(updates: list[tuple[float, float, str]], top: int) -> None:
    pairs = list(zip(updates, updates[1:]))
    for title, key in (("wall-clock", 0), ("CPU-second", 1)):
        gaps = sorted(((b[key] - a[key], a[0], a[2]) for a, b in pairs), key=lambda g: -g[0] if g[0] == g[0] else 0)
        print(f"longest silent stretches by {title} (seconds, starting at wall second, last output before it):")
        for gap, at, text in gaps[:top]:
            print(f"  {gap:6.1f} s at {at:7.1f} s  after: {text[:110]}")


def read_log(path: str) -> list[tuple[float, float, str]]:
    """The updates a `--log` file recorded, so far (a run still going, or stopped, can be read)."""
    updates = [(0.0, 0.0, "(start)")]
    for line in open(path, encoding="utf-8"):
        wall, cpu, text = line.rstrip("\n").split("\t", 2)
        updates.append((float(wall), float(cpu), text))
    return updates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=8, help="how many of the longest gaps to print")
    parser.add_argument("--log", default=None, help="also write every update to this file as it happens")
    parser.add_argument("--read", default=None, help="print the gaps of a --log file instead of running a command")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args()
    if args.read:
        updates = read_log(args.read)
        print(f"{args.read}: {updates[-1][0]:.1f} s wall and {updates[-1][1]:.1f} CPU seconds so far; "
              f"{len(updates) - 1} screen updates")
        print_gaps(updates, args.top)
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to watch after --")
    with open(args.log, "w") if args.log else open(os.devnull, "w") as log:
        code, updates = watch(command, log)
    print(f"exit code {code}; {updates[-1][0]:.1f} s wall and {updates[-1][1]:.1f} CPU seconds in all; "
          f"{len(updates) - 2} screen updates")
    print_gaps(updates, args.top)
    return code


if __name__ == "__main__":
    sys.exit(main())
