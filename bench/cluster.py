"""Relay nodes over NATS: what the backplane and a node crossing add to latency and server CPU.

    .venv/bin/python -m bench.cluster            # ~1.5 min on 2 cores
    .venv/bin/python -m bench.cluster --quick    # ~40 s: short windows
    .venv/bin/python -m bench.cluster --json     # machine-readable result on stdout
    .venv/bin/python -m bench.cluster --repeat 3 --quiet-wait 10   # on a shared machine
    .venv/bin/python -m bench.cluster --nats-gomaxprocs 1   # nats-servers on one Go thread each

Needs nats-server (``apt-get install nats-server``) and nats-py (``pip install -e .[cluster]``).
Every relay runs in its own process (uvloop when installed), every nats-server in its own;
the clients (producers, echo workers, viewers) all run in this process, with the producer,
viewer, pacing and echo code of ``bench/relay.py``. Per channel: one producer, one echo
worker pinned to the channel (each input frame back as an output frame), one viewer of the
outputs. Frames: ``bench/relay.py``'s 512x512 JPEG (~51 KB).

Cases, each with 1 and 10 channels, 30 fps paced and max rate (open loop):

* ``1 node``: one relay without NATS (the reference);
* ``1 node+NATS``: one relay with its backplane on (one nats-server), everything on it:
  the cost of sharing every frame with the cluster when nobody else wants it;
* ``A->B``: relays A and B on two nats-servers routed to each other (as on two machines):
  producer and worker on A, viewer on B; the output crosses once;
* ``A->B->A``: producer and viewer on A, worker on B (the GPU on another node): the
  assignment goes to B over NATS, input and output each cross once.

Figures: delivered frames/s, latency p50/p99 (viewer receive time - producer send time,
one clock), drops, CPU of the relays and of the nats-servers (% of one core), server CPU
(relays + nats-servers) per delivered frame and its inverse, frames per server CPU-second,
each relay's CPU per frame (to size a node), the client's CPU, and the rest of the
machine's busy CPU (``!``: above 20% of a core, the row is skewed). A closing table puts
each case beside ``1 node``: added p50 and p99, CPU per frame as a ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # ``python bench/cluster.py``
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from bench.relay import (
    BUSY,
    Stream,
    _busy_cpu,
    _client_loop,
    _drain,
    _echo,
    _proc_cpu,
    _produce,
    _view,
    binary_maker,
    parse_binary,
    run_and_print,
    test_jpeg,
    wait_quiet,
)
from bench.relay_servers import _new_loop


@dataclass(frozen=True)
class Case:
    label: str
    nats: bool
    relays: int
    #: which relay (index) each client connects to
    producer: int
    worker: int
    viewer: int


CASES = (
    Case("1 node", nats=False, relays=1, producer=0, worker=0, viewer=0),
    Case("1 node+NATS", nats=True, relays=1, producer=0, worker=0, viewer=0),
    Case("A->B", nats=True, relays=2, producer=0, worker=0, viewer=1),
    Case("A->B->A", nats=True, relays=2, producer=0, worker=1, viewer=0),
)
REFERENCE = "1 node"
MODES = ("30fps", "max")
READY_S = 15.0  # at most this long for every channel's first frame to reach its viewer


# -- servers ----------------------------------------------------------------------


def relay_node(conn: Any, nats_url: str, node: str, peers: int) -> None:
    """A relay process (node ``node`` on ``nats_url``; no NATS when empty): it sends its port once
    it hears ``peers`` other nodes, and stops when the parent sends anything."""
    import logging

    logging.basicConfig(level=logging.ERROR)

    async def main() -> None:
        from relay import Relay, RelayConfig

        relay = Relay(RelayConfig(host="127.0.0.1", port=0, max_channels=1024, nats=nats_url, node_name=node))
        await relay.start()
        while relay.backplane is not None and len(relay.backplane.view.nodes) < peers:
            await asyncio.sleep(0.02)  # polling a condition; the parent's deadline bounds it
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def wait_for_parent() -> None:
            with contextlib.suppress(EOFError):
                conn.recv()
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=wait_for_parent, daemon=True).start()
        conn.send(relay.port)
        await stop.wait()
        with contextlib.suppress(Exception):  # a benchmark shutting down: nothing to save
            await asyncio.wait_for(relay.close(), 3)

    with asyncio.Runner(loop_factory=_new_loop) as runner:
        runner.run(main())


@dataclass
class Servers:
    ports: list[int]
    relay_pids: list[int]
    nats_pids: list[int]


@contextlib.contextmanager
def _environ(name: str, value: str | None) -> Iterator[None]:
    """``name`` set to ``value`` (unset: None) for the processes started inside the block."""
    old = os.environ.pop(name, None)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)
        if old is not None:
            os.environ[name] = old


@contextlib.contextmanager
def servers(case: Case, gomaxprocs: int | None = None) -> Iterator[Servers]:
    """``case``'s nats-servers (routed to each other) and relays, each relay on its own nats-server;
    ``gomaxprocs``: the nats-servers' GOMAXPROCS (None: Go's default, one per core)."""
    from tests.test_cluster import nats_cluster  # the tests' NATS cluster: real, routed nats-servers

    ctx = mp.get_context("spawn")
    with contextlib.ExitStack() as stack:
        nats = []
        if case.nats:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-nats-")))
            with _environ("GOMAXPROCS", None if gomaxprocs is None else str(gomaxprocs)):
                nats = stack.enter_context(nats_cluster(directory, case.relays))
        processes, pipes = [], []
        try:
            for i in range(case.relays):
                parent, child = ctx.Pipe()
                url = nats[i].url if nats else ""
                process = ctx.Process(
                    target=relay_node, args=(child, url, "AB"[i], case.relays - 1), daemon=True
                )
                process.start()
                processes.append(process)
                pipes.append(parent)
            ports = []
            for parent in pipes:
                if not parent.poll(READY_S):
                    raise RuntimeError(f"{case.label}: a relay did not start (or never heard the others)")
                ports.append(parent.recv())
            yield Servers(ports, [p.pid for p in processes], [s.process.pid for s in nats])
        finally:
            for parent in pipes:
                with contextlib.suppress(OSError):
                    parent.send("stop")
            for process in processes:
                process.join(5)
                if process.is_alive():
                    process.terminate()


# -- one case ---------------------------------------------------------------------------


async def open_streams(case: Case, ports: list[int], names: list[str], jpeg: bytes) -> list[Stream]:
    from relay.client import connect

    def url(index: int) -> str:
        return f"ws://127.0.0.1:{ports[index]}"

    streams = []
    for name in names:
        worker, _ = await connect(url(case.worker), "worker", capacity=1, channels=[name], name="echo")
        viewer, _ = await connect(url(case.viewer), "viewer", name, receive="output")
        producer, _ = await connect(url(case.producer), "producer", name, receive="none")
        s = Stream(name, producer, [viewer], [worker], binary_maker(name, jpeg), parse_binary)
        for ws in (producer, viewer, worker):
            ws.close_timeout = 1
        s.received = [[]]
        streams.append(s)
    return streams


async def run_case(
    case: Case,
    running_servers: Servers,
    channels: int,
    mode: str,
    args: argparse.Namespace,
    jpeg: bytes,
    tag: str,
) -> dict[str, Any]:
    names = [f"{tag}-{i}" for i in range(channels)]
    streams = await open_streams(case, running_servers.ports, names, jpeg)
    running = [True]
    tasks = []
    for s in streams:
        tasks.append(asyncio.create_task(_view(s, s.viewers[0], s.received[0])))
        tasks.append(asyncio.create_task(_drain(s)))
        tasks += [asyncio.create_task(_echo(w)) for w in s.extra]
    producers = [asyncio.create_task(_produce(s, mode, i / channels, running)) for i, s in enumerate(streams)]
    # every channel assigned and flowing end to end (over NATS: subscriptions and the remote
    # assignment take a few round trips) before the warm-up starts
    async with asyncio.timeout(READY_S):
        for s in streams:
            while s.latest < 0:
                s.progress.clear()
                await s.progress.wait()
    await asyncio.sleep(args.warmup)
    pids = running_servers.relay_pids + running_servers.nats_pids

    def cpu() -> tuple[float, list[float], float, float]:
        return time.time(), [_proc_cpu(pid) for pid in pids], time.process_time(), _busy_cpu()

    t0, srv0, cli0, all0 = cpu()
    await asyncio.sleep(args.duration_paced if mode.endswith("fps") else args.duration_max)
    t1, srv1, cli1, all1 = cpu()
    running[0] = False
    await asyncio.sleep(args.grace)  # frames in flight still count as delivered (not in the rate)
    for task in producers:
        task.cancel()
    conns = [ws for s in streams for ws in (s.producer, *s.viewers, *s.extra)]
    await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)
    await asyncio.gather(*tasks, *producers, return_exceptions=True)

    span = t1 - t0
    sent = delivered = drops = 0
    latencies = []
    for s in streams:
        window = [seq for seq, ts in enumerate(s.sent) if t0 <= ts <= t1]
        sent += len(window)
        got = set()
        for now, seq, ts, _ in s.received[0]:
            got.add(seq)
            if t0 <= now <= t1:
                delivered += 1
                latencies.append(now - ts)
        drops += sum(1 for seq in window if seq not in got)
    used = [b - a for a, b in zip(srv0, srv1, strict=True)]
    relays, nats = used[: len(running_servers.relay_pids)], used[len(running_servers.relay_pids) :]
    server = sum(used)
    lat = np.array(latencies) * 1000 if latencies else None
    return {
        "sent_fps": sent / span,
        "fps": delivered / span,
        "p50_ms": None if lat is None else float(np.percentile(lat, 50)),
        "p99_ms": None if lat is None else float(np.percentile(lat, 99)),
        "drops": drops,
        "delivered": delivered,
        "relay_cpu": sum(relays) / span,
        "nats_cpu": sum(nats) / span,
        "client_cpu": (cli1 - cli0) / span,
        "other_cpu": max(0.0, (all1 - all0) - server - (cli1 - cli0)) / span,
        "server_us_per_frame": server / delivered * 1e6 if delivered else None,
        "frames_per_cpu_s": delivered / server if server else None,
        "relay_us_per_frame": [r / delivered * 1e6 if delivered else None for r in relays],
        "nats_us_per_frame": sum(nats) / delivered * 1e6 if delivered and nats else None,
    }


# -- the whole run ------------------------------------------------------------------------


def run(args: argparse.Namespace, report: Callable[[str], None]) -> dict[str, Any]:
    jpeg = test_jpeg()
    results = []
    for case in CASES:
        if args.only and case.label not in args.only:
            continue
        with (
            servers(case, args.nats_gomaxprocs) as running_servers,
            asyncio.Runner(loop_factory=_client_loop) as runner,
        ):
            for channels in args.channels:
                for mode in args.modes:
                    tries = []
                    for attempt in range(args.repeat):
                        waited = runner.run(wait_quiet(args.quiet_wait)) if args.quiet_wait else 0.0
                        tag = f"case{CASES.index(case)}-{channels}-{mode}-{attempt}"
                        r = runner.run(run_case(case, running_servers, channels, mode, args, jpeg, tag))
                        r["waited_s"] = round(waited, 2)
                        tries.append(r)
                    r = min(tries, key=lambda t: t["other_cpu"])  # the least disturbed try
                    per_frame = [t["server_us_per_frame"] for t in tries if t["server_us_per_frame"]]
                    r["server_us_per_frame_range"] = [min(per_frame), max(per_frame)] if per_frame else None
                    r.update(label=case.label, channels=channels, mode=mode, tries=len(tries))
                    results.append(r)
                    report(_row(r))
    return {"jpeg_bytes": len(jpeg), "results": results, "comparison": compare(results)}


def compare(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each case beside the reference at the same channels and mode."""
    index = {(r["label"], r["channels"], r["mode"]): r for r in results}
    out = []
    for r in results:
        ref = index.get((REFERENCE, r["channels"], r["mode"]))
        if ref is None or r["label"] == REFERENCE:
            continue
        row: dict[str, Any] = {"label": r["label"], "channels": r["channels"], "mode": r["mode"]}
        for key in ("p50_ms", "p99_ms"):
            row[f"added_{key}"] = None if r[key] is None or ref[key] is None else r[key] - ref[key]
        ours, theirs = r["server_us_per_frame"], ref["server_us_per_frame"]
        row["cpu_ratio"] = ours / theirs if ours and theirs else None
        ours, theirs = sum(r["relay_us_per_frame"]), ref["relay_us_per_frame"][0]
        row["relay_cpu_ratio"] = ours / theirs if ours and theirs else None
        row["fps_ratio"] = r["fps"] / ref["fps"] if ref["fps"] else None
        out.append(row)
    return out


