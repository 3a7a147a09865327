"""``w2v2 serve`` as a child process on a free loopback port: for scripts, load tests and tests
that need a real server (its signals, its exit status, real sockets)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time


class ServerProcess:
    """Start ``w2v2 serve --port 0 ARGS`` and wait until it listens; ``url`` is its address and
    ``log`` what it printed. ``env`` adds to the environment (e.g. ``TMPDIR``)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, start_timeout: float = 120.0):
        self.proc = subprocess.Popen([sys.executable, "-m", "w2v2", "serve", "--port", "0", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.log: list[str] = []
        self.url = self._wait_for_address(start_timeout)
        threading.Thread(target=self._drain, daemon=True).start()

    def _wait_for_address(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError("w2v2 serve exited before it listened: " + "".join(self.log).strip())
            self.log.append(line)
            if m := re.search(r"running on (http://\S+:\d+)", line):
                return m.group(1)
        self.proc.kill()
        raise RuntimeError(f"w2v2 serve did not listen within {timeout:g} s: " + "".join(self.log).strip())

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send ``sig`` (a drained shutdown for SIGTERM) and return the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
