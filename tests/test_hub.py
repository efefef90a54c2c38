"""The hub's routing rules and the in-process session pipeline, without sockets.

Peers here are bare :class:`relay.hub.Peer` objects; what the hub gives them
is read from their outboxes: frames as deliveries, control messages as the
typed models a transport would encode.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest

from api.seeds.channel import Result, SessionChannel
from relay.config import RelayConfig
from relay.hub import Delivery, Hub, Peer
from relay.local import CLOSED, LocalProducer, LocalSession, LocalViewer
from relay.outbox import Outbox
from tests.helpers import jpeg, noise_png
from wire.errors import ErrorCode, ProtocolError
from wire.frames import Frame, FrameKind, ImageFormat, encode_frame
from wire.messages import LegacyImage, Params, Ping, Receive, Report, ReportEvent, Role, StatsRequest
from wire.relay_messages import (
    Ack,
    Assign,
    ChannelParams,
    ChannelState,
    EngineState,
    ParamsAck,
    Pong,
    Release,
    StatsReply,
    Status,
)

W, H = 64, 48


def hub(**config: Any) -> Hub:
    return Hub(RelayConfig(port=0, **config))


def peer(role: Role, channel: str = "cam", name: str | None = None, **fields: Any) -> Peer:
    return Peer(id=name or f"{role.value}-{channel}", role=role, channel=channel, outbox=Outbox(), **fields)


def frame(
    seq: int,
    channel: str = "cam",
    kind: FrameKind = FrameKind.INPUT,
    payload: bytes | None = None,
    params_version: int = 0,
    **header: Any,
) -> Frame:
    fields = {"width": W, "height": H, "format": ImageFormat.JPEG, **header}
    return Frame(
        channel=channel,
        seq=seq,
        timestamp=time.time(),
        payload=payload or jpeg(W, H, seed=seq),
        kind=kind,
        params_version=params_version,
        **fields,
    )


async def pending(p: Peer) -> tuple[list[Any], list[Frame]]:
    """What the hub queued for ``p``: control messages and frames (empty when nothing came)."""
    try:
        control, deliveries = await asyncio.wait_for(p.outbox.take(), 0.02)
    except TimeoutError:
        return [], []
    return control, [d.frame for d in deliveries]


async def joined(h: Hub, *peers: Peer) -> None:
    for p in peers:
        h.join(p)
    for p in peers:
        await pending(p)  # forget the join's news


def waiting(channel: str, position: int, in_use: int, slots: int) -> Status:
    return Status(
        channel=channel,
        state=ChannelState.WAITING_FOR_WORKER,
        position=position,
        in_use=in_use,
        slots=slots,
    )


def route(h: Hub, p: Peer, f: Frame) -> None:
    h.route(p, f, encode_frame(f))


# -- frames -------------------------------------------------------------------


async def test_input_goes_to_the_worker_and_input_viewers_output_to_output_receivers():
    h = hub()
    worker, producer = peer(Role.WORKER), peer(Role.PRODUCER)
    raw_viewer = peer(Role.VIEWER, name="raw", receive=Receive.INPUT)
    viewer = peer(Role.VIEWER, name="out")
    both = peer(Role.VIEWER, name="both", receive=Receive.BOTH)
    mute = peer(Role.PRODUCER, name="mute", receive=Receive.NONE)
    await joined(h, worker, producer, raw_viewer, viewer, both, mute)
    route(h, producer, frame(7))
    assert [f.seq for f in (await pending(worker))[1]] == [7]
    assert [f.kind for f in (await pending(raw_viewer))[1]] == [FrameKind.INPUT]
    assert [f.kind for f in (await pending(both))[1]] == [FrameKind.INPUT]
    for p in (viewer, producer, mute):
        assert (await pending(p))[1] == []
    route(h, worker, frame(7, kind=FrameKind.OUTPUT, params_version=3))
    for p in (viewer, producer, both):
        assert [(f.seq, f.kind) for f in (await pending(p))[1]] == [(7, FrameKind.OUTPUT)]
    for p in (raw_viewer, mute, worker):
        assert (await pending(p))[1] == []
    channel = h.channels["cam"]
    assert (channel.frames_in.total, channel.frames_out.total, channel.output_params_version) == (1, 1, 3)


async def test_a_receiver_keeps_only_the_newest_frame_and_the_hub_counts_the_drops():
    h = hub()
    worker, producer, viewer = (
        peer(Role.WORKER),
        peer(Role.PRODUCER),
        peer(Role.VIEWER, receive=Receive.INPUT),
    )
    await joined(h, worker, producer, viewer)
    for seq in range(5):
        route(h, producer, frame(seq))
    assert [f.seq for f in (await pending(worker))[1]] == [4]
    assert [f.seq for f in (await pending(viewer))[1]] == [4]
    assert h.channels["cam"].drops == {"worker": 4, "viewers": 4, "no_worker": 0}


async def test_frames_with_no_worker_are_counted_and_the_producer_is_told():
    h = hub()
    producer = peer(Role.PRODUCER)
    h.join(producer)
    assert (await pending(producer))[0] == [waiting("cam", 1, 0, 0)]
    route(h, producer, frame(0))
    assert h.channels["cam"].drops["no_worker"] == 1
    assert h.channels["cam"].engine_state is EngineState.WAITING_FOR_WORKER


async def test_result_latency_is_observed_from_input_to_output():
    h = hub()
    seen: list[tuple[str, float]] = []
    h.latency_observers.append(lambda channel, seconds: seen.append((channel, seconds)))
    worker, producer = peer(Role.WORKER), peer(Role.PRODUCER)
    await joined(h, worker, producer)
    route(h, producer, frame(3))
    route(h, worker, frame(3, kind=FrameKind.OUTPUT))
    assert len(seen) == 1 and seen[0][0] == "cam" and 0 <= seen[0][1] < 1
    assert h.channels["cam"].stats()["latency_ms"]["p50"] is not None


@pytest.mark.parametrize(
    ("sender", "make", "code"),
    [
        (Role.PRODUCER, lambda: frame(1, payload=b"not an image"), ErrorCode.BAD_IMAGE),
        (Role.PRODUCER, lambda: frame(1, width=W + 1), ErrorCode.BAD_IMAGE),
        (Role.PRODUCER, lambda: frame(1, format=ImageFormat.PNG), ErrorCode.BAD_IMAGE),
        (
            Role.PRODUCER,
            lambda: frame(1, payload=jpeg(320, 240), width=320, height=240),
            ErrorCode.RESOLUTION_TOO_LARGE,
        ),
        (
            Role.PRODUCER,
            lambda: frame(1, payload=noise_png(200, 200), width=200, height=200, format=ImageFormat.PNG),
            ErrorCode.FRAME_TOO_LARGE,
        ),
        (Role.PRODUCER, lambda: frame(1, channel="elsewhere"), ErrorCode.UNKNOWN_CHANNEL),
        (Role.PRODUCER, lambda: frame(1, kind=FrameKind.OUTPUT), ErrorCode.NOT_ALLOWED),
        (Role.WORKER, lambda: frame(1, kind=FrameKind.INPUT), ErrorCode.NOT_ALLOWED),
        (Role.WORKER, lambda: frame(1, channel="other", kind=FrameKind.OUTPUT), ErrorCode.UNKNOWN_CHANNEL),
        (Role.VIEWER, lambda: frame(1), ErrorCode.NOT_ALLOWED),
    ],
)
async def test_refused_frames_raise_a_protocol_error_with_its_code(sender, make, code):
    h = hub(max_frame_bytes=64 * 1024, max_width=256, max_height=256)
    peers = {
        Role.WORKER: peer(Role.WORKER),
        Role.PRODUCER: peer(Role.PRODUCER),
        Role.VIEWER: peer(Role.VIEWER),
    }
    await joined(h, *peers.values())
    with pytest.raises(ProtocolError) as refused:
        route(h, peers[sender], make())
    assert refused.value.code is code
    assert h.channels["cam"].frames_in.total == 0 and h.channels["cam"].frames_out.total == 0


async def test_seed_002_images_are_probed_numbered_and_acked():
    h = hub()
    worker, producer, viewer = peer(Role.WORKER), peer(Role.PRODUCER), peer(Role.VIEWER)
    await joined(h, worker, producer, viewer)
    for _ in range(2):
        h.on_message(producer, LegacyImage(data=jpeg(W, H), timestamp=5.0))
        assert (await pending(producer))[0] == [Ack()]
    routed = (await pending(worker))[1]
    assert [(f.seq, f.width, f.height, f.timestamp) for f in routed] == [(1, W, H, 5.0)]
    h.on_message(worker, LegacyImage(data=jpeg(W, H)))  # a JSON worker: output for the last input
    assert [(f.seq, f.kind) for f in (await pending(viewer))[1]] == [(1, FrameKind.OUTPUT)]
    with pytest.raises(ProtocolError) as refused:
        h.on_message(producer, LegacyImage(data=b"GIF89a"))
    assert refused.value.code is ErrorCode.BAD_IMAGE


# -- workers ------------------------------------------------------------------


async def test_channels_go_to_the_least_loaded_worker_with_room_and_move_when_it_leaves():
    h = hub()
    big = peer(Role.WORKER, name="big", capacity=2)
    small = peer(Role.WORKER, name="small")
    await joined(h, big, small)
    producers = [peer(Role.PRODUCER, channel=name) for name in ("a", "b", "c", "d")]
    for p in producers:
        h.join(p)
    assert (h.channels["a"].worker, h.channels["b"].worker, h.channels["c"].worker) == (big, small, big)
    assert h.channels["d"].worker is None
    assert [m.channel for m in (await pending(big))[0]] == ["a", "c"]
    assert (await pending(small))[0] == [Assign(channel="b", params={}, version=0)]
    assert (await pending(producers[0]))[0] == [
        Status(channel="a", state=ChannelState.ASSIGNED, worker="big")
    ]
    assert (await pending(producers[3]))[0] == [waiting("d", 1, 3, 3)]
    for p in producers[1:3]:
        await pending(p)
    h.leave(big)  # a and c look for a worker: small is full
    # a and c wait too, the oldest channel first; the slots are small's one
    assert (await pending(producers[0]))[0] == [waiting("a", 1, 1, 1)]
    assert (await pending(producers[2]))[0] == [waiting("c", 2, 1, 1)]
    assert (await pending(producers[3]))[0] == [waiting("d", 3, 1, 1)]
    h.leave(producers[1])  # small's channel goes: it takes a waiting one
    assert (await pending(small))[0][0] == Release(channel="b")
    assert h.channels["a"].worker is small and h.channels["a"].engine_state is EngineState.LOADING
    assert (await pending(producers[0]))[0] == [
        Status(channel="a", state=ChannelState.ASSIGNED, worker="small")
    ]


async def test_a_pinned_worker_serves_only_its_channels():
    h = hub()
    pinned = peer(Role.WORKER, name="pinned", pinned=frozenset({"mine"}))
    await joined(h, pinned)
    h.join(peer(Role.PRODUCER, channel="other"))
    h.join(peer(Role.PRODUCER, channel="mine"))
    assert h.channels["other"].worker is None and h.channels["mine"].worker is pinned


async def test_a_held_channel_keeps_its_worker_with_no_producer():
    h = hub()
    worker = peer(Role.WORKER)
    await joined(h, worker)
    h.open_channel("held", {"prompt": "a fox"})
    assert (await pending(worker))[0] == [Assign(channel="held", params={"prompt": "a fox"}, version=1)]
    h.close_channel("held")
    assert (await pending(worker))[0] == [Release(channel="held")]
    assert "held" not in h.channels and worker.assigned == []


async def test_reports_move_the_engine_state_and_reach_the_channel_but_stats_stay():
    h = hub()
    worker, producer, viewer = peer(Role.WORKER), peer(Role.PRODUCER), peer(Role.VIEWER)
    await joined(h, worker, producer, viewer)
    channel = h.channels["cam"]
    assert channel.engine_state is EngineState.LOADING
    steps = [
        (ReportEvent.READY, {"engine": "filter"}, EngineState.READY),
        (ReportEvent.RELOADING, {}, EngineState.RELOADING),
        (ReportEvent.ERROR, {"reload_failed": True}, EngineState.READY),
        (ReportEvent.STATS, {"engine_ms": 3.0}, EngineState.READY),
    ]
    for event, data, state in steps:
        report = Report(channel="cam", event=event, message=f"{event} news", data=data)
        h.on_message(worker, report)
        assert channel.engine_state is state
        expected = [] if event is ReportEvent.STATS else [report]
        assert (await pending(producer))[0] == expected and (await pending(viewer))[0] == expected
    assert (channel.restart_count, channel.engine_info, channel.worker_stats) == (
        1,
        {"engine": "filter"},
        {"engine_ms": 3.0},
    )
    assert channel.last_error == "error news"
    with pytest.raises(ProtocolError) as refused:
        h.on_message(producer, Report(channel="cam", event=ReportEvent.READY))
    assert refused.value.code is ErrorCode.NOT_ALLOWED


async def test_an_engine_that_fails_to_load_puts_the_channel_in_error():
    h = hub()
    worker, producer = peer(Role.WORKER), peer(Role.PRODUCER)
    await joined(h, worker, producer)
    h.on_message(worker, Report(channel="cam", event=ReportEvent.ERROR, message="no GPU"))
    assert h.channels["cam"].engine_state is EngineState.ERROR
    h.leave(worker)
    assert h.channels["cam"].engine_state is EngineState.WAITING_FOR_WORKER


# -- control ------------------------------------------------------------------


async def test_params_are_merged_versioned_acked_and_sent_to_the_worker():
    h = hub()
    worker, producer, viewer = peer(Role.WORKER), peer(Role.PRODUCER), peer(Role.VIEWER)
    await joined(h, worker, producer, viewer)
    h.on_message(producer, Params(params={"prompt": "a cat"}))
    h.on_message(producer, Params(params={"seed": 3}))
    assert (await pending(producer))[0] == [
        ParamsAck(channel="cam", version=1),
        ParamsAck(channel="cam", version=2),
    ]
    assert (await pending(worker))[0][-1] == ChannelParams(
        channel="cam", params={"prompt": "a cat", "seed": 3}, version=2
    )
    h.on_message(producer, Params(params={"seed": 4}, replace=True))
    assert (await pending(worker))[0] == [ChannelParams(channel="cam", params={"seed": 4}, version=3)]
    for sender, message, code in [
        (viewer, Params(params={}), ErrorCode.NOT_ALLOWED),
        (producer, Params(params={}, channel="other"), ErrorCode.UNKNOWN_CHANNEL),
    ]:
        with pytest.raises(ProtocolError) as refused:
            h.on_message(sender, message)
        assert refused.value.code is code


async def test_stats_ping_and_late_hellos():
    h = hub()
    worker, producer = peer(Role.WORKER), peer(Role.PRODUCER)
    await joined(h, worker, producer, peer(Role.PRODUCER, channel="other"))
    h.on_message(producer, StatsRequest())
    h.on_message(worker, StatsRequest())
    h.on_message(producer, Ping())
    mine, pong = (await pending(producer))[0]
    assert (
        isinstance(mine, StatsReply)
        and list(mine.channels) == ["cam"]
        and isinstance(pong, Pong)
        and pong.timestamp
    )
    assert mine.channels["cam"]["engine_state"] == "loading" and mine.workers[0]["id"] == worker.id
    everything = (await pending(worker))[0][0]
    assert sorted(everything.channels) == ["cam", "other"]
    from wire.messages import Hello

    with pytest.raises(ProtocolError, match="after the handshake"):
        h.on_message(producer, Hello(role=Role.PRODUCER))


def test_channel_limits_and_allowed_names_refuse_before_joining():
    h = hub(max_channels=1, allowed_channels=frozenset({"a", "b"}))
    h.join(peer(Role.VIEWER, channel="a"))
    for channel, code in (("zzz", ErrorCode.UNKNOWN_CHANNEL), ("b", ErrorCode.TOO_MANY_CHANNELS)):
        with pytest.raises(ProtocolError) as refused:
            h.join(peer(Role.VIEWER, channel=channel))
        assert refused.value.code is code
    assert list(h.channels) == ["a"]


# -- in-process sessions -------------------------------------------------------


async def test_a_local_session_yields_typed_messages_then_frames_then_closed():
    h = hub()
    producer = LocalSession(h, "cam", Role.PRODUCER, Receive.OUTPUT)
    worker = peer(Role.WORKER, name="w1")
    events = producer.events()
    assert await anext(events) == waiting("cam", 1, 0, 0)
    await joined(h, worker)
    assert producer.publish(jpeg(W, H)) == 0  # bare bytes: the hub reads format and size
    (routed,) = (await pending(worker))[1]
    assert (routed.width, routed.height, routed.format, routed.channel) == (W, H, ImageFormat.JPEG, "cam")
    route(h, worker, frame(0, kind=FrameKind.OUTPUT))
    assert await anext(events) == Status(channel="cam", state=ChannelState.ASSIGNED, worker="w1")
    result = await anext(events)
    assert isinstance(result, Delivery) and result.frame.seq == 0 and result.raw[:2] == b"SD"
    producer.send(Ping())
    assert isinstance(await anext(events), Pong)
    producer.close()
    assert await anext(events) is CLOSED
    with pytest.raises(StopAsyncIteration):
        await anext(events)
    assert "cam" not in h.channels or not h.channels["cam"].producers


async def test_a_refused_image_takes_no_sequence_number_and_header_claims_are_checked():
    h = hub()
    with LocalProducer(h, "cam") as producer:
        with pytest.raises(ProtocolError) as refused:
            producer.publish(b"not an image")
        assert refused.value.code is ErrorCode.BAD_IMAGE
        with pytest.raises(ProtocolError):
            producer.publish(jpeg(W, H), W + 1, H)  # a frame header that lies
        assert producer.publish(jpeg(W, H), W, H) == 0
        assert producer.publish(jpeg(W, H)) == 1
    assert producer.closed


async def test_session_events_are_cancel_safe_under_a_timeout():
    h = hub()
    worker = peer(Role.WORKER)
    await joined(h, worker)
    viewer = LocalViewer(h, "cam")
    h.join(producer := peer(Role.PRODUCER))
    events = viewer.events()
    assert (await anext(events)).state is ChannelState.ASSIGNED
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(events), 0.02)
    route(h, producer, frame(1))
    route(h, worker, frame(1, kind=FrameKind.OUTPUT))
    event = await asyncio.wait_for(anext(events), 1)
    assert isinstance(event, Delivery) and event.frame.seq == 1
    viewer.close()


async def test_a_seed_session_channel_end_to_end_without_sockets():
    """Held channel with params -> worker assigned -> images in -> results (with latency) and news out."""
    h = hub()
    worker = peer(Role.WORKER, name="w1")
    await joined(h, worker)
    session = SessionChannel(h, "seed", {"prompt": "a fox"})
    assert session.has_worker and session.engine_state is EngineState.LOADING
    (assign,) = (await pending(worker))[0]
    assert assign == Assign(channel=session.name, params={"prompt": "a fox"}, version=1)
    events = session.events()  # assigned before the session joined: no status for it
    h.on_message(worker, Report(channel=session.name, event=ReportEvent.READY))
    assert (await anext(events)).event is ReportEvent.READY
    assert session.engine_state is EngineState.READY
    assert session.set_params({"prompt": "a cat"}) == 2
    seqs = [session.publish(jpeg(W, H, seed=i)) for i in range(3)]
    control, inputs = await pending(worker)
    assert control == [ChannelParams(channel=session.name, params={"prompt": "a cat"}, version=2)]
    assert seqs == [0, 1, 2] and [f.seq for f in inputs] == [2]  # latest frame wins
    route(h, worker, inputs[0].as_output(inputs[0].payload, ImageFormat.JPEG, W, H, 2))
    result = await anext(events)
    assert isinstance(result, Result) and result.frame.seq == 2 and result.frame.params_version == 2
    assert result.latency_s is not None and result.latency_s >= 0
    session.close()
    assert await anext(events) is CLOSED
    assert (await pending(worker))[0] == [Release(channel=session.name)]
    assert session.engine_state is EngineState.CLOSED


# -- doors: keys, tokens, open channels, limits, worker shares (issue 11) -------


def net(role: Role, channel: str = "cam", token: str | None = None, **fields: Any) -> Peer:
    """A peer that joined over the network: the hub checks its token."""
    return peer(role, channel, network=True, token=token, **fields)


def refusal(h: Hub, p: Peer) -> ErrorCode | None:
    try:
        h.check_join(p)
    except ProtocolError as exc:
        return exc.code
    return None


def test_a_keyed_channel_takes_its_key_or_the_relay_token_and_workers_need_the_token():
    h = hub(tokens=frozenset({"relay-token"}), open_channels=True)
    h.open_channel("str_1", {"prompt": "a fox"}, key="stk_secret")
    assert h.channels["str_1"].key == "stk_secret" and "stk_secret" not in repr(h.channels["str_1"])
    for role in (Role.VIEWER, Role.PRODUCER):
        assert refusal(h, net(role, "str_1")) is ErrorCode.UNAUTHORIZED
        assert refusal(h, net(role, "str_1", token="stk_other")) is ErrorCode.UNAUTHORIZED
        assert refusal(h, net(role, "str_1", token="stk_secret")) is None
        assert refusal(h, net(role, "str_1", token="relay-token")) is None
        assert refusal(h, net(role, "open")) is None  # open channels stay tokenless
        assert refusal(h, peer(role, "str_1")) is None  # in process: the API itself
    assert refusal(h, net(Role.WORKER)) is ErrorCode.UNAUTHORIZED
    assert refusal(h, net(Role.WORKER, token="relay-token")) is None
    closed = hub(open_channels=False)
    assert refusal(closed, net(Role.VIEWER, "cam")) is ErrorCode.UNAUTHORIZED
    assert refusal(hub(tokens=frozenset({"t"})), net(Role.VIEWER, "cam")) is ErrorCode.UNAUTHORIZED
    assert refusal(hub(), net(Role.WORKER)) is None  # no tokens at all: a loopback dev relay


async def test_peers_without_the_key_are_sent_away_when_a_channel_gets_one():
    h = hub(tokens=frozenset({"t"}), open_channels=True)
    squatter, holder, local = (
        net(Role.VIEWER, "str_1"),
        net(Role.VIEWER, "str_1", token="k"),
        peer(Role.VIEWER, "str_1"),
    )
    await joined(h, squatter, holder, local)
    h.open_channel("str_1", {}, key="k")
    control, _ = await pending(squatter)
    assert [m.code for m in control] == [ErrorCode.UNAUTHORIZED] and squatter.outbox.closed
    assert h.channels["str_1"].viewers == {holder, local}


async def test_anonymous_peers_keep_to_the_channels_they_opened_and_their_share_of_the_table():
    h = hub(tokens=frozenset({"t"}), open_channels=True, max_channels=5)  # share 0.5: 2 channels
    squatter, neighbour = net(Role.VIEWER, "ws000-guess"), net(Role.PRODUCER, "open")
    await joined(h, squatter, neighbour)
    assert refusal(h, net(Role.VIEWER, "third")) is ErrorCode.TOO_MANY_CHANNELS
    assert refusal(h, net(Role.VIEWER, "open")) is None  # theirs stay open to them
    assert refusal(h, net(Role.VIEWER, "third", token="t")) is None  # the rest is the others'
    # the API opens a name an anonymous peer took first: it is the API's now, the squatter leaves
    h.open_channel("ws000-guess", {})
    control, _ = await pending(squatter)
    assert [m.code for m in control] == [ErrorCode.UNAUTHORIZED] and squatter.outbox.closed
    assert refusal(h, net(Role.VIEWER, "ws000-guess")) is ErrorCode.UNAUTHORIZED
    assert refusal(h, net(Role.VIEWER, "ws000-guess", token="t")) is None
    assert refusal(h, net(Role.VIEWER, "third")) is None  # the API's channel is not in their share
    # a relay without tokens has no credentials to keep apart: every channel stays open to all
    plain = hub(max_channels=2)
    plain.open_channel("ws000-x", {})
    assert refusal(plain, net(Role.VIEWER, "ws000-x")) is None


async def test_params_messages_and_merges_are_bounded_but_the_api_sets_what_its_doors_allow():
    h = hub(max_params_bytes=1000)
    worker, producer = peer(Role.WORKER), peer(Role.PRODUCER)
    await joined(h, worker, producer)
    with pytest.raises(ProtocolError) as refused:  # one message over the limit
        h.on_message(producer, Params(params={"prompt": "x" * 1000}))
    assert refused.value.code is ErrorCode.PARAMS_TOO_LARGE
    h.on_message(producer, Params(params={"a": "x" * 600}, replace=True))
    h.on_message(producer, Params(params={"b": "y" * 300}))
    with pytest.raises(ProtocolError) as refused:  # each under it, merged over it
        h.on_message(producer, Params(params={"c": "z" * 200}))
    assert refused.value.code is ErrorCode.PARAMS_TOO_LARGE and "grow" in str(refused.value)
    assert set(h.channels["cam"].params) == {"a", "b"}
    # a stream's params as the API set them (a style image: its own limit) may exceed it;
    # producers' merges may still add up to the limit to them
    style = {"ip_adapter_style_image_url": "data:image/png;base64," + "A" * 5000}
    h.set_params(h.channels["cam"], style, replace=True)
    h.on_message(producer, Params(params={"prompt": "p" * 900}))
    with pytest.raises(ProtocolError):
        h.on_message(producer, Params(params={"negative_prompt": "n" * 200}))
    sent = [m for m in (await pending(worker))[0] if isinstance(m, ChannelParams)]
    assert max(len(orjson.dumps(m.params)) for m in sent) <= 5000 + 100 + 1000


async def test_worker_reports_are_bounded_too():
    h = hub(max_params_bytes=1000)
    worker, producer = peer(Role.WORKER), peer(Role.PRODUCER)
    await joined(h, worker, producer)
    with pytest.raises(ProtocolError) as refused:
        h.on_message(worker, Report(channel="cam", event=ReportEvent.READY, data={"x": "y" * 1000}))
    assert refused.value.code is ErrorCode.PARAMS_TOO_LARGE
    assert h.channels["cam"].engine_state is EngineState.LOADING and (await pending(producer))[0] == []


async def test_anonymous_channels_keep_to_their_share_and_keyed_ones_go_first():
    h = hub(anonymous_share=0.5)
    worker = peer(Role.WORKER, name="w", capacity=2)
    await joined(h, worker)
    seeds = [h.open_channel(f"ws000-{i}", {}) for i in range(4)]  # no key: anonymous
    assert [c.worker is not None for c in seeds] == [True, False, False, False]
    stream = h.open_channel("str_1", {}, key="stk")
    assert stream.worker is worker  # the reserved half
    h.close_channel("ws000-0")  # the slot goes to the next seed: the stream is served
    assert seeds[1].worker is worker
    # a worker that leaves and comes back serves the keyed channel first
    h.leave(worker)
    solo = peer(Role.WORKER, name="solo")
    h.join(solo)
    assert solo.assigned == ["str_1"]
    # the share does not hold a lone seed client back on a one-slot server with no stream
    lone = hub()
    w = peer(Role.WORKER, name="w")
    await joined(lone, w)
    assert lone.open_channel("ws001-x", {}).worker is w
    # seed sessions joining as in-process peers mark the channels they create
    other = hub()
    await joined(other, peer(Role.WORKER, name="big", capacity=2))
    first, second = LocalProducer(other, "a"), LocalSession(other, "b", Role.PRODUCER, anonymous=True)
    third = LocalSession(other, "c", Role.PRODUCER, anonymous=True)
    assert other.channels["a"].worker and other.channels["b"].worker and other.channels["c"].worker is None
    for session in (first, second, third):
        session.close()


def test_a_full_channel_table_raises_a_typed_error_when_the_api_opens_one():
    h = hub(max_channels=1)
    h.open_channel("str_1", {}, key="k")
    with pytest.raises(ProtocolError) as refused:
        h.open_channel("str_2", {}, key="k2")
    assert refused.value.code is ErrorCode.TOO_MANY_CHANNELS and list(h.channels) == ["str_1"]


async def test_waiting_channels_hear_their_place_in_the_queue_as_it_changes():
    h = hub()
    worker = peer(Role.WORKER, capacity=2)
    a, b, c, d = (peer(Role.PRODUCER, channel=name) for name in "abcd")
    for p in (worker, a, b, c, d):
        h.join(p)
    await pending(a)
    await pending(b)
    assert [ch.name for ch in h.queue()] == ["c", "d"]
    assert (await pending(c))[0] == [waiting("c", 1, 2, 2)]
    assert (await pending(d))[0] == [waiting("d", 2, 2, 2)]
    late = peer(Role.VIEWER, channel="d")
    h.join(late)  # a viewer hears nothing until the queue changes
    h.leave(a)  # c gets a's slot, d moves up
    assert (await pending(c))[0] == [Status(channel="c", state=ChannelState.ASSIGNED, worker=worker.id)]
    assert (await pending(d))[0] == [waiting("d", 1, 2, 2)]
    assert (await pending(late))[0] == [waiting("d", 1, 2, 2)]
    second = peer(Role.PRODUCER, channel="d", name="d2")
    h.join(second)  # joins a waiting channel: told at once, the others hear nothing new
    assert (await pending(second))[0] == [waiting("d", 1, 2, 2)]
    assert (await pending(d))[0] == []
    assert waiting("d", 1, 2, 2).detail == "waiting for a slot: 2 of 2 in use (1st in the queue)"
    assert waiting("d", 1, 0, 0).detail == "waiting for a worker: none is connected"


async def test_anonymous_channels_wait_for_their_share():
    h = hub(anonymous_share=0.5)
    worker = peer(Role.WORKER, capacity=4)
    seeds = [peer(Role.PRODUCER, channel=f"s{i}", anonymous=True) for i in range(3)]
    for p in (worker, *seeds):
        h.join(p)
    assert [ch.worker is worker for ch in (h.channels[f"s{i}"] for i in range(3))] == [True, True, False]
    assert (await pending(seeds[2]))[0] == [waiting("s2", 1, 2, 2)]  # two of the share's two in use


async def test_a_channel_without_input_gives_its_slot_back_and_input_brings_a_worker_again():
    h = hub(idle_release_s=30)
    worker = peer(Role.WORKER)
    quiet_one, waiting_one = peer(Role.PRODUCER, channel="quiet"), peer(Role.PRODUCER, channel="next")
    for p in (worker, quiet_one, waiting_one):
        h.join(p)
    quiet, nxt = h.channels["quiet"], h.channels["next"]
    assert quiet.worker is worker and nxt.worker is None
    for p in (worker, quiet_one, waiting_one):
        await pending(p)
    assert quiet.assigned_time is not None
    assert h.release_idle(now=quiet.assigned_time + 29) == []  # not yet
    route(h, waiting_one, frame(0, channel="next"))  # input on a waiting channel is no reason to release
    assert h.release_idle(now=quiet.assigned_time + 30) == ["quiet"]
    assert quiet.worker is None and quiet.idle and quiet.engine_state is EngineState.IDLE
    assert nxt.worker is worker  # the slot went to the channel that waited
    told = (await pending(quiet_one))[0]
    assert told == [Status(channel="quiet", state=ChannelState.IDLE)]
    assert h.queue() == [] and "quiet" in h.channels  # idle is not waiting; the channel stays
    assert (await pending(worker))[0][0] == Release(channel="quiet")
    h.leave(waiting_one)  # the slot frees; an idle channel does not take it
    assert quiet.worker is None and worker.assigned == []
    route(h, quiet_one, frame(1, channel="quiet"))  # input is back
    assert quiet.worker is worker and not quiet.idle
    control, frames = await pending(worker)
    assert control[-1] == Assign(channel="quiet", params={}, version=0)
    assert [f.seq for f in frames] == [1]  # the frame that woke it is processed


async def test_idle_release_can_be_turned_off():
    h = hub(idle_release_s=0)
    worker, producer = peer(Role.WORKER), peer(Role.PRODUCER)
    await joined(h, worker, producer)
    assert h.release_idle(now=time.time() + 10**6) == []
    assert h.channels["cam"].worker is worker


async def test_a_workers_late_frames_and_reports_for_a_released_channel_are_dropped_quietly():
    """The worker sent them before it heard the release: no error back, nothing routed; a channel
    it never had is still an error."""
    h = hub()
    worker, producer, viewer = peer(Role.WORKER), peer(Role.PRODUCER), peer(Role.VIEWER)
    await joined(h, worker, producer, viewer)
    h.leave(producer)  # the channel goes: its worker is released
    assert (await pending(worker))[0] == [Release(channel="cam")]
    route(h, worker, frame(0, kind=FrameKind.OUTPUT))
    h.on_report(worker, Report(channel="cam", event=ReportEvent.STATS, data={"fps": 1}))
    assert await pending(worker) == ([], [])
    with pytest.raises(ProtocolError) as never:
        route(h, worker, frame(0, channel="other", kind=FrameKind.OUTPUT))
    assert never.value.code is ErrorCode.UNKNOWN_CHANNEL
