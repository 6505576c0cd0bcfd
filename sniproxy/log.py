# structlog configuration: one JSON object per line on stdout by default (console rendering for
# humans on request). Every other module just calls structlog.get_logger(); only this one configures.
# When stdout is journald's stream (systemd's StandardOutput=journal) each line starts with the
# sd-daemon(3) "<N>" syslog priority of its level, which journald strips (SyslogLevelPrefix=, on by
# default) and files the entry under: `journalctl -p err` finds errors, `-o cat` still shows bare JSON.
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
# structlog level names -> syslog priorities (sd-daemon.h: SD_ERR "<3>" ... SD_DEBUG "<7>").
PRIORITIES = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "warn": 4, "info": 6, "debug": 7}


def stream_is_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """True when `stream` is the journald stream systemd connected (JOURNAL_STREAM=dev:inode names
    it, as systemd.exec(5) says to check: a redirected stdout must not get the prefixes)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class _PriorityPrefix:
    """Wraps the renderer: "<N>" + the rendered line, N from the event's level."""

    def __init__(self, renderer: Any) -> None:
        self._renderer = renderer

    def __call__(self, logger: Any, name: str, event: MutableMapping[str, Any]) -> str:
        priority = PRIORITIES.get(str(event.get("level", name)), 6)
        return f"<{priority}>{self._renderer(logger, name, event)}"


def configure(fmt: str = "json", level: str = "info", stream: TextIO | None = None,
              journal: bool | None = None) -> None:
    """journal: prefix each line with its syslog priority (None: when `stream` is journald's)."""
    out = stream or sys.stdout
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer()
    if journal if journal is not None else stream_is_journal(out):
        renderer = _PriorityPrefix(renderer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        # One write() per event, flushed at once: the access log is read live by operators and by
        # tests, and worker processes share one stdout (print() writes the newline separately, so
        # two workers' lines interleaved into one unparsable line).
        logger_factory=structlog.WriteLoggerFactory(file=out),
        # Each process configures once, at start, before its first event. Without the cache every
        # call on a module-level logger re-binds it: measured 3 of the ~13 us an access event costs.
        cache_logger_on_first_use=True,
    )
