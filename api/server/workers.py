"""Local worker processes started by the server (``python -m worker`` children).

Separate processes keep the engine off the API's event loop and GIL; they
reconnect by themselves if the relay restarts and are stopped with the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time

from common.lifeline import child_environment
from relay.config import TOKEN_ENV
from worker.launch import LAUNCH_ENV, LaunchOptions

log = logging.getLogger("api.workers")

#: seconds before restarting a worker that died: the first time, then after each quick death again
RESTART_DELAYS = (0.0, 0.5, 1.0, 2.0, 5.0)
#: a worker that ran this long died of something new: the next restart is immediate again
HEALTHY_AFTER_S = 30.0


def worker_command(extra: list[str]) -> list[str]:
    """``python -m worker`` and the user's own extra flags (``workers.args``); nothing else."""
    return [sys.executable, "-m", "worker", *extra]


def worker_environment(options: LaunchOptions, token: str | None) -> dict[str, str]:
    """This process's environment with the worker's options and the relay token: neither goes on a
    command line (``ps``)."""
    env = {k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, LAUNCH_ENV)}
    env.update(options.environment())
    if token:
        env[TOKEN_ENV] = token
    return env


class LocalWorkers:
    """``count`` worker processes, each restarted when it dies (killed, crashed) until :meth:`stop`.

    Restarts back off from :data:`RESTART_DELAYS` and start over after a
    worker ran :data:`HEALTHY_AFTER_S`; each worker dies with the server
    (:mod:`common.lifeline`), so a killed server leaves no orphan behind.
    """

    def __init__(self, count: int, extra: list[str] | None = None) -> None:
        self.count, self.extra = count, extra or []
        self.processes: list[asyncio.subprocess.Process] = []
        self.restarts = 0
        self._supervisors: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self, options: LaunchOptions, token: str | None) -> None:
        command, env = worker_command(self.extra), worker_environment(options, token)
        for slot in range(self.count):
            self.processes.append(await self._spawn(command, env))
            self._supervisors.append(asyncio.create_task(self._supervise(slot, command, env)))

    @staticmethod
    async def _spawn(command: list[str], env: dict[str, str]) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(*command, env=child_environment(env))

    async def _supervise(self, slot: int, command: list[str], env: dict[str, str]) -> None:
        failures = 0
        while True:
            started = time.monotonic()
            code = await self.processes[slot].wait()
            if self._stopping:
                return
            failures = 0 if time.monotonic() - started > HEALTHY_AFTER_S else failures + 1
            delay = RESTART_DELAYS[min(failures, len(RESTART_DELAYS) - 1)]
            log.warning("local worker %d exited with %s; restarting in %.1f s", slot, code, delay)
            await asyncio.sleep(delay)
            if self._stopping:
                return
            self.processes[slot] = await self._spawn(command, env)
            self.restarts += 1

    async def stop(self) -> None:
        self._stopping = True
        for task in self._supervisors:
            task.cancel()
        await asyncio.gather(*self._supervisors, return_exceptions=True)
        self._supervisors.clear()
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
