"""The pure protocol: round trips, and any input either decodes or raises ProtocolError."""

from __future__ import annotations

import base64
import contextlib

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import jpeg, noise_png
from wire import ProtocolError
from wire.errors import ErrorCode, UnknownMessageType
from wire.frames import HEADER_SIZE, Frame, FrameKind, ImageFormat, decode_frame, encode_frame
from wire.images import probe_image
from wire.messages import (
    Encoding,
    Hello,
    LegacyImage,
    Params,
    Receive,
    Report,
    ReportEvent,
    Role,
    decode_control,
    encode_control,
    legacy_image_message,
)
from wire.relay_messages import (
    Ack,
    Assign,
    ChannelParams,
    ChannelState,
    EngineState,
    Error,
    LegacyResult,
    ParamsAck,
    Pong,
    Release,
    Shutdown,
    StatsReply,
    Status,
    Welcome,
    decode_relay_message,
)

channels = st.from_regex(r"[A-Za-z0-9_.\-]{1,64}", fullmatch=True)
frames = st.builds(
    Frame,
    channel=channels,
    seq=st.integers(0, 2**64 - 1),
    timestamp=st.floats(allow_nan=False, allow_infinity=False),
    width=st.integers(0, 0xFFFF),
    height=st.integers(0, 0xFFFF),
    format=st.sampled_from(ImageFormat),
    payload=st.binary(max_size=256),
    kind=st.sampled_from(FrameKind),
    params_version=st.integers(0, 2**32 - 1),
)


@given(frames)
def test_frames_round_trip(frame):
    assert decode_frame(encode_frame(frame)) == frame


@given(st.binary(max_size=200))
@settings(max_examples=500)
def test_any_bytes_decode_or_raise_protocol_error(data):
    for decoder in (decode_frame, probe_image):
        try:
            decoder(data)
        except ProtocolError as exc:
            assert exc.code and str(exc)


@given(frames, st.integers(0, 40), st.integers(0, 255))
def test_corrupted_headers_decode_or_raise_protocol_error(frame, position, value):
    data = bytearray(encode_frame(frame))
    data[position % len(data)] = value
    with contextlib.suppress(ProtocolError):
        decode_frame(bytes(data))


@given(
    st.one_of(
        st.text(max_size=200),
        st.binary(max_size=200),
        st.dictionaries(
            st.sampled_from(["type", "role", "channel", "data", "params", "format", "capacity", "token"]),
            st.one_of(
                st.none(),
                st.integers(-(2**63), 2**63 - 1),
                st.text(max_size=20),
                st.sampled_from(["hello", "image", "params", "stats", "viewer", "worker"]),
            ),
            max_size=6,
        ).map(lambda d: orjson.dumps(d).decode()),
    )
)
@settings(max_examples=500)
def test_any_text_decodes_or_raises_protocol_error(text):
    try:
        decode_control(text)
    except ProtocolError as exc:
        assert exc.code in {"bad_message", "bad_image", "bad_role", "bad_channel"}


def test_hello_defaults_and_validation():
    hello = decode_control('{"type": "hello", "role": "viewer"}')
    assert isinstance(hello, Hello)
    assert (hello.channel, hello.receive, hello.encoding) == ("default", Receive.OUTPUT, Encoding.BINARY)
    with pytest.raises(ProtocolError) as exc:
        decode_control('{"type": "hello", "role": "worker", "capacity": 0}')
    assert "capacity" in str(exc.value)


def test_seed_002_image_message():
    image = jpeg()
    message = decode_control(
        orjson.dumps(
            {
                "type": "image",
                "format": "JPEG",
                "data": base64.b64encode(image).decode(),
                "timestamp": 1234567890.123,
            }
        )
    )
    assert isinstance(message, LegacyImage)
    assert (message.data, message.format, message.timestamp) == (image, ImageFormat.JPEG, 1234567890.123)


def test_params_message():
    message = decode_control('{"type": "params", "params": {"prompt": "a fox"}}')
    assert isinstance(message, Params) and message.params == {"prompt": "a fox"}


def test_probe_reads_real_image_headers():
    assert probe_image(jpeg(64, 48)) == (ImageFormat.JPEG, 64, 48)
    assert probe_image(noise_png(30, 20)) == (ImageFormat.PNG, 30, 20)
    with pytest.raises(ProtocolError) as exc:
        probe_image(jpeg(64, 48)[:20])
    assert exc.value.code == "bad_image"


def test_frame_header_is_32_bytes():
    assert HEADER_SIZE == 32


