# Runs the real proxy (`python -m sniproxy run -c FILE`) as a child process for end-to-end tests, with
# its JSON log captured to a file; always stopped (TERM, then KILL) by the fixture that made it.
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]


class ProxyProcess:
    def __init__(self, config_path: Path, log_path: Path, env: dict[str, str] | None = None,
                 argv_prefix: list[str] | None = None) -> None:
        # The proxy switches to its unprivileged user ([server] user) and re-reads the file on SIGHUP,
        # so it lives where that user can read it: pytest's tmp dirs are 0700 root. Tests rewrite
        # proxy.config_path (this copy) to reload.
        self._config_dir = Path(tempfile.mkdtemp(prefix="sniproxy-proxy-", dir="/tmp"))
        self._config_dir.chmod(0o711)
        self.config_path = self._config_dir / config_path.name
        shutil.copyfile(config_path, self.config_path)
        self.config_path.chmod(0o644)
        self.log_path = log_path
        self._log_file = open(log_path, "wb")
        full_env = dict(os.environ)
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.update(env or {})
        argv = [*(argv_prefix or []), sys.executable, "-m", "sniproxy", "run", "-c", str(self.config_path)]
        self.proc = subprocess.Popen(argv, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     cwd=REPO, env=full_env)

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return out

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _found(self, predicate: Callable[[dict[str, Any]], bool], count: int,
               deadline: float) -> list[dict[str, Any]] | None:
        found = [e for e in self.events() if predicate(e)]
        if len(found) >= count:
            return found
        if self.proc.poll() is not None:
            raise AssertionError(f"proxy exited with {self.proc.returncode}:\n{self.text()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {count} log event(s); log:\n{self.text()[-4000:]}")
        return None

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20.0,
                 count: int = 1) -> list[dict[str, Any]]:
        """Blocking wait: only for synchronous tests (it would freeze an event loop)."""
        deadline = time.monotonic() + timeout
        while (found := self._found(predicate, count, deadline)) is None:
            time.sleep(0.05)
        return found

    async def until(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20.0,
                    count: int = 1) -> list[dict[str, Any]]:
        """wait_for for async tests: keeps the test's own servers and clients running meanwhile."""
        deadline = time.monotonic() + timeout
        while (found := self._found(predicate, count, deadline)) is None:
            await asyncio.sleep(0.05)
        return found

    async def access(self, count: int = 1, timeout: float = 20.0) -> list[dict[str, Any]]:
        return await self.until(lambda e: e.get("event") == "access", timeout, count)

    def wait_ready(self, timeout: float = 30.0) -> None:
        self.wait_for(lambda e: e.get("event") == "listening", timeout)

    def access_events(self) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event") == "access"]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        shutil.rmtree(self._config_dir, ignore_errors=True)
        return self.proc.returncode
