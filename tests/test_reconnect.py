"""A relay restart: the producer and viewer commands and the worker reach it again and carry on.

Each test runs the real relay command (``python -m relay --port P``), stops
it with SIGTERM (it says ``shutdown`` first) or SIGKILL (the sockets just
drop) and starts it again on the same port. The producer and the viewer run
as the commands users start; the worker runs in process (``run_forever``, as
``python -m worker`` does) so its log shows the waits between tries. Nothing
waits on a clock: each step waits for a line a process prints, a frame, or
a process's exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

from common.backoff import retry_delays
from producers.net import ConnectError, Relays, retrying
from relay.client import connect
from tests.helpers import recv_frame
from wire.frames import FrameKind
from worker.runtime import WorkerOptions, run_forever

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 30.0  # seconds for any one step: a hang fails instead of blocking the suite


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Command:
    """A subprocess whose stderr (and stdout) lines are kept and can be waited for."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.err: list[str] = []
        self.out: list[str] = []
        self._new = asyncio.Condition()
        self._readers = [
            asyncio.create_task(self._read(process.stderr, self.err)),
            asyncio.create_task(self._read(process.stdout, self.out)),
        ]

    @classmethod
    async def start(cls, *args: str) -> Command:
        process = await asyncio.create_subprocess_exec(
            sys.executable, *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        return cls(process)

    async def _read(self, stream: asyncio.StreamReader | None, into: list[str]) -> None:
        assert stream is not None
        while line := await stream.readline():
            async with self._new:
                into.append(line.decode(errors="replace").rstrip("\n"))
                self._new.notify_all()
        async with self._new:
            self._new.notify_all()

    async def line(self, pattern: str, start: int = 0, stream: str = "err") -> tuple[int, re.Match[str]]:
        """The first line from index ``start`` on matching ``pattern`` (waiting for it): its index and
        match.
        """
        lines = self.err if stream == "err" else self.out

        async def find() -> tuple[int, re.Match[str]]:
            async with self._new:
                index = start
                while True:
                    while index < len(lines):
                        if found := re.search(pattern, lines[index]):
                            return index, found
                        index += 1
                    if all(r.done() for r in self._readers):
                        raise AssertionError(
                            f"no line matching {pattern!r}; stderr:\n" + "\n".join(self.err[-20:])
                        )
                    await self._new.wait()

        try:
            return await asyncio.wait_for(find(), LIMIT)
        except TimeoutError:
            raise AssertionError(
                f"no line matching {pattern!r} in {LIMIT} s; stderr:\n"
                + "\n".join([*self.err[:8], "...", *self.err[-3:]])
            ) from None

    async def finish(self, sig: signal.Signals | None = None) -> int:
        """Send ``sig`` (if given) and wait for the exit code, with every line read."""
        if sig is not None and self.process.returncode is None:
            self.process.send_signal(sig)
        code = await asyncio.wait_for(self.process.wait(), LIMIT)
        await asyncio.wait_for(asyncio.gather(*self._readers), LIMIT)
        return code

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        await self.finish()


async def start_relay(port: int) -> Command:
    relay = await Command.start("-m", "relay", "--port", str(port))
    await relay.line(rf"relay listening on ws://127\.0\.0\.1:{port}", stream="out")
    return relay


@contextlib.asynccontextmanager
async def commands() -> AsyncIterator[list[Command]]:
    """Commands the test starts go in the list; any still running at the end are killed."""
    started: list[Command] = []
    try:
        yield started
    finally:
        for command in started:
            await command.kill()


class WaitLog(logging.Handler):
    """The worker's ``reconnecting in X s`` lines, as they are logged (same thread as the test)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.delays: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if found := re.search(r"reconnecting in ([\d.]+) s", record.getMessage()):
            self.delays.append(float(found.group(1)))


@contextlib.asynccontextmanager
async def worker_forever(url: str) -> AsyncIterator[WaitLog]:
    """``python -m worker``'s loop in process, with a filter engine; yields its wait log."""
    waits = WaitLog()
    logger = logging.getLogger("worker")
    logger.addHandler(waits)
    task = asyncio.create_task(run_forever(WorkerOptions(relay_url=url, engine="filter")))
    try:
        yield waits
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        logger.removeHandler(waits)


async def output_after(url: str, channel: str, after: int) -> int:
    """Join ``channel`` as a viewer and return the seq of the first result numbered above ``after``."""
    ws, _ = await connect(url, "viewer", channel)
    try:
        while True:
            frame = await recv_frame(ws)
            if frame.kind is FrameKind.OUTPUT and frame.seq > after:
                return frame.seq
    finally:
        await ws.close()


def report(command: Command) -> dict:
    """The JSON report a ``--json`` command printed last."""
    return json.loads(command.out[-1])


# -- the whole restart --------------------------------------------------------------


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_producer_viewer_and_worker_carry_on_through_a_relay_restart(tmp_path, stop):
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    saved = tmp_path / "frames"
    async with commands() as running:
        relay = await start_relay(port)
        running.append(relay)
        async with worker_forever(url) as waits:
            producer = await Command.start(
                "-m",
                "producers",
                "pattern",
                "--relay",
                url,
                "--channel",
                "cam",
                "--fps",
                "20",
                "--size",
                "64x64",
                "--max-in-flight",
                "2",
                "--json",
            )
            viewer = await Command.start(
                "-m", "producers", "view", "--relay", url, "--channel", "cam", "--save", str(saved), "--json"
            )
            running += [producer, viewer]
            # both connected, results flowing: the producer counts them, the viewer receives them
            await producer.line(r"\| received +[1-9]")
            await viewer.line(r"total [1-9]")
            before = await output_after(url, "cam", -1)
            await relay.finish(stop)
            relay = await start_relay(port)
            running.append(relay)
            # the producer sends again and the worker serves again: results newer than any before
            after = await output_after(url, "cam", before)
            # the viewer is back too: once it says so, its next progress line counts more frames
            index, _ = await viewer.line(r"reconnected to ws://")
            _, seen = await viewer.line(r"total (\d+)", index)  # frames counted so far
            await viewer.line(rf"total (?!{seen.group(1)}\b)\d+", index)
            await producer.line(r"reconnected to ws://")
            produced, viewed = await producer.finish(signal.SIGINT), await viewer.finish(signal.SIGINT)
        assert produced == 0 and viewed == 0, producer.err[-5:] + viewer.err[-5:]
        sent, shown = report(producer), report(viewer)
        assert sent["reconnects"] == 1 and sent["closed"] is None
        assert sent["received"] > 0 and sent["sent"] > after
        assert shown["reconnects"] == 1 and shown["closed"] is None
        assert shown["saved"] == shown["frames"] > int(seen.group(1))
        # the worker tried again at most 2 s apart, and was back in time for the frames above
        assert waits.delays and max(waits.delays) <= 2.0, waits.delays
        if stop is signal.SIGTERM:  # the relay said it was shutting down: taken as "reconnect"
            assert any("relay shutting down" in line for line in producer.err + viewer.err)


# -- giving up ------------------------------------------------------------------------


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_without_reconnect_a_relay_that_goes_away_exits_1(tmp_path, stop):
    """``--reconnect 0``: the documented exit code 1 whether the relay says goodbye or just dies."""
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    async with commands() as running:
        relay = await start_relay(port)
        running.append(relay)
        producer = await Command.start(
            "-m",
            "producers",
            "pattern",
            "--relay",
            url,
            "--fps",
            "20",
            "--size",
            "32x32",
            "--no-receive",
            "--reconnect",
            "0",
            "--json",
        )
        viewer = await Command.start(
            "-m",
            "producers",
            "view",
            "--relay",
            url,
            "--input",
            "--save",
            str(tmp_path),
            "--max-frames",
            "1000000",
            "--reconnect",
            "0",
            "--json",
        )
        running += [producer, viewer]
        # both connected: the viewer sees the producer's frames (its first progress line with one)
        await viewer.line(r"total [1-9]")
        await relay.finish(stop)
        produced, viewed = await producer.finish(), await viewer.finish()
    assert (produced, viewed) == (1, 1), producer.err[-5:] + viewer.err[-5:]
    assert report(producer)["closed"] and report(viewer)["closed"]
    assert report(producer)["reconnects"] == report(viewer)["reconnects"] == 0


async def test_a_relay_that_stays_away_exits_1_after_the_window(tmp_path):
    """Unreachable at start, and gone mid-run without coming back: exit 1 after --reconnect seconds."""
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    async with commands() as running:
        started = time.monotonic()
        never = await Command.start(
            "-m", "producers", "pattern", "--relay", url, "--max-frames", "1", "--reconnect", "1.5", "-v"
        )
        running.append(never)
        assert await never.finish() == 1
        took = time.monotonic() - started
        assert "gave up after" in never.err[-1] and "in 1.5 s" in never.err[-1]
        delays = [
            float(m.group(1)) for line in never.err if (m := re.search(r"trying again in ([\d.]+) s", line))
        ]
        assert len(delays) >= 2 and max(delays) <= 2.0, delays  # it tried again, at most 2 s apart
        assert took >= 1.5

        relay = await start_relay(port)
        running.append(relay)
        viewer = await Command.start(
            "-m",
            "producers",
            "view",
            "--relay",
            url,
            "--save",
            str(tmp_path),
            "--reconnect",
            "1",
            "--json",
            "-v",
        )
        running.append(viewer)
        await viewer.line(r"total \d+")  # connected (its first progress line)
        await relay.finish(signal.SIGTERM)
        gone = time.monotonic()
        assert await viewer.finish() == 1
        assert time.monotonic() - gone < 1 + 10  # the window, plus one try's open timeout at most
        closed = report(viewer)["closed"]
        assert "relay shutting down" in closed and "gave up after" in closed


# -- the schedules ----------------------------------------------------------------------


def test_tries_come_at_most_2_s_apart():
    delays = retry_delays()
    assert [next(delays) for _ in range(7)] == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0, 2.0]