HEAD = (
    f"{'case':<12} {'ch':>3} {'mode':>5} {'sent/s':>7} {'recv/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
    f"{'drops':>5} {'relays':>6} {'nats':>5} {'srv us/f':>8} {'f/cpu-s':>7} {'relay us/f':>11} "
    f"{'cli':>4} {'other':>5}"
)


def _num(value: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def _row(r: dict[str, Any]) -> str:
    flag = "!" if r["other_cpu"] > BUSY else " "
    per_relay = "/".join("-" if v is None else f"{v:.0f}" for v in r["relay_us_per_frame"])
    return (
        f"{r['label']:<12} {r['channels']:>3} {r['mode']:>5} {r['sent_fps']:>7.0f} {r['fps']:>7.0f} "
        f"{_num(r['p50_ms'], 7, 2)} {_num(r['p99_ms'], 7, 2)} {r['drops']:>5} {r['relay_cpu']:>6.0%} "
        f"{r['nats_cpu']:>5.0%} {_num(r['server_us_per_frame'], 8, 0)} {_num(r['frames_per_cpu_s'], 7, 0)} "
        f"{per_relay:>11} {r['client_cpu']:>4.0%} {r['other_cpu']:>4.0%}{flag}"
    )


COMPARE_HEAD = (
    f"{'case':<12} {'ch':>3} {'mode':>5} {'+p50 ms':>8} {'+p99 ms':>8} {'srv cpu/f':>9} "
    f"{'relay cpu/f':>11} {'recv/s':>7}"
)


def format_report(machine: dict[str, Any], out: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}, "
        f"websockets {machine['websockets']}, {machine['loop']}",
        f"frames: 512x512 JPEG, {out['jpeg_bytes']} bytes; warm-up {args.warmup:g} s, window "
        f"{args.duration_paced:g} s at 30 fps, {args.duration_max:g} s at max; best of {args.repeat}"
        + (f"; nats-server GOMAXPROCS={args.nats_gomaxprocs}" if args.nats_gomaxprocs else ""),
        "",
        HEAD,
        "-" * len(HEAD),
        *(_row(r) for r in out["results"]),
        "",
        "relays / nats: CPU of the relay processes / nats-servers (% of one core); srv us/f: their CPU",
        "per delivered frame; f/cpu-s: delivered frames per second of their CPU; relay us/f: each",
        "relay's CPU per delivered frame (A/B); cli: this client process; other: the rest of the",
        f"machine (! above {BUSY:.0%} of a core: skewed).",
        "",
        f"beside '{REFERENCE}' (same channels and mode): added latency, server CPU per frame and",
        "relay CPU per frame (sum of the relays) as ratios, delivered frames/s as a ratio",
        COMPARE_HEAD,
    ]
    for q in out["comparison"]:
        lines.append(
            f"{q['label']:<12} {q['channels']:>3} {q['mode']:>5} {_num(q['added_p50_ms'], 8, 2)} "
            f"{_num(q['added_p99_ms'], 8, 2)} {_num(q['cpu_ratio'], 8, 2)}x "
            f"{_num(q['relay_cpu_ratio'], 10, 2)}x "
            f"{_num(q['fps_ratio'], 6, 2)}x"
        )
    lines += ["", *goals(out["comparison"])]
    busy = [r for r in out["results"] if r["other_cpu"] > BUSY]
    if busy:
        lines.append(
            f"\nwarning: {len(busy)} case(s) ran while other processes used more than {BUSY:.0%} of a "
            "core (marked !); rerun on a quiet machine or with --repeat 3 --quiet-wait 10"
        )
    return "\n".join(lines)


