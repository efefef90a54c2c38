"""Relay nodes joined over NATS: real nats-server processes (a three-server cluster with routes)
and three relays in process, each on its own server, with real WebSocket peers on loopback.

Without nats-server (``apt-get install nats-server``, or ``.ci/install-system-deps``)
or nats-py (``pip install -e .[cluster]``) the tests that need them skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from websockets.asyncio.client import ClientConnection

from relay import Relay, RelayConfig
from relay.__main__ import build_parser, relay_config_from_args
from relay.client import connect
from relay.cluster.messages import Claim, Heartbeat, WorkerInfo, channel_subject, decode, encode, owner
from relay.cluster.view import ClusterView
from relay.local import LocalViewer
from tests.helpers import TIMEOUT, EchoWorker, input_frame, jpeg, recv_frame, recv_json
from tests.nginx_rtmp import free_port
from tests.test_reconnect import Command
from wire.frames import Frame, FrameKind
from wire.relay_messages import EngineState

INSTALL = "apt-get install -y nats-server (or run .ci/install-system-deps)"
NODES = "abc"


# -- a NATS cluster ------------------------------------------------------------


@dataclass
class NatsServer:
    process: subprocess.Popen[bytes]
    port: int
    monitor: int
    command: list[str]
    log: Path

    @classmethod
    def launch(cls, command: list[str], port: int, monitor: int, log: Path) -> NatsServer:
        with log.open("ab") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        return cls(process, port, monitor, command, log)

    def restart(self) -> None:
        """Start it again, on the same ports and configuration, after :meth:`kill`."""
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def routes(self) -> int:
        return int(self._monitor("routez")["num_routes"])

    def jetstream_leader(self) -> str | None:
        """The JetStream meta leader this server knows of (None until the cluster elected one)."""
        return self._monitor("jsz").get("meta_cluster", {}).get("leader")

    def _monitor(self, endpoint: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor}/{endpoint}", timeout=1) as reply:
            return json.load(reply)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


def _nats_server() -> str:
    found = shutil.which("nats-server") or next(
        (p for p in ("/usr/sbin/nats-server", "/usr/bin/nats-server") if Path(p).is_file()), None
    )
    if found is None:
        pytest.skip(f"nats-server is not installed: {INSTALL}")
    return found


def _config(port: int, monitor: int, cluster: int, routes: list[int], store: Path | None) -> str:
    # no_advertise: clients keep to the server they were given (a node whose server dies is cut
    # off, which one test wants); max_payload: room for the relay's largest frames; store:
    # JetStream's directory (the streams registry's key-value bucket), None: no JetStream
    listed = ", ".join(f"nats://127.0.0.1:{route}" for route in routes)
    jetstream = f'server_name: s{port}\njetstream {{ store_dir: "{store}" }}\n' if store else ""
    server = f"{jetstream}listen: 127.0.0.1:{port}\nhttp: 127.0.0.1:{monitor}\nmax_payload: 16MB\n"
    if not routes:  # one server: no cluster (JetStream would wait for routes that never come)
        return server
    return f"""{server}cluster {{
  name: sd-tests
  listen: 127.0.0.1:{cluster}
  no_advertise: true
  routes: [{listed}]
}}
"""


@contextlib.contextmanager
def nats_cluster(directory: Path, size: int, jetstream: bool = False) -> Iterator[list[NatsServer]]:
    """``size`` nats-servers routed to each other; ready (every route up, and with ``jetstream`` a
    JetStream leader elected) when the block starts.
    """
    binary = _nats_server()
    directory.mkdir(parents=True, exist_ok=True)
    ports = [(free_port(), free_port(), free_port()) for _ in range(size)]
    servers: list[NatsServer] = []
    try:
        for i, (port, monitor, cluster) in enumerate(ports):
            conf = directory / f"nats{i}.conf"
            conf.write_text(
                _config(
                    port,
                    monitor,
                    cluster,
                    [c for j, (_, _, c) in enumerate(ports) if j != i],
                    directory / f"jetstream{i}" if jetstream else None,
                )
            )
            command = [binary, "-c", str(conf)]
            servers.append(NatsServer.launch(command, port, monitor, directory / f"nats{i}.log"))
        deadline = time.monotonic() + TIMEOUT
        for server in servers:
            while True:  # polling a condition, with a deadline
                with contextlib.suppress(OSError, ValueError, KeyError):
                    if server.routes() == size - 1 and (
                        not jetstream or size == 1 or server.jetstream_leader()
                    ):
                        break
                assert server.process.poll() is None, f"nats-server exited: see {directory}"
                assert time.monotonic() < deadline, f"the NATS cluster did not form: see {directory}"
                time.sleep(0.02)
        yield servers
    finally:
        for server in servers:
            server.kill()


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait for ``condition`` (checked each 10 ms) for at most TIMEOUT seconds."""
    async with asyncio.timeout(TIMEOUT):
        while not condition():
            await asyncio.sleep(0.01)
    assert condition(), what