async def test_retrying_stops_at_a_refusal_and_at_the_end_of_the_window():
    tries: list[float] = []

    async def unreachable(timeout: float) -> None:
        tries.append(time.monotonic())
        raise ConnectError("cannot connect", retryable=True)

    with pytest.raises(ConnectError, match=r"gave up after \d+ tries in 0.8 s"):
        await retrying(unreachable, 0.8)
    assert len(tries) >= 3 and tries[-1] - tries[0] <= 0.8 + 0.2

    refused: list[float] = []

    async def refusing(timeout: float) -> None:
        refused.append(timeout)
        raise ConnectError("the relay refused the producer: unauthorized")

    with pytest.raises(ConnectError, match="refused"):
        await retrying(refusing, 30)
    assert len(refused) == 1  # a refusal is final

    stop = asyncio.Event()
    stop.set()
    assert await retrying(unreachable, 30, stop) is None  # stopped: no more tries


async def test_the_worker_tries_again_at_most_2_s_apart():
    """``run_forever`` against a relay that is not there: 0.25, 0.5, 1, 2, 2, 2 s between tries."""
    waits: list[float] = []

    async def record(delay: float) -> None:
        waits.append(delay)
        if len(waits) == 6:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await run_forever(
            WorkerOptions(relay_url=f"ws://127.0.0.1:{free_port()}", engine="filter"), sleep=record
        )
    assert waits == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]


