"""python -m producers MODE: stream frames to a relay, or view a channel.

Exit codes: 0 done; 1 the relay could not be reached or closed the
connection early (and could not be reached again within --reconnect
seconds); 2 a usage problem (missing file or device, bad option, no
display); 130 interrupted twice.

A relay that restarts (or a connection that drops) is reached again: tries
come 0.25, 0.5, 1, 2, 2... s apart (never more than 2 s) for up to
--reconnect seconds (default 30; 0: no retries), at start and mid-run;
sending or viewing then resumes on the same channel with the same params.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from common.logs import add_logging_arguments, setup_logging
from producers.net import DEFAULT_RECONNECT, DEFAULT_RELAY, ConnectError
from producers.sender import ProducerOptions, run_producer
from producers.sources import (
    DirectorySource,
    PatternSource,
    ScreenSource,
    Source,
    SourceError,
    StaticSource,
    VideoSource,
    WebcamSource,
)
from producers.viewer import ViewerError, ViewerOptions, run_viewer
from relay.config import TOKEN_ENV, token_from_environment
from wire.errors import ProtocolError
from wire.frames import ImageFormat, validate_channel

MODES = ("static", "directory", "video", "screen", "webcam", "pattern")
SEED_DURATION = 60.0  # seed 002's client.py streams for 60 s unless told otherwise
DEFAULT_FPS = 30.0

T = TypeVar("T")


# -- argument types -----------------------------------------------------------


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().replace("*", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 512x512, got {text!r}") from None
    if not (0 < w <= 0xFFFF and 0 < h <= 0xFFFF):
        raise argparse.ArgumentTypeError(f"size {w}x{h} out of range")
    return w, h


def _region(text: str) -> tuple[int, int, int, int]:
    """``x,y,w,h`` or the seed's ``[x,y,w,h]``."""
    try:
        values = [int(v) for v in text.strip().strip("[]()").replace(" ", "").split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"expected x,y,w,h such as 100,100,512,512, got {text!r}")
    x, y, w, h = values
    return x, y, w, h


