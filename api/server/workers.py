"""Local worker processes started by the server (``python -m worker`` children).

Separate processes keep the engine off the API's event loop and GIL; they
reconnect by themselves if the relay restarts and are stopped with the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys

from relay.config import TOKEN_ENV
from worker.engines import default_engine_name


def worker_command(relay_url: str, engine: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "worker", "--relay", relay_url, "--engine", engine, *extra]


def worker_environment(token: str | None) -> dict[str, str]:
    """This process's environment with the relay token, which never goes on a command line (``ps``)."""
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    if token:
        env[TOKEN_ENV] = token
    return env


def resolve_engine(engine: str) -> str:
    return default_engine_name() if engine == "auto" else engine


class LocalWorkers:
    def __init__(self, count: int, engine: str, extra: list[str] | None = None) -> None:
        self.count, self.engine, self.extra = count, resolve_engine(engine), extra or []
        self.processes: list[asyncio.subprocess.Process] = []

    async def start(self, relay_url: str, token: str | None) -> None:
        for _ in range(self.count):
            self.processes.append(await asyncio.create_subprocess_exec(
                *worker_command(relay_url, self.engine, self.extra), env=worker_environment(token)))

    async def stop(self) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        for process in self.processes:
            try:
                await asyncio.wait_for(process.wait(), 5)
            except TimeoutError:
                process.kill()
                await process.wait()
        self.processes.clear()