def goals(comparison: list[dict[str, Any]]) -> list[str]:
    """Issue 15's goals: crossing nodes adds at most 1 ms p50 at 10 channels x 30 fps; server CPU
    per delivered frame with NATS within 1.5x of one node."""
    index = {(q["label"], q["channels"], q["mode"]): q for q in comparison}
    lines = []
    for label in ("A->B", "A->B->A"):
        q = index.get((label, 10, "30fps"))
        if q and q["added_p50_ms"] is not None:
            met = "met" if q["added_p50_ms"] <= 1.0 else "NOT met"
            lines.append(
                f"goal: {label} adds <= 1 ms p50 at 10 ch x 30 fps: +{q['added_p50_ms']:.2f} ms, {met}"
            )
    for label in ("1 node+NATS", "A->B", "A->B->A"):
        for q in comparison:
            if q["label"] == label and q["cpu_ratio"] is not None:
                met = "met" if q["cpu_ratio"] <= 1.5 else "NOT met"
                lines.append(
                    f"goal: {label} server CPU per frame <= 1.5x one node ({q['channels']} ch, {q['mode']}): "
                    f"{q['cpu_ratio']:.2f}x, {met}"
                )
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short windows")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--channels", type=int, nargs="+", default=[1, 10])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--only", nargs="+", choices=[c.label for c in CASES], help="run only these cases")
    p.add_argument("--warmup", type=float)
    p.add_argument("--duration-max", type=float, help="window at max rate, seconds")
    p.add_argument("--duration-paced", type=float, help="window at 30 fps, seconds")
    p.add_argument("--repeat", type=int, default=1, help="run each case N times, keep the least disturbed")
    p.add_argument(
        "--quiet-wait", type=float, default=0.0, metavar="S", help="wait up to S s for an idle machine first"
    )
    p.add_argument(
        "--nats-gomaxprocs",
        type=int,
        metavar="N",
        help="run the nats-servers with GOMAXPROCS=N (default: Go's, one per core)",
    )
    args = p.parse_args(argv)
    args.grace = 0.15 if args.quick else 0.3
    if args.warmup is None:
        args.warmup = 0.25 if args.quick else 0.5
    if args.duration_max is None:
        args.duration_max = 0.6 if args.quick else 2.0
    if args.duration_paced is None:
        args.duration_paced = 1.0 if args.quick else 3.0
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = {
        "warmup_s": args.warmup,
        "window_max_s": args.duration_max,
        "window_30fps_s": args.duration_paced,
        "channels": args.channels,
        "modes": args.modes,
        "repeat": args.repeat,
        "nats_gomaxprocs": args.nats_gomaxprocs,
    }
    run_and_print(args, HEAD, run, format_report, settings)


if __name__ == "__main__":
    main()
