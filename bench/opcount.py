#!/usr/bin/env python3
"""Runs `python -m sniproxy ARGS...` with every Python bytecode it executes counted, per function.
The first SIGUSR2 zeroes the counts (after start-up and warm-up), the second writes them to the
JSON file named by $SNIPROXY_OPCOUNT_OUT (per function, and for the 200 busiest lines).

Time on this shared machine moves 15-30% between runs; the number of bytecodes a connection runs
does not, so this is how bench/connrate.py --opcount compares two versions of the per-connection
path (the proxy runs ~20x slower under the tracer: the counts mean something, the times do not).
"""
from __future__ import annotations

import collections
import json
import os
import runpy
import signal
import sys

counts: collections.Counter[tuple[str, str]] = collections.Counter()
offsets: collections.Counter[tuple[object, int]] = collections.Counter()  # (code, f_lasti): cheap to take


def _tracer(frame, event, arg):  # noqa: ANN001, ANN202
    if event == "call":
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        return _tracer
    if event == "opcode":
        code = frame.f_code
        counts[(code.co_filename, code.co_qualname)] += 1
        offsets[(code, frame.f_lasti)] += 1
    return _tracer


def _write(out: str) -> None:
    rows = [{"file": f, "function": q, "opcodes": n} for (f, q), n in counts.most_common()]
    lines: collections.Counter[tuple[str, int]] = collections.Counter()
    for (code, offset), n in offsets.items():
        line = next((ln for start, end, ln in code.co_lines() if start <= offset < end), 0)  # type: ignore[attr-defined]
        lines[(code.co_filename, line or 0)] += n  # type: ignore[attr-defined]
    by_line = [{"file": f, "line": n, "opcodes": c} for (f, n), c in lines.most_common(200)]
    with open(out, "w") as f:
        json.dump({"functions": rows, "lines": by_line}, f)


def main() -> None:
    out = os.environ["SNIPROXY_OPCOUNT_OUT"]
    marks = []

    def on_usr2(signum, frame):  # noqa: ANN001, ANN202
        marks.append(signum)
        if len(marks) == 1:
            counts.clear()
            offsets.clear()
        else:
            sys.settrace(None)  # the counting ends here, and _write's own work is not counted
            _write(out)

    signal.signal(signal.SIGUSR2, on_usr2)
    sys.argv = ["sniproxy", *sys.argv[1:]]
    sys.settrace(_tracer)
    try:
        runpy.run_module("sniproxy", run_name="__main__", alter_sys=True)
    except SystemExit:
        pass
    finally:
        sys.settrace(None)


if __name__ == "__main__":
    main()
