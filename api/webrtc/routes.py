"""HTTP side of WHIP (RFC 9725) and WHEP, at Daydream's URLs.

``{base}/live/video-to-video/{stream_key}/whip`` and
``{base}/live/video-to-video/{playback_id}/whep`` take an SDP offer and
answer 201 with the SDP answer and a ``Location`` naming the session
(``.../whip/{session_id}``; DELETE ends it). Seed 003's shorter
``/whip/{stream_key}`` and ``/whep/{playback_id}`` are aliases (seed 003
wrote a stream id there; only the key publishes).

Choices worth knowing:

* The stream key (WHIP) or playback id (WHEP) is the credential: an
  ``Authorization`` header may be sent (OBS sends the key as a Bearer
  token) and is ignored.
* ``POST {base}/whip`` is one stable server URL for every stream, as OBS's
  WHIP output wants it (Server: that URL; Bearer Token: the stream key):
  the Bearer token is the stream key and picks the stream (401 when it is
  missing or names no stream). Sessions it opens are the stream's own
  (``Location`` under the stream's ``whip_url``).
* Trickle ICE (RFC 9725 section 4.3): PATCH a session with an
  ``application/trickle-ice-sdpfrag`` body to add candidates after the
  offer (204). ``If-Match`` (or ``ETag``, as one client sends it) must name
  the session's entity tag when given. Our answers carry all our own
  candidates. ICE restarts are not supported: 405, start a new session.
* A DELETE for a session that ended a moment ago (the client closed its
  peer connection first) answers 200, not 404.
* ``Location`` is absolute: browser clients that ``fetch(location)``
  would otherwise resolve it against their page, not this server.
* Every answer, errors included, carries permissive CORS headers so
  browser publishers and players on other origins work.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from api.server.errors import ApiError, not_found
from api.server.services import services
from api.streams.auth import bearer_token
from api.streams.manager import Stream, StreamManager
from api.streams.routes import base_url
from api.webrtc import trickle
from api.webrtc.ingest import open_whip
from api.webrtc.playback import open_whep
from api.webrtc.sessions import Kind, Session, WebRTCState
from api.webrtc.signaling import MAX_OFFER_BYTES, BadOffer, link_header

router = APIRouter(tags=["webrtc"])

NO_RESTART = "ICE restarts are not supported: start a new session"

LIVE = "/live/video-to-video"
SDP = "application/sdp"
EXPOSED = "Location, ETag, Link, Livepeer-Playback-URL, Accept-Post, Accept-Patch, Allow"
SESSION_METHODS = "DELETE, PATCH, OPTIONS"
CORS = {"Access-Control-Allow-Origin": "*", "Access-Control-Expose-Headers": EXPOSED}


def _preflight(methods: str) -> Response:
    return Response(
        status_code=204,
        headers={
            **CORS,
            "Allow": methods,
            "Access-Control-Allow-Methods": methods,
            "Access-Control-Allow-Headers": "Authorization, Content-Type, If-Match, ETag",
            "Access-Control-Max-Age": "86400",
            "Accept-Post": SDP,
            "Accept-Patch": trickle.MEDIA_TYPE,
        },
    )


def _state(request: Request) -> WebRTCState:
    return services(request).webrtc


def _streams(request: Request) -> StreamManager:
    return services(request).streams


def _no_stream() -> ApiError:
    error = not_found()
    error.headers = CORS
    return error


async def _read_offer(request: Request, media: str = SDP) -> str:
    """The body as SDP text, or 415 (wrong type), 413 (too big) or 400 (not text)."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != media:
        accept = "Accept-Post" if media == SDP else "Accept-Patch"
        raise ApiError(
            415,
            f"Content-Type must be {media}, not {media_type or 'missing'}",
            "REQUEST/UNSUPPORTED_MEDIA_TYPE",
            headers={**CORS, accept: media},
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_OFFER_BYTES:
            raise ApiError(
                413, f"SDP offer larger than {MAX_OFFER_BYTES} bytes", "REQUEST/TOO_LARGE", headers=CORS
            )
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "SDP offer is not UTF-8 text", "WEBRTC/BAD_SDP", headers=CORS) from None


async def _open(request: Request, stream: Stream, kind: Kind) -> Response:
    offer = await _read_offer(request)
    state = _state(request)
    hub = services(request).hub
    try:
        if kind == "whip":
            session, answer = await open_whip(hub, state.registry, state.settings, stream, offer)
        else:
            session, answer = await open_whep(
                hub, state.registry, state.settings, stream, offer, state.encoders
            )
    except BadOffer as exc:
        raise ApiError(400, exc.message, exc.code, headers=CORS) from None
    if _streams(request).streams.get(stream.id) is not stream:  # deleted while we negotiated
        await session.close("stream deleted")
        raise _no_stream()
    urls = stream.urls(base_url(request))
    endpoint = urls["whip_url"] if kind == "whip" else urls["output_stream_url"]
    headers = {**CORS, "Location": f"{endpoint}/{session.id}", "ETag": session.etag}
    if kind == "whip":
        headers["Livepeer-Playback-URL"] = urls["output_stream_url"]
    link = link_header(state.settings.ice_servers)
    if link:
        headers["Link"] = link
    return Response(answer, status_code=201, media_type=SDP, headers=headers)


def _session(request: Request, session_id: str, kind: Kind, stream: Stream | None) -> Session:
    session = _state(request).registry.get(session_id, kind)
    if session is None or stream is None or session.stream is not stream:
        raise ApiError(404, f"{kind.upper()} session not found", "WEBRTC/SESSION_NOT_FOUND", headers=CORS)
    return session