@pytest.fixture
def nats_servers(tmp_path: Path) -> Iterator[list[NatsServer]]:
    pytest.importorskip("nats", reason="nats-py is not installed: pip install -e .[cluster]")
    with nats_cluster(tmp_path / "nats", len(NODES)) as servers:
        yield servers


@pytest.fixture
async def nodes(nats_servers: list[NatsServer]) -> AsyncIterator[list[Relay]]:
    """Relay nodes a, b and c, each on its own NATS server, every one seeing the two others."""
    relays = [
        Relay(RelayConfig(port=0, nats=server.url, node_name=name, idle_release_s=0))
        for server, name in zip(nats_servers, NODES, strict=True)
    ]
    try:
        for relay in relays:
            await relay.start()
        await until(
            lambda: all(r.backplane is not None and len(r.backplane.view.nodes) == 2 for r in relays),
            "the nodes never all heard each other",
        )
        yield relays
    finally:
        for relay in relays:
            await relay.close()


# -- peers -------------------------------------------------------------------------


class Viewer:
    """A viewer's frames as they arrive, read by a task of its own."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[Frame] = []
        self._arrived = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    @classmethod
    async def join(cls, relay: Relay, channel: str) -> Viewer:
        ws, _ = await connect(relay.url, "viewer", channel)
        return cls(ws)

    async def _read(self) -> None:
        while True:
            self.frames.append(await recv_frame(self.ws))
            self._arrived.set()

    async def reached(self, seq: int) -> None:
        """Until a frame numbered ``seq`` or later has arrived (TimeoutError from the caller's timeout)."""
        while not (self.frames and self.frames[-1].seq >= seq):
            self._arrived.clear()
            await self._arrived.wait()

    def after(self, seq: int) -> list[Frame]:
        return [f for f in self.frames if f.seq > seq]

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.ws.close()


async def stream(
    producer: ClientConnection, channel: str, viewers: list[Viewer], count: int, start: int
) -> dict[int, bytes]:
    """Send frames numbered from ``start`` until each viewer got ``count`` of them.

    Each frame goes after the previous one reached the first viewer, or half
    a second went by: the first frames of a fresh route may be lost (NATS
    subscriptions take a moment to reach every server), the later ones flow.
    Returns what was sent, by sequence number.
    """
    sent: dict[int, bytes] = {}
    seq = start
    while not all(len(v.after(start - 1)) >= count for v in viewers):
        assert seq - start < 200, f"frames never reached every viewer ({[len(v.frames) for v in viewers]})"
        sent[seq] = jpeg(seed=seq % 64)
        await producer.send(input_frame(seq, sent[seq], channel))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                await viewers[0].reached(seq)
        seq += 1
    return sent


def check_results(viewer: Viewer, sent: dict[int, bytes], channel: str) -> None:
    """Every frame a viewer got is the worker's echo of one the producer sent: same number, same image,
    in order."""
    seqs = [f.seq for f in viewer.frames]
    assert seqs == sorted(set(seqs)), f"out of order or repeated: {seqs}"
    for frame in viewer.frames:
        assert (frame.kind, frame.channel) == (FrameKind.OUTPUT, channel)
        assert frame.payload == sent[frame.seq], f"frame {frame.seq} is not what was sent as {frame.seq}"


def serving(relay: Relay | str) -> contextlib.AbstractAsyncContextManager[EchoWorker]:
    """An echo worker on ``relay`` (or a relay's URL), serving until the block ends."""
    return EchoWorker(relay if isinstance(relay, str) else relay.url).serving()


# -- three nodes, one stream ---------------------------------------------------------


@pytest.mark.network_service
async def test_a_stream_spans_three_nodes_with_sequence_numbers_kept(nodes):
    """Producer on a, worker on b, viewers on a and c."""
    a, b, c = nodes
    async with serving(b) as worker:
        await until(lambda: any(w.id == worker.session for w in a.hub.workers), "a never saw b's worker")
        viewer_a, viewer_c = await Viewer.join(a, "cam"), await Viewer.join(c, "cam")
        producer, _ = await connect(a.url, "producer", "cam", receive="none")
        assert await asyncio.wait_for(worker.assigned.get(), TIMEOUT) == "cam"
        status = await recv_json(producer, "status", state="assigned")
        assert status["worker"] == worker.session  # a's hub gave the channel to b's worker
        sent = await stream(producer, "cam", [viewer_a, viewer_c], 5, start=100)
        for viewer in (viewer_a, viewer_c):
            check_results(viewer, sent, "cam")
        assert set(worker.received) <= set(sent)
        assert b.hub.channels["cam"].remote and not a.hub.channels["cam"].remote
        # params set on a reach the worker on b
        await producer.send(json.dumps({"type": "params", "params": {"prompt": "a fox"}}))
        assert (await recv_json(producer, "params_ack"))["version"] == 1
        await until(lambda: b.hub.channels["cam"].params == {"prompt": "a fox"}, "params never reached b")
        for viewer in (viewer_a, viewer_c):
            await viewer.close()
        await producer.close()
        # the producer gone, a releases the channel and b gives its worker slot back
        await until(lambda: "cam" not in b.hub.channels, "b still serves a channel nobody wants")
        assert not worker.assigned.qsize()


@pytest.mark.network_service
@pytest.mark.parametrize("loss", ["worker leaves", "its node is cut off"])
async def test_a_channel_moves_to_a_worker_on_another_node(nats_servers, nodes, loss):
    """b's worker serves a's channel; it leaves (its socket closes) or b's NATS server dies (the others
    count b gone; b gives the channel back): c's worker takes the channel over.
    """
    a, b, c = nodes
    async with serving(b) as first:
        viewer_a, viewer_c = await Viewer.join(a, "cam"), await Viewer.join(c, "cam")
        producer, _ = await connect(a.url, "producer", "cam", receive="none")
        assert await asyncio.wait_for(first.assigned.get(), TIMEOUT) == "cam"
        sent = await stream(producer, "cam", [viewer_a, viewer_c], 3, start=0)
        async with serving(c) as second:  # idle until the first goes
            await until(lambda: any(w.id == second.session for w in a.hub.workers), "a never saw c's worker")
            if loss == "worker leaves":
                await first.close()
            else:
                nats_servers[1].kill()
            assert await asyncio.wait_for(second.assigned.get(), TIMEOUT) == "cam"
            if loss == "its node is cut off":
                await until(lambda: "cam" not in b.hub.channels, "b kept serving a channel of a node it lost")
            last = max(sent)
            sent |= await stream(producer, "cam", [viewer_a, viewer_c], 3, start=last + 1)
            assert second.received and min(second.received) > max(first.received)
            for viewer in (viewer_a, viewer_c):
                check_results(viewer, sent, "cam")
                assert {f.seq for f in viewer.after(last)} <= set(second.received)
                await viewer.close()
            await producer.close()


def serving_nodes(nodes: list[Relay], channel: str) -> list[str]:
    """The nodes whose own workers hold ``channel``: one, once the owner is settled."""
    return [
        relay.hub.config.node_name
        for relay in nodes
        for worker in relay.hub.workers
        if channel in worker.assigned
        and relay.backplane is not None
        and worker.id not in relay.backplane.status().worker_nodes
    ]


@pytest.mark.network_service
async def test_producers_on_two_nodes_get_one_worker_and_the_other_node_takes_over(nodes):
    """Producers of one channel on a and b: the channel's owner (one rule on every node) gives it
    its one worker; the other node sends its producers' frames and params there; the owner's
    producers leaving, the other node serves the channel.
    """
    a, b, c = nodes
    claims = {"a": Claim(producers=True), "b": Claim(producers=True)}
    owner_name = owner("cam", claims)
    first, other = (a, b) if owner_name == "a" else (b, a)
    async with serving(a) as worker_a, serving(b) as worker_b:
        await until(lambda: len(a.hub.workers) == len(b.hub.workers) == 2, "a and b never saw both workers")
        viewer = await Viewer.join(c, "cam")
        producer_other, _ = await connect(other.url, "producer", "cam", receive="none")
        await until(lambda: serving_nodes(nodes, "cam") != [], "the first producer's channel got no worker")
        # the owner's producer comes second: the owner takes the channel over from the other node
        producer_owner, _ = await connect(first.url, "producer", "cam", receive="none")
        await until(
            lambda: other.hub.channels["cam"].owner == owner_name and first.hub.channels["cam"].owner is None,
            "the nodes never agreed on the channel's owner",
        )
        await until(lambda: len(serving_nodes(nodes, "cam")) == 1, "the channel kept two workers")
        assert first.hub.channels["cam"].worker is not None
        on_other = other.hub.channels["cam"]
        assert on_other.worker is None or on_other.remote, "the other node serves it only for the owner"

        sent = await stream(producer_other, "cam", [viewer], 3, start=0)
        sent |= await stream(producer_owner, "cam", [viewer], 3, start=1000)
        check_results(viewer, sent, "cam")
        assert {f.seq for f in viewer.frames} & set(range(1000)), "the other node's frames were not served"

        # params from the other node's producer reach the worker, through the owner
        serving_worker = worker_a if first.hub.channels["cam"].worker.id == worker_a.session else worker_b
        await producer_other.send(json.dumps({"type": "params", "params": {"prompt": "from the other node"}}))
        async with asyncio.timeout(TIMEOUT):
            while (params := await serving_worker.params.get())[1].get("prompt") != "from the other node":
                pass
        assert params[0] == "cam"

        await producer_owner.close()
        await until(
            lambda: other.hub.channels["cam"].owner is None and other.hub.channels["cam"].worker is not None,
            "the other node never took the channel over",
        )
        await until(lambda: len(serving_nodes(nodes, "cam")) == 1, "the channel kept two workers")
        last = max(sent)
        sent |= await stream(producer_other, "cam", [viewer], 3, start=last + 1)
        check_results(viewer, sent, "cam")
        await viewer.close()
        await producer_other.close()


@pytest.mark.network_service
async def test_a_worker_killed_hands_its_channel_to_a_worker_on_another_node(nodes):
    """``python -m worker`` on b, SIGKILLed mid-stream: a moves the channel to c's worker."""
    a, b, c = nodes
    worker = await Command.start(
        "-m", "worker", "--relay", b.url, "--engine", "filter", "--log-level", "info"
    )
    try:
        await worker.line(r"worker \w+ connected to")
        await until(lambda: len(a.hub.workers) == 1, "a never saw b's worker")
        viewer = await Viewer.join(a, "cam")
        producer, _ = await connect(a.url, "producer", "cam", receive="none")
        await worker.line(r"serving channel cam")
        sent = await stream(producer, "cam", [viewer], 3, start=0)
        async with serving(c) as second:
            await until(lambda: any(w.id == second.session for w in a.hub.workers), "a never saw c's worker")
            await worker.kill()
            assert await asyncio.wait_for(second.assigned.get(), TIMEOUT) == "cam"
            last = max(sent)
            sent |= await stream(producer, "cam", [viewer], 3, start=last + 1)
            after = viewer.after(last)
            assert after and {f.seq for f in after} <= set(second.received)
            assert all(f.payload == sent[f.seq] for f in after), "c's echo worker returns each input"
            await viewer.close()
            await producer.close()
    finally:
        await worker.kill()


@pytest.mark.network_service
async def test_a_partitioned_nodes_streams_recover_when_it_returns(nats_servers, nodes):
    """a (producer and viewer) loses its NATS server: its stream waits, b lets the channel go; the
    server back, a rejoins and b's worker serves the stream again.
    """
    a, b, _ = nodes
    async with serving(b) as worker:
        viewer = await Viewer.join(a, "cam")
        producer, _ = await connect(a.url, "producer", "cam", receive="none")
        assert await asyncio.wait_for(worker.assigned.get(), TIMEOUT) == "cam"
        sent = await stream(producer, "cam", [viewer], 3, start=0)

        nats_servers[0].kill()
        await until(lambda: a.hub.channels["cam"].worker is None, "a kept a worker it cannot reach")
        await until(lambda: "cam" not in b.hub.channels, "b kept serving a node it lost")
        restarted = time.monotonic()
        nats_servers[0].restart()
        await until(lambda: "a" in b.backplane.view.nodes, "a never rejoined")  # type: ignore[union-attr]
        assert await asyncio.wait_for(worker.assigned.get(), TIMEOUT) == "cam"
        last = max(sent)
        sent |= await stream(producer, "cam", [viewer], 3, start=last + 1)
        print(f"served again {(time.monotonic() - restarted) * 1000:.0f} ms after the NATS server restarted")
        check_results(viewer, sent, "cam")
        assert {f.seq for f in viewer.after(last)} <= set(worker.received)
        await viewer.close()
        await producer.close()


@pytest.mark.network_service
async def test_python_m_relay_with_nats_joins_the_cluster_and_lends_its_workers(nats_servers, nodes):
    a = nodes[0]
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "relay", "--port", "0", "--nats", nats_servers[2].url, "--node-name", "cli"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), TIMEOUT)
        assert line.startswith(b"relay listening on ws://"), line
        assert a.backplane is not None
        await until(lambda: "cli" in a.backplane.view.nodes, "a never heard the new node")
        async with serving(line.split()[-1].decode()) as worker:
            await until(lambda: any(w.id == worker.session for w in a.hub.workers), "its worker never showed")
            producer, _ = await connect(a.url, "producer", "cam", receive="none")
            assert await asyncio.wait_for(worker.assigned.get(), TIMEOUT) == "cam"
            await producer.close()
    finally:
        if process.returncode is None:
            process.terminate()
        assert await asyncio.wait_for(process.wait(), TIMEOUT) == 0
    await until(lambda: "cli" not in a.backplane.view.nodes, "the node stopped but a still counts it")


