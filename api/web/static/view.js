// /view/{playback_id}: the output alone, full window, no controls (OBS Browser
// Source). WHEP by default; ?via=mjpeg for MJPEG; ?fit=cover fills the window;
// ?background=transparent. It keeps retrying until the stream plays, and
// again whenever the connection drops, so it can be set up before the stream
// starts and survives server restarts.

import { meanColour } from "./sample.js";

const playbackId = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop());
const query = new URLSearchParams(location.search);
const via = query.get("via") === "mjpeg" ? "mjpeg" : "whep";
const base = `${location.origin}/live/video-to-video/${encodeURIComponent(playbackId)}`;
const video = document.getElementById("video");
const mjpeg = document.getElementById("mjpeg");
const note = document.getElementById("note");
if (query.get("fit") === "cover") document.body.classList.add("cover");
if (query.get("background") === "transparent") document.body.classList.add("transparent");

const RETRY_MS = 2000;
let pc = null;
let session = null;

function say(text) { note.textContent = text; }

function iceGathered(peer) {
  if (peer.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    peer.addEventListener("icegatheringstatechange", () => { if (peer.iceGatheringState === "complete") resolve(); });
    setTimeout(resolve, 2000);
  });
}

function retry(reason) {
  say(`${reason}; retrying…`);
  if (pc) pc.close();
  if (session) fetch(session, { method: "DELETE" }).catch(() => {});
  pc = session = null;
  setTimeout(play, RETRY_MS);
}

async function play() {
  if (via === "mjpeg") {
    mjpeg.hidden = false;
    video.hidden = true;
    mjpeg.onerror = () => { say("no stream yet; retrying…"); setTimeout(() => { mjpeg.src = `${base}/mjpeg?t=${Date.now()}`; }, RETRY_MS); };
    mjpeg.onload = () => say("");
    mjpeg.src = `${base}/mjpeg`;
    return;
  }
  const peer = new RTCPeerConnection();
  pc = peer;
  peer.addTransceiver("video", { direction: "recvonly" });
  peer.ontrack = (event) => { video.srcObject = new MediaStream([event.track]); };
  peer.onconnectionstatechange = () => {
    if (peer !== pc) return;
    if (peer.connectionState === "connected") say("");
    if (peer.connectionState === "failed" || peer.connectionState === "closed") retry("connection lost");
  };
  try {
    await peer.setLocalDescription(await peer.createOffer());
    await iceGathered(peer);
    const response = await fetch(`${base}/whep`, { method: "POST", headers: { "Content-Type": "application/sdp" },
                                                   body: peer.localDescription.sdp });
    if (response.status !== 201) return retry(response.status === 404 ? "no such stream (yet)" : `HTTP ${response.status}`);
    session = new URL(response.headers.get("Location"), base).href;
    await peer.setRemoteDescription({ type: "answer", sdp: await response.text() });
  } catch (error) {
    retry(error.message);
  }
}

// the output reduced to its mean colour (tests)
window.sampleOutput = () => meanColour(via === "mjpeg" ? mjpeg : video, 32);

window.addEventListener("beforeunload", () => { if (session) fetch(session, { method: "DELETE", keepalive: true }); });
play();
