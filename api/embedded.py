"""One command for a working system: a relay plus local worker processes.

Workers run as child processes (``python -m worker``) so the engine never
competes with the relay for the GIL; they reconnect if the relay restarts
and are stopped with the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from dataclasses import dataclass, field

from relay import Relay, RelayConfig
from worker.engines import default_engine_name

log = logging.getLogger("embedded")


@dataclass
class EmbeddedOptions:
    relay: RelayConfig = field(default_factory=RelayConfig)
    workers: int = 1
    engine: str = "auto"
    worker_args: list[str] = field(default_factory=list)


def worker_command(relay_url: str, engine: str, token: str | None, extra: list[str]) -> list[str]:
    command = [sys.executable, "-m", "worker", "--relay", relay_url, "--engine", engine]
    if token:
        command += ["--token", token]
    return command + extra


def attach_instructions(url: str, token: str | None) -> str:
    auth = f" --token {token}" if token else ""
    return "\n".join([
        f"relay ready at {url}",
        "  send frames:   python -m producers pattern --relay " + url + auth,
        "                 python -m producers webcam  --relay " + url + auth,
        "  watch output:  python -m producers view --relay " + url + auth,
        "  save output:   python -m producers view --save out/ --relay " + url + auth,
        "  change look:   python -m producers pattern --params '{\"effect\": \"sketch\"}' --relay " + url + auth,
    ])


async def run_embedded(options: EmbeddedOptions, ready: asyncio.Event | None = None) -> None:
    engine = default_engine_name() if options.engine == "auto" else options.engine
    if options.engine == "auto" and engine == "filter":
        log.info("no CUDA GPU with diffusers found: local workers use engine 'filter' "
                 "(OpenCV effects on the CPU)")
    token = next(iter(options.relay.tokens), None)
    async with Relay(options.relay) as relay:
        url = f"ws://{_client_host(options.relay.host)}:{relay.port}"
        processes = [
            await asyncio.create_subprocess_exec(*worker_command(url, engine, token, options.worker_args))
            for _ in range(options.workers)
        ]
        print(attach_instructions(url, token), flush=True)
        if ready is not None:
            ready.set()
        try:
            await _wait_for_signal()
        finally:
            for process in processes:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
            for process in processes:
                try:
                    await asyncio.wait_for(process.wait(), 5)
                except asyncio.TimeoutError:
                    process.kill()


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


__all__ = ["EmbeddedOptions", "run_embedded", "worker_command"]