@pytest.mark.network_service
async def test_a_node_killed_its_producer_moves_to_another_node_and_its_stream_resumes(nats_servers, nodes):
    """The producer command, given two nodes' URLs, on node "doomed" (``python -m relay --nats``);
    b's worker serves, c's viewer watches. SIGKILL to doomed: the producer reconnects to a, a gives
    the channel b's worker, and results reach the viewer again.
    """
    a, b, c = nodes
    port = free_port()
    doomed = await Command.start(
        *("-m", "relay", "--port", str(port), "--nats", nats_servers[0].url, "--node-name", "doomed")
    )
    producer: Command | None = None
    try:
        await doomed.line(rf"relay listening on ws://127\.0\.0\.1:{port}", stream="out")
        assert b.backplane is not None
        await until(lambda: "doomed" in b.backplane.view.nodes, "b never heard the new node")  # type: ignore[union-attr]
        async with serving(b) as worker:
            viewer = await Viewer.join(c, "cam")
            producer = await Command.start(
                *("-m", "producers", "pattern", "--channel", "cam", "--fps", "30", "--size", "64x64"),
                *("--relay", f"ws://127.0.0.1:{port},{a.url}", "--json"),
            )
            assert await asyncio.wait_for(worker.assigned.get(), TIMEOUT) == "cam"
            async with asyncio.timeout(TIMEOUT):
                await viewer.reached(10)
            inputs_at_a = LocalViewer(a.hub, "cam", receive="input")
            killed = time.monotonic()
            await doomed.kill()
            # the producer's first frame through a: every result from it on came that way
            first = (await inputs_at_a.next_frame(TIMEOUT)).seq
            inputs_at_a.close()
            async with asyncio.timeout(TIMEOUT):
                await viewer.reached(first)
            resumed = time.monotonic() - killed
            print(f"results resumed {resumed * 1000:.0f} ms after the node was killed")
            # (b's worker still serving doomed's channel takes a's frames at once); doomed counted
            # gone, a owns the channel and gives it a worker, and results keep coming
            await until(
                lambda: a.hub.channels["cam"].owner is None and a.hub.channels["cam"].worker is not None,
                "a never took the channel over",
            )
            owned = time.monotonic() - killed
            print(f"a owned the channel {owned * 1000:.0f} ms after the node was killed")
            async with asyncio.timeout(TIMEOUT):
                await viewer.reached(viewer.frames[-1].seq + 10)
            await producer.line(rf"reconnected to {a.url}")
            assert all(f.channel == "cam" and f.kind is FrameKind.OUTPUT for f in viewer.frames)
            await viewer.close()
            assert await producer.finish(signal.SIGINT) == 0
            assert json.loads(producer.out[-1])["reconnects"] == 1
    finally:
        await doomed.kill()
        if producer is not None:
            await producer.kill()