def _format(text: str) -> ImageFormat:
    try:
        return ImageFormat.parse(text)
    except ProtocolError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _channel(text: str) -> str:
    try:
        return validate_channel(text)
    except ProtocolError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _params(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--params is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('--params must be a JSON object, e.g. {"prompt": "..."}')
    return value


def _quality(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 100:
        raise argparse.ArgumentTypeError(f"JPEG quality is 1-100, got {text!r}")
    return int(text)


def _positive(kind: Callable[[str], T]) -> Callable[[str], T]:
    def parse(text: str) -> T:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < 0:  # type: ignore[operator]
            raise argparse.ArgumentTypeError(f"must not be negative: {text}")
        return value

    return parse


# -- parser -------------------------------------------------------------------


def _connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--relay",
        "--websocket_uri",
        "--websocket-uri",
        dest="relay",
        default=DEFAULT_RELAY,
        metavar="URL",
        help=f"relay URL (default {DEFAULT_RELAY}); several, comma-separated (nodes of one cluster): "
        "tried in turn, and the next one after a lost connection",
    )
    p.add_argument("--channel", type=_channel, default="default", help="channel name (default: default)")
    p.add_argument(
        "--token", default=token_from_environment(), help=f"relay access token (default: ${TOKEN_ENV})"
    )
    p.add_argument(
        "--max-frames",
        type=_positive(int),
        default=None,
        metavar="N",
        help="stop after N frames (default: no limit)",
    )
    p.add_argument(
        "--duration",
        type=_positive(float),
        default=None,
        metavar="SECONDS",
        help="stop after this many seconds (default: no limit; static and directory: 60)",
    )
    p.add_argument(
        "--reconnect",
        type=_positive(float),
        default=DEFAULT_RECONNECT,
        metavar="SECONDS",
        help="keep trying to reach the relay this long, at start and after it goes away "
        f"(a restart), at most 2 s between tries; then exit 1 (default {DEFAULT_RECONNECT:g}; "
        "0: one try, a lost connection ends the run)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no once-a-second rate lines")
    p.add_argument("--json", action="store_true", help="print the final report as JSON")
    add_logging_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m producers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Seed-002 form also works: python -m producers --mode=static --source=image.jpg",
    )
    sub = parser.add_subparsers(dest="mode", metavar="MODE", required=True)

    common = argparse.ArgumentParser(add_help=False)
    _connection_args(common)
    common.add_argument(
        "--fps",
        type=_positive(float),
        default=None,
        help=f"frames per second (default {DEFAULT_FPS:g}, a video's own rate); 0 = as fast as possible",
    )
    common.add_argument(
        "--format", type=_format, default=ImageFormat.JPEG, help="jpeg or png (any case; default jpeg)"
    )
    common.add_argument(
        "--quality", type=_quality, default=85, metavar="1-100", help="JPEG quality (default 85)"
    )
    common.add_argument(
        "--resize", type=_size, default=None, metavar="WxH", help="resize every frame before encoding"
    )
    common.add_argument(
        "--params",
        type=_params,
        default=None,
        metavar="JSON",
        help='parameters to send once connected, e.g. \'{"prompt": "a cat"}\'',
    )
    common.add_argument(
        "--legacy",
        action="store_true",
        help="send seed-002 base64 JSON image messages (no hello), count the acks",
    )
    common.add_argument(
        "--no-receive", dest="receive", action="store_false", help="do not ask for the worker's results"
    )
    common.add_argument(
        "--max-in-flight",
        type=_positive(int),
        default=0,
        metavar="N",
        help="at most N frames awaiting results (skip frames while full); 0 = no limit",
    )

    def mode(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help_text, description=help_text)

    for name, what in (
        ("static", "an image file, repeated"),
        ("directory", "a directory of images, in name order, looping"),
        ("video", "a video file"),
    ):
        p = mode(name, f"send {what}")
        p.add_argument("source", nargs="?", help="the " + ("directory" if name == "directory" else "file"))
        p.add_argument("--source", dest="source_opt", help=argparse.SUPPRESS)
    sub.choices["directory"].add_argument(
        "--no-loop", dest="loop", action="store_false", help="stop after the last image"
    )
    sub.choices["video"].add_argument("--loop", action="store_true", help="restart at the end")
    p = mode("screen", "capture the screen (needs a display and mss)")
    p.add_argument(
        "--region",
        type=_region,
        default=None,
        metavar="X,Y,W,H",
        help="part of the screen; the seed's [100,100,512,512] form works too",
    )
    p.add_argument("--monitor", type=int, default=1, help="monitor number (default 1)")
    p = mode("webcam", "capture a camera through OpenCV")
    p.add_argument("--device", type=int, default=0, help="camera index (default 0)")
    p = mode("pattern", "send a built-in animated test pattern (no media needed)")
    p.add_argument(
        "--size", type=_size, default=(512, 512), metavar="WxH", help="pattern size (default 512x512)"
    )

    v = sub.add_parser(
        "view",
        help="receive a channel: show a window, save files or write an MP4",
        description="Receive a channel's frames (the worker's results by default) "
        "and show the newest one in a window with an fps overlay; "
        "q, Esc or closing the window ends it like Ctrl-C. "
        "--save or --mp4 run without a window (no display needed).",
    )
    _connection_args(v)
    kind = v.add_mutually_exclusive_group()
    kind.add_argument(
        "--input",
        dest="receive",
        action="store_const",
        const="input",
        default="output",
        help="the producer's raw input frames instead of results",
    )
    kind.add_argument(
        "--both", dest="receive", action="store_const", const="both", help="input and output frames"
    )
    v.add_argument(
        "--save",
        type=Path,
        default=None,
        metavar="DIR",
        help="write each frame's bytes to DIR/{seq:08d}.jpg (headless)",
    )
    v.add_argument(
        "--mp4",
        type=Path,
        default=None,
        metavar="PATH",
        help="write every frame into an H.264 MP4, each at the time it arrived: "
        "the clip lasts as long as the frames took and plays at the received "
        "rate (headless)",
    )
    v.add_argument("--show", action="store_true", help="show the window even with --save/--mp4")
    return parser


