"""The hub's side of a cluster, without sockets or NATS: what relay.cluster calls on it.

A channel another node gives to one of this hub's workers is ``remote``:
this hub serves it but never decides its worker (it neither queues it, nor
moves it to another local worker, nor releases it when idle); frames from
other nodes reach local receivers only.
"""

from __future__ import annotations

from relay.hub import Delivery
from tests.test_hub import frame, hub, joined, peer, pending
from wire.frames import Frame, FrameKind, encode_frame
from wire.messages import Receive, Report, ReportEvent, Role
from wire.relay_messages import Assign, ChannelParams, EngineState, Release


def delivered(f: Frame) -> Delivery:
    return Delivery(f, encode_frame(f))


async def test_another_node_gives_a_channel_to_a_local_worker_with_its_params_and_version():
    h = hub()
    worker = peer(Role.WORKER, capacity=1)
    await joined(h, worker)
    assert h.serve_remote("cam", worker, {"prompt": "fox"}, 7)
    control, _ = await pending(worker)
    assert control == [Assign(channel="cam", params={"prompt": "fox"}, version=7)]
    assert h.serve_remote("cam", worker, {"prompt": "fox"}, 7)  # asked again: already so
    assert not h.serve_remote("other", worker, {}, 1)  # full
    assert "other" not in h.channels
    pinned = peer(Role.WORKER, name="pinned", pinned=frozenset({"only"}))
    await joined(h, pinned)
    assert not h.serve_remote("elsewhere", pinned, {}, 1)


async def test_a_remote_channel_is_never_queued_moved_or_idled_here():
    h = hub(idle_release_s=1)
    first, second = peer(Role.WORKER, name="w1"), peer(Role.WORKER, name="w2")
    await joined(h, first)
    assert h.serve_remote("cam", first, {}, 1)
    viewer = peer(Role.VIEWER)
    await joined(h, viewer)
    channel = h.channels["cam"]
    assert h.queue() == [] and channel.remote
    assert h.release_idle(now=channel.assigned_time + 3600) == []  # its home node decides that
    h.leave(viewer)  # the last local peer: the channel stays, served for its home
    assert channel.worker is first and "cam" in h.channels
    h.join(second)
    h.leave(first)  # its home gives it another worker, not this hub
    assert channel.worker is None and h.queue() == [] and second.assigned == []
    h.unserve_remote("cam")
    assert "cam" not in h.channels


async def test_letting_a_remote_channel_go_releases_the_worker():
    h = hub()
    worker = peer(Role.WORKER)
    await joined(h, worker)
    h.serve_remote("cam", worker, {}, 1)
    await pending(worker)
    h.unserve_remote("cam")
    assert (await pending(worker))[0] == [Release(channel="cam")]
    assert worker.assigned == [] and "cam" not in h.channels


async def test_frames_from_other_nodes_reach_local_receivers_only():
    h = hub()
    worker = peer(Role.WORKER)
    raw = peer(Role.VIEWER, name="raw", receive=Receive.INPUT)
    viewer = peer(Role.VIEWER, name="out")
    await joined(h, worker, raw, viewer)
    h.serve_remote("cam", worker, {}, 1)
    await pending(worker)
    h.route_remote(delivered(frame(4)))
    assert [f.seq for f in (await pending(worker))[1]] == [4]
    assert [f.seq for f in (await pending(raw))[1]] == [4]
    assert (await pending(viewer))[1] == []
    h.route_remote(delivered(frame(4, kind=FrameKind.OUTPUT)))
    assert [(f.seq, f.kind) for f in (await pending(viewer))[1]] == [(4, FrameKind.OUTPUT)]
    h.route_remote(delivered(frame(5, channel="unknown")))  # no receiver here: nothing happens
    assert "unknown" not in h.channels


async def test_params_and_reports_shared_by_other_nodes():
    h = hub()
    worker = peer(Role.WORKER)
    await joined(h, worker)
    h.serve_remote("cam", worker, {}, 1)
    await pending(worker)
    h.remote_params("cam", {"prompt": "owl"}, 9)
    assert (await pending(worker))[0] == [ChannelParams(channel="cam", params={"prompt": "owl"}, version=9)]
    viewer = peer(Role.VIEWER, channel="seen")
    await joined(h, viewer)
    ready = Report(channel="seen", event=ReportEvent.READY, data={"engine": "filter"})
    h.remote_report(ready)
    assert h.channels["seen"].engine_state is EngineState.READY
    assert (await pending(viewer))[0] == [ready]


async def test_a_refused_assignment_goes_to_another_worker():
    h = hub()
    proxy, local = peer(Role.WORKER, name="proxy"), peer(Role.WORKER, name="local")
    producer = peer(Role.PRODUCER)
    await joined(h, proxy, producer)
    assert h.channels["cam"].worker is proxy
    await joined(h, local)  # busy elsewhere: cam stays with the proxy
    proxy.capacity = 0  # what the backplane does when the proxy's node says no
    h.unassign(proxy, "cam")
    assert h.channels["cam"].worker is local and proxy.assigned == []