async def test_the_worker_announces_itself_again_after_the_relay_restarts():
    """In-process relay closed and reopened on its port: the worker rejoins and serves the channel."""
    from relay import Relay, RelayConfig
    from tests.helpers import input_frame, jpeg, recv_json

    port = free_port()
    config = RelayConfig(port=port)
    first = Relay(config)
    await first.start()
    async with worker_forever(first.url) as waits:
        producer, _ = await connect(first.url, "producer", "cam")
        await recv_json(producer, "report", event="ready")
        await first.close()  # says shutdown, closes every connection
        with contextlib.suppress(ConnectionClosed):
            while True:
                await producer.recv()
        async with Relay(config) as second:
            producer, _ = await connect(second.url, "producer", "cam")
            # no worker yet, or already back: either way it is assigned and loads within the tries
            await recv_json(producer, "report", event="ready")
            await producer.send(input_frame(5, jpeg(), "cam"))
            frame = await recv_frame(producer)
            assert frame.seq == 5 and frame.kind is FrameKind.OUTPUT
            workers = second.hub.stats().workers
            assert len(workers) == 1 and workers[0]["channels"] == ["cam"]
            await producer.close()
    assert waits.delays and max(waits.delays) <= 2.0


async def test_relays_are_tried_in_turn_and_the_next_one_comes_first_after_a_lost_connection():
    relays = Relays("ws://a:1, ws://b:2,ws://c:3")
    tried: list[str] = []
    down = {"ws://a:1"}

    async def open_url(url: str, timeout: float) -> str:
        tried.append(url)
        if url in down:
            raise ConnectError(f"cannot connect to {url}", retryable=True)
        if url == "ws://refusing:4":
            raise ConnectError("the relay refused the producer")
        return url

    assert await relays.open(open_url, 1.0) == "ws://b:2" and relays.current == "ws://b:2"
    relays.lost()  # b went away: c first
    assert await relays.open(open_url, 1.0) == "ws://c:3"
    down |= {"ws://b:2", "ws://c:3"}
    tried.clear()
    with pytest.raises(ConnectError, match="ws://b:2") as failed:
        await relays.open(open_url, 1.0)
    assert tried == ["ws://c:3", "ws://a:1", "ws://b:2"] and failed.value.retryable
    with pytest.raises(ConnectError, match="refused"):  # a refusal is final at once
        await Relays("ws://refusing:4,ws://b:2").open(open_url, 1.0)
    assert Relays("ws://only:5").urls == ["ws://only:5"]