# -- no NATS needed -------------------------------------------------------------------


def test_the_relay_command_takes_a_nats_url_and_a_node_name():
    args = build_parser().parse_args(["--nats", "nats://10.0.0.5:4222", "--node-name", "gpu-1"])
    config = relay_config_from_args(args)
    assert (config.nats, config.node_name) == ("nats://10.0.0.5:4222", "gpu-1")
    assert RelayConfig().nats == ""  # a relay on its own by default
    with pytest.raises(ValueError, match="node_name"):
        RelayConfig(node_name="a.b").check()  # a NATS subject token: no dots


def test_channel_names_with_dots_are_one_subject_token():
    assert channel_subject("cam.1", "in") == "sd.ch.cam~1.in"
    assert channel_subject("cam.1", "out") != channel_subject("cam", "1.out")


def test_a_node_counts_the_worker_slots_other_nodes_took():
    info = WorkerInfo(id="w", capacity=3, channels={"x": "a", "y": "b", "z": "b"})
    assert (info.free_for("a"), info.free_for("b"), info.free_for("c")) == (1, 2, 0)
    heartbeat = Heartbeat(node="b", workers=[info])
    assert decode(encode(heartbeat)) == heartbeat


def test_a_silent_node_is_gone_after_dead_after():
    view = ClusterView("a", dead_after=1.0)
    assert view.heard(Heartbeat(node="b"), now=10.0)
    assert not view.heard(Heartbeat(node="b"), now=10.5)
    assert view.expire(now=11.2) == [] and view.alive("b")
    assert view.expire(now=11.5) == ["b"] and not view.alive("b")
    view.heard(Heartbeat(node="c"), now=12.0)
    view.heard(Heartbeat(node="c", bye=True), now=12.1)
    assert not view.alive("c")