# what the relay sent before its messages were typed, byte for byte (the old dict builders' output)
RELAY_MESSAGES = [
    (
        Welcome(role=Role.PRODUCER, channel="cam1", session="9f2c01ab", limits={"max_frame_bytes": 8388608}),
        (
            '{"type":"welcome","role":"producer","channel":"cam1","session":"9f2c01ab","protocol":1,'
            '"limits":{"max_frame_bytes":8388608}}'
        ),
    ),
    (Error(code=ErrorCode.BAD_IMAGE, message="m"), '{"type":"error","code":"bad_image","message":"m"}'),
    (
        Assign(channel="c", params={"prompt": "a"}, version=2),
        '{"type":"assign","channel":"c","params":{"prompt":"a"},"version":2}',
    ),
    (Release(channel="c"), '{"type":"release","channel":"c"}'),
    (
        ChannelParams(channel="c", params={}, version=3),
        '{"type":"params","channel":"c","params":{},"version":3}',
    ),
    (ParamsAck(channel="c", version=1), '{"type":"params_ack","channel":"c","version":1}'),
    (
        Status(channel="c", state=ChannelState.WAITING_FOR_WORKER),
        '{"type":"status","channel":"c","state":"waiting_for_worker"}',
    ),
    (
        Status(channel="c", state=ChannelState.ASSIGNED, worker="w"),
        '{"type":"status","channel":"c","state":"assigned","worker":"w"}',
    ),
    (
        StatsReply(channels={"c": {"engine_state": EngineState.READY, "worker": None}}, workers=[]),
        '{"type":"stats","channels":{"c":{"engine_state":"ready","worker":null}},"workers":[]}',
    ),
    (
        Report(channel="c", event=ReportEvent.ERROR, message="x", data={"v": None}),
        '{"type":"report","channel":"c","event":"error","message":"x","data":{"v":null}}',
    ),
    (Pong(), '{"type":"pong"}'),
    (Shutdown(message="relay shutting down"), '{"type":"shutdown","message":"relay shutting down"}'),
    (Ack(), '{"type":"ack","status":"received"}'),
]


@pytest.mark.parametrize(("message", "text"), RELAY_MESSAGES)
def test_relay_messages_encode_to_the_same_bytes_and_decode_back(message, text):
    assert encode_control(message) == text
    assert decode_relay_message(text) == message


def test_legacy_results_decode_with_our_additions():
    image = jpeg()
    text = encode_control(
        legacy_image_message(ImageFormat.JPEG, image, 12.5, seq=3, channel="c", kind="output")
    )
    result = decode_relay_message(text)
    assert isinstance(result, LegacyResult)
    assert (result.data, result.format, result.seq, result.channel, result.kind) == (
        image,
        ImageFormat.JPEG,
        3,
        "c",
        "output",
    )


def test_unknown_types_are_their_own_error_and_codes_are_enums():
    for decoder in (decode_control, decode_relay_message):
        with pytest.raises(UnknownMessageType) as unknown:
            decoder('{"type": "launch_missiles"}')
        assert unknown.value.code is ErrorCode.BAD_MESSAGE
    with pytest.raises(ProtocolError) as bad:
        decode_relay_message('{"type": "status", "channel": "c", "state": "sleeping"}')
    assert bad.value.code is ErrorCode.BAD_MESSAGE
    assert ProtocolError("x", "bad_image").code is ErrorCode.BAD_IMAGE
    with pytest.raises(ValueError):
        ProtocolError("x", "no_such_code")


@pytest.mark.parametrize("version", [0, 2, 99, -1])
def test_a_hello_with_an_unknown_protocol_version_is_refused_with_its_own_code(version):
    with pytest.raises(ProtocolError) as refused:
        decode_control(orjson.dumps({"type": "hello", "role": "producer", "protocol": version}))
    assert refused.value.code is ErrorCode("unsupported_protocol")
    assert f"protocol version {version}" in str(refused.value) and "speaks 1" in str(refused.value)
    hello = decode_control('{"type": "hello", "role": "producer", "protocol": 1}')
    assert isinstance(hello, Hello) and hello.protocol == 1


def test_the_doors_have_their_error_codes_on_the_wire():
    for code in ("unsupported_protocol", "params_too_large", "rate_limited", "hello_timeout"):
        assert ErrorCode(code) == code
        assert (
            decode_relay_message(orjson.dumps({"type": "error", "code": code, "message": "m"})).code == code
        )
