"""The pure protocol: round trips, and any input either decodes or raises ProtocolError."""

from __future__ import annotations

import base64

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import jpeg, noise_png
from wire import ProtocolError
from wire.frames import HEADER_SIZE, Frame, FrameKind, ImageFormat, decode_frame, encode_frame
from wire.images import probe_image
from wire.messages import Hello, LegacyImage, Params, decode_control

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
    try:
        decode_frame(bytes(data))
    except ProtocolError:
        pass


@given(st.one_of(st.text(max_size=200), st.binary(max_size=200),
                 st.dictionaries(st.sampled_from(["type", "role", "channel", "data", "params",
                                                  "format", "capacity", "token"]),
                                 st.one_of(st.none(), st.integers(-2**63, 2**63 - 1), st.text(max_size=20),
                                           st.sampled_from(["hello", "image", "params", "stats",
                                                            "viewer", "worker"])),
                                 max_size=6).map(lambda d: orjson.dumps(d).decode())))
@settings(max_examples=500)
def test_any_text_decodes_or_raises_protocol_error(text):
    try:
        decode_control(text)
    except ProtocolError as exc:
        assert exc.code in {"bad_message", "bad_image", "bad_role", "bad_channel"}


def test_hello_defaults_and_validation():
    hello = decode_control('{"type": "hello", "role": "viewer"}')
    assert isinstance(hello, Hello)
    assert (hello.channel, hello.receive, hello.encoding) == ("default", "output", "binary")
    with pytest.raises(ProtocolError) as exc:
        decode_control('{"type": "hello", "role": "worker", "capacity": 0}')
    assert "capacity" in str(exc.value)


def test_seed_002_image_message():
    image = jpeg()
    message = decode_control(orjson.dumps({"type": "image", "format": "JPEG",
                                           "data": base64.b64encode(image).decode(),
                                           "timestamp": 1234567890.123}))
    assert isinstance(message, LegacyImage)
    assert (message.data, message.image_format, message.timestamp) == (image, ImageFormat.JPEG,
                                                                       1234567890.123)


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