def test_a_channels_owner_is_a_node_of_its_producers_first_and_moves_only_with_its_own_node():
    held, fed = Claim(producers=False), Claim(producers=True)
    assert owner("cam", {"a": held, "b": fed, "c": held}) == "b"
    assert owner("cam", {"a": held, "b": held}) == owner("cam", {"b": held, "a": held})
    for home in "abc":  # the node that created a stream owns it while no node has its producers
        assert owner("cam", {"a": held, "b": held, "c": held}, home=home) == home
    assert owner("cam", {"a": held, "b": fed}, home="a") == "b"
    view = ClusterView("b", dead_after=1.0)
    view.heard(Heartbeat(node="a"), now=0.0)  # a's claim not heard yet: its being home is enough
    assert view.owner("cam", held, home="a") == ("a", Claim(producers=False))
    assert view.owner("cam", held, home="gone")[0] == "b"
    # a stream's pushes: on its creator while alive, else on one node holding it (the same everywhere)
    assert view.pusher("cam", home="a") == "a" and view.pusher("cam", home="b") == "b"
    assert view.pusher("cam", home="gone") == "b"  # a holds nothing: b alone
    view.heard(Heartbeat(node="a", homes={"cam": held}), now=0.0)
    assert view.pusher("cam", home="gone") == owner("cam", {"a": held, "b": held})
    channels = [f"ch{i}" for i in range(200)]
    three = {ch: owner(ch, {"a": held, "b": held, "c": held}) for ch in channels}
    assert set(three.values()) == {"a", "b", "c"}, "rendezvous hashing spreads channels over the nodes"
    two = {ch: owner(ch, {"a": held, "b": held}) for ch in channels}
    assert all(two[ch] == three[ch] for ch in channels if three[ch] != "c"), "only c's channels moved"


