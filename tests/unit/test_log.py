# Log lines reach journald with their syslog priority: "<N>" before each line, only when stdout is
# the journal's stream (JOURNAL_STREAM names its device and inode), never on a redirected stdout.
from __future__ import annotations

import json
import os

import pytest
import structlog

from sniproxy import log as logconf


@pytest.fixture(autouse=True)
def _restore_structlog():
    """configure() is process-wide: later tests in this process get structlog as it was."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def _lines(path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


def test_prefix_only_when_stdout_is_the_journal_stream(tmp_path, monkeypatch) -> None:
    path = tmp_path / "out"
    with open(path, "w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert logconf.stream_is_journal(stream)
        logconf.configure(stream=stream, level="debug")
        logger = structlog.get_logger("t")
        logger.debug("d")
        logger.info("i", a=1)
        logger.warning("w")
        logger.error("e")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("x")
    lines = _lines(path)
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>", "<3>"]
    events = [json.loads(line[3:]) for line in lines]  # the rest is the unchanged JSON line
    assert [e["event"] for e in events] == ["d", "i", "w", "e", "x"]
    assert events[1]["a"] == 1 and "ValueError: boom" in events[4]["exception"]


def test_no_prefix_on_another_stream(tmp_path, monkeypatch) -> None:
    path = tmp_path / "out"
    other = tmp_path / "other"
    other.write_text("")
    st = os.stat(other)
    # systemd set JOURNAL_STREAM, but stdout was redirected to a file since: no prefixes in it.
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    with open(path, "w") as stream:
        assert not logconf.stream_is_journal(stream)
        logconf.configure(stream=stream)
        structlog.get_logger("t").error("e")
    monkeypatch.delenv("JOURNAL_STREAM")
    with open(path, "a") as stream:
        assert not logconf.stream_is_journal(stream)
        logconf.configure(stream=stream)
        structlog.get_logger("t").error("e")
    assert [json.loads(line)["event"] for line in _lines(path)] == ["e", "e"]


def test_console_format_gets_the_prefix_too(tmp_path) -> None:
    path = tmp_path / "out"
    with open(path, "w") as stream:
        logconf.configure(fmt="console", stream=stream, journal=True)
        structlog.get_logger("t").warning("careful")
    (line,) = _lines(path)
    assert line.startswith("<4>") and "careful" in line