def _seed_argv(argv: list[str]) -> list[str]:
    """Turn seed 002's ``--mode=static --source=x`` into ``static --source=x``."""
    for i, arg in enumerate(argv):
        if arg == "--mode" and i + 1 < len(argv):
            return [argv[i + 1], *argv[:i], *argv[i + 2 :]]
        if arg.startswith("--mode="):
            return [arg.split("=", 1)[1], *argv[:i], *argv[i + 1 :]]
    return argv


# -- running ------------------------------------------------------------------


def make_source(args: argparse.Namespace) -> Source:
    """Open the source the arguments name; raises :class:`SourceError`."""
    if args.mode in ("static", "directory", "video"):
        path = args.source or args.source_opt
        if not path:
            raise SourceError(f"{args.mode} mode needs a source: python -m producers {args.mode} PATH")
        if args.mode == "static":
            return StaticSource(path)
        if args.mode == "directory":
            return DirectorySource(path, loop=args.loop)
        return VideoSource(path, loop=args.loop)
    if args.mode == "screen":
        return ScreenSource(args.region, args.monitor)
    if args.mode == "webcam":
        return WebcamSource(args.device)
    return PatternSource(*args.size)


def producer_options(args: argparse.Namespace, source: Source) -> ProducerOptions:
    fps = args.fps if args.fps is not None else (source.native_fps or DEFAULT_FPS)
    duration = args.duration
    if duration is None and args.mode in ("static", "directory"):
        duration = SEED_DURATION
    return ProducerOptions(
        relay=args.relay,
        channel=args.channel,
        token=args.token,
        fps=fps,
        duration=duration,
        max_frames=args.max_frames,
        format=args.format,
        quality=args.quality,
        resize=args.resize,
        legacy=args.legacy,
        params=args.params,
        receive=args.receive,
        max_in_flight=args.max_in_flight,
        progress=not args.quiet,
        name=f"producers-{args.mode}",
        reconnect=args.reconnect,
    )


def viewer_options(args: argparse.Namespace) -> ViewerOptions:
    headless = args.save is not None or args.mp4 is not None
    return ViewerOptions(
        relay=args.relay,
        channel=args.channel,
        token=args.token,
        receive=args.receive,
        show=args.show or not headless,
        save_dir=args.save,
        mp4=args.mp4,
        max_frames=args.max_frames,
        duration=args.duration,
        progress=not args.quiet,
        reconnect=args.reconnect,
    )


async def _until_interrupted(work: Callable[[asyncio.Event], Coroutine[Any, Any, T]]) -> T:
    """Run ``work(stop)``; the first Ctrl-C sets ``stop`` (a clean end with a summary),
    the second one interrupts for real."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def first_interrupt() -> None:
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)

    with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows, or not the main thread
        loop.add_signal_handler(signal.SIGINT, first_interrupt)
    try:
        return await work(stop)
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_seed_argv(list(sys.argv[1:] if argv is None else argv)))
    setup_logging(args.log_level)
    try:
        if args.mode == "view":
            options = viewer_options(args)
            report: Any = asyncio.run(_until_interrupted(lambda stop: run_viewer(options, stop=stop)))
        else:
            with make_source(args) as source:
                popts = producer_options(args, source)
                report = asyncio.run(_until_interrupted(lambda stop: run_producer(source, popts, stop=stop)))
    except (SourceError, ViewerError) as exc:
        return _fail(str(exc), 2)
    except ConnectError as exc:
        return _fail(str(exc), 1)
    except KeyboardInterrupt:
        return 130
    print(json.dumps(report.as_dict()) if args.json else report.summary(), flush=True)
    return 1 if report.closed else 0


def view_main(argv: list[str] | None = None) -> int:
    """``sd-view``: the ``view`` mode as its own command."""
    return main(["view", *(sys.argv[1:] if argv is None else argv)])