def test_the_compose_files_nats_config_is_valid_with_jetstream_and_room_for_frames(tmp_path):
    """docker-compose.cluster.yml cannot run here (no Docker engine): its NATS config is checked by
    the real nats-server (``-t``), and the nodes' registry replicas fit its three servers."""
    compose = yaml.safe_load((Path(__file__).parents[1] / "docker-compose.cluster.yml").read_text())
    content = compose["configs"]["nats"]["content"]
    assert "jetstream" in content and "max_payload: 16MB" in content
    conf = tmp_path / "nats.conf"
    conf.write_text(content.replace("${NATS_PASSWORD}", "pw").replace("/data", str(tmp_path / "js")))
    checked = subprocess.run([_nats_server(), "-c", str(conf), "-t"], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    servers = [name for name in compose["services"] if name.startswith("nats-")]
    replicas = compose["x-node"]["environment"]["STREAMDIFFUSION_SERVER__CLUSTER_STREAMS_REPLICAS"]
    assert int(replicas) == len(servers) == 3


def test_a_heartbeats_claims_leave_out_their_defaults_and_read_back_whole():
    owned = Claim(producers=True, state=EngineState.READY, worker="w1", fps_in=30.0, fps_out=29.5)
    heartbeat = Heartbeat(node="a", homes={"cam": owned, "held": Claim(producers=False)})
    data = encode(heartbeat)
    assert b'"held":{"producers":false}' in data
    assert decode(data) == heartbeat
