"""The API's side of an output process: start it, read its status, restart it, stop it.

The child (:mod:`media.output_encoder`) publishes a relay channel as RTMP or
HLS in a process of its own; :class:`OutputProcess` spawns it with the
options of :mod:`media.output_options`, follows its JSON status lines and
restarts it with backoff when it dies. ``python -m media.output_process``
still runs the child, for anything that launches it by this name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from media import rtmp
from media.output_options import CHILD_MODULE, Options

log = logging.getLogger("media.output")


class OutputProcess:
    """Runs one output process for the API and restarts it (with backoff) when it dies.

    State comes from the child's status lines: ``publishing`` once its first
    packet went out; ``last_error`` is the latest failure, kept after a
    recovery (``publishing`` says whether it recovered). The RTMP URL and the
    relay token travel in the environment, not argv, so ``ps`` shows no stream key.
    """

    def __init__(
        self,
        relay_url: str,
        channel: str,
        *,
        rtmp_url: str | None = None,
        hls_dir: Path | None = None,
        token: str | None = None,
        fps: float = 30.0,
        hls_time: float = 1.0,
        hls_list_size: int = 6,
        verbose: bool = False,
        restart_delay: float = 1.0,
        max_restart_delay: float = 30.0,
        stop_timeout: float = 5.0,
        stall_timeout: float = 20.0,
    ) -> None:
        """Raise ``ValueError`` on a bad option (:class:`~media.output_options.Options` checks)."""
        self.options = Options(
            relay=relay_url,
            channel=channel,
            token=token,
            rtmp=rtmp_url,
            hls=hls_dir,
            fps=fps,
            hls_time=hls_time,
            hls_list_size=hls_list_size,
            status=True,
            watch_stdin=True,
            stall_timeout=stall_timeout,
            verbose=verbose,
        )
        self.rtmp_url, self.hls_dir = rtmp_url, hls_dir
        self.restart_delay, self.max_restart_delay = restart_delay, max_restart_delay
        self.stop_timeout = stop_timeout
        self.target = rtmp.mask_url(rtmp_url) if rtmp_url else str(hls_dir)
        self.ready = False  # the child's signal handlers are installed (SIGTERM before: exit -15)
        self.publishing = False
        #: ``(width, height)`` it publishes at (it follows the frames: a new size reopens the output)
        self.size: tuple[int, int] | None = None
        self.last_error: str | None = None
        self.restarts = 0
        self.returncode: int | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._changed = asyncio.Condition()

    @property
    def running(self) -> bool:
        """Whether the child process is alive now."""
        return self._proc is not None and self._proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def state(self) -> dict[str, Any]:
        """For the API's stream status."""
        return {
            "target": self.target,
            "running": self.running,
            "publishing": self.publishing,
            "size": list(self.size) if self.size else None,
            "last_error": self.last_error,
            "restarts": self.restarts,
        }

    def command(self) -> list[str]:
        return [sys.executable, "-m", CHILD_MODULE, *self.options.argv()]

    async def start(self) -> None:
        """Start the child (returns once it is spawned) and its supervisor."""
        if self._task is not None:
            return
        self._stopping.clear()
        await self._spawn()
        self._task = asyncio.create_task(self._supervise())
        if self._stopping.is_set():  # stop() ran while we spawned, before there was a child to stop
            await self.stop()

    async def stop(self) -> None:
        """SIGTERM the child, SIGKILL it after ``stop_timeout``, and stop restarting it."""
        self._stopping.set()
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), self.stop_timeout)
            except TimeoutError:
                log.warning(
                    "output process %d ignored SIGTERM for %.0f s: killing it", proc.pid, self.stop_timeout
                )
                proc.kill()
                await proc.wait()
        if self._task is not None:
            await self._task
            self._task = None
        await self._notify()

    async def wait_for(self, predicate: Callable[[OutputProcess], bool], timeout: float) -> bool:
        """Wait until ``predicate(self)`` holds (re-checked at every state change); False at timeout."""

        async def check() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: predicate(self))

        try:
            await asyncio.wait_for(check(), timeout)
        except TimeoutError:
            return False
        return True

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _spawn(self) -> None:
        # the package is installed: ``-m`` finds it without PYTHONPATH
        env = self.options.environment(os.environ)
        self.ready = self.publishing = False
        self.returncode = None
        self._proc = await asyncio.create_subprocess_exec(
            *self.command(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,
        )  # a terminal's Ctrl-C reaches the API, which stops us
        await self._notify()

    async def _supervise(self) -> None:
        delay = self.restart_delay
        while True:
            proc = self._proc
            assert proc is not None and proc.stdout is not None
            started = time.monotonic()
            async for line in proc.stdout:
                await self._on_status(line)
            self.returncode = await proc.wait()
            if proc.stdin is not None:
                proc.stdin.close()
            self.ready = self.publishing = False
            if self._stopping.is_set():
                return
            if time.monotonic() - started > 60:
                delay = self.restart_delay
            self.last_error = (
                f"output process for {self.target} exited with code "
                f"{self.returncode}; restarting in {delay:.1f} s"
            )
            log.warning("%s", self.last_error)
            await self._notify()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                return
            delay = min(delay * 2, self.max_restart_delay)
            self.restarts += 1
            try:
                await self._spawn()
            except OSError as exc:
                self.last_error = f"cannot start the output process: {exc}"
                log.error("%s", self.last_error)
                return

    async def _on_status(self, line: bytes) -> None:
        try:
            status = json.loads(line)
        except ValueError:
            return
        event = status.get("event")
        if event == "ready":
            self.ready = True
        elif event == "publishing":
            self.publishing = True
            with contextlib.suppress(KeyError, TypeError, ValueError):
                self.size = (int(status["width"]), int(status["height"]))
        elif event in ("error", "relay_error"):
            if event == "error":  # the target failed; a lost relay leaves RTMP repeating frames
                self.publishing = False
            self.last_error = str(status.get("message", event))
        await self._notify()


if __name__ == "__main__":
    from media.output_encoder import main

    sys.exit(main())