async def _delete(request: Request, session_id: str, kind: Kind, stream: Stream | None) -> Response:
    if stream is not None and _state(request).registry.ended_recently(session_id, kind, stream):
        return Response(status_code=200, headers=CORS)  # the client closed its peer connection first
    await _session(request, session_id, kind, stream).close("DELETE by client")
    return Response(status_code=200, headers=CORS)


async def _trickle(request: Request, session_id: str, kind: Kind, stream: Stream | None) -> Response:
    """Candidates after the offer: 204; 412 for another entity tag; 405 for an ICE restart."""
    session = _session(request, session_id, kind, stream)
    expected = request.headers.get("if-match") or request.headers.get("etag")
    if expected is not None and expected.strip() not in ("*", session.etag):
        raise ApiError(
            412,
            "If-Match does not name this session's entity tag",
            "WEBRTC/PRECONDITION_FAILED",
            headers=CORS,
        )
    fragment = trickle.parse_sdpfrag(await _read_offer(request, trickle.MEDIA_TYPE))
    if trickle.is_restart(session.pc, fragment):
        raise ApiError(
            405, NO_RESTART, "REQUEST/METHOD_NOT_ALLOWED", headers={**CORS, "Allow": SESSION_METHODS}
        )
    try:
        await trickle.add_candidates(session.pc, fragment)
    except trickle.BadFragment as exc:
        raise ApiError(422, str(exc), "WEBRTC/BAD_CANDIDATE", headers=CORS) from None
    return Response(status_code=204, headers=CORS)


# -- WHIP ---------------------------------------------------------------------


@router.options(f"{LIVE}/{{stream_key}}/whip")
@router.options("/whip/{stream_key}")
async def whip_options() -> Response:
    return _preflight("POST, OPTIONS")


@router.post(f"{LIVE}/{{stream_key}}/whip", status_code=201, response_class=Response)
async def whip_publish(stream_key: str, request: Request) -> Response:
    """Publish video into the stream: body an SDP offer, answer 201 with ours."""
    stream = _streams(request).by_stream_key(stream_key)
    if stream is None:
        raise _no_stream()
    return await _open(request, stream, "whip")


@router.post("/whip/{stream_key}", status_code=201, response_class=Response)
async def whip_publish_alias(stream_key: str, request: Request) -> Response:
    """Seed 003's shorter form. Only the stream key publishes: a stream id is not a secret."""
    stream = _streams(request).by_stream_key(stream_key)
    if stream is None:
        raise _no_stream()
    return await _open(request, stream, "whip")


@router.options("/whip")
async def whip_server_options() -> Response:
    return _preflight("POST, OPTIONS")


@router.post("/whip", status_code=201, response_class=Response)
async def whip_publish_by_token(request: Request) -> Response:
    """One server URL for every stream (OBS): the ``Authorization: Bearer`` token is the stream key."""
    key = bearer_token(request)
    stream = _streams(request).by_stream_key(key) if key else None
    if stream is None:
        raise ApiError(
            401,
            "send the stream key as 'Authorization: Bearer <stream key>'"
            if key is None
            else "the Bearer token is not the stream key of any stream",
            "WEBRTC/UNKNOWN_STREAM_KEY",
            headers={**CORS, "WWW-Authenticate": "Bearer"},
        )
    return await _open(request, stream, "whip")


@router.options(f"{LIVE}/{{stream_key}}/whip/{{session_id}}")
async def whip_session_options() -> Response:
    return _preflight(SESSION_METHODS)


@router.delete(f"{LIVE}/{{stream_key}}/whip/{{session_id}}")
async def whip_stop(stream_key: str, session_id: str, request: Request) -> Response:
    return await _delete(request, session_id, "whip", _streams(request).by_stream_key(stream_key))


@router.patch(f"{LIVE}/{{stream_key}}/whip/{{session_id}}")
async def whip_patch(stream_key: str, session_id: str, request: Request) -> Response:
    return await _trickle(request, session_id, "whip", _streams(request).by_stream_key(stream_key))


# -- WHEP ---------------------------------------------------------------------


@router.options(f"{LIVE}/{{playback_id}}/whep")
@router.options("/whep/{playback_id}")
async def whep_options() -> Response:
    return _preflight("POST, HEAD, OPTIONS")


@router.head(f"{LIVE}/{{playback_id}}/whep")
@router.head("/whep/{playback_id}")
async def whep_probe(playback_id: str, request: Request) -> Response:
    """Players probe with HEAD to learn that this URL speaks WHEP."""
    if _streams(request).by_playback_id(playback_id) is None:
        raise _no_stream()
    return Response(status_code=200, media_type=SDP, headers=CORS)


@router.post(f"{LIVE}/{{playback_id}}/whep", status_code=201, response_class=Response)
@router.post("/whep/{playback_id}", status_code=201, response_class=Response)
async def whep_play(playback_id: str, request: Request) -> Response:
    """Watch the stream's output: body an SDP offer (video recvonly), answer 201 with ours."""
    stream = _streams(request).by_playback_id(playback_id)
    if stream is None:
        raise _no_stream()
    return await _open(request, stream, "whep")


@router.options(f"{LIVE}/{{playback_id}}/whep/{{session_id}}")
async def whep_session_options() -> Response:
    return _preflight(SESSION_METHODS)


@router.delete(f"{LIVE}/{{playback_id}}/whep/{{session_id}}")
async def whep_stop(playback_id: str, session_id: str, request: Request) -> Response:
    return await _delete(request, session_id, "whep", _streams(request).by_playback_id(playback_id))


@router.patch(f"{LIVE}/{{playback_id}}/whep/{{session_id}}")
async def whep_patch(playback_id: str, session_id: str, request: Request) -> Response:
    return await _trickle(request, session_id, "whep", _streams(request).by_playback_id(playback_id))
