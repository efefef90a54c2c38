// The browser client: create a stream, send the camera or screen over WHIP
// or WebSocket, watch the result over WHEP, MJPEG or the WebSocket, change
// every parameter live, say what is happening, chart fps and latency, save
// presets, take snapshots and recordings. No build step: plain ES modules.

import { Chart } from "./charts.js";
import { ParamsForm } from "./form.js";
import { progressFraction, progressText } from "./progress.js";
import { meanColour } from "./sample.js";

const $ = (id) => document.getElementById(id);
const state = {
  stream: null, pcIn: null, pcOut: null, whipSession: null, whepSession: null, ws: null, media: null,
  timers: [], info: null, form: null, status: null, lastParams: null, reloadPending: null,
  g2g: [], g2gKind: null, recorder: null, recorded: [], recordedBytes: 0, seenReloadError: null,
  health: null, charts: null,
};
window.sd = state; // for tests and the curious

const key = $("api-key");
key.value = localStorage.getItem("sd-api-key") || "";
key.addEventListener("change", () => localStorage.setItem("sd-api-key", key.value));

function showError(message) { $("error").textContent = message || ""; }

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${key.value}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(data.error || `${method} ${path}: HTTP ${response.status}`);
    error.status = response.status;
    error.details = data.details;
    throw error;
  }
  return data;
}

// ---- parameters: the form, live changes ------------------------------------------

const pending = new Map();

function paramChanged(name) {
  clearTimeout(pending.get(name));
  pending.set(name, setTimeout(() => { pending.delete(name); sendParam(name); }, 300));
}

function fieldError(name, message) {
  const field = document.querySelector(`[data-field="${name}"]`);
  if (!field) return;
  let note = field.querySelector(".field-error");
  if (!message) { if (note) note.remove(); return; }
  if (!note) { note = document.createElement("small"); note.className = "field-error error"; field.append(note); }
  note.textContent = message;
}

async function sendParam(name) {
  if (!state.stream) return; // before Start the form is a draft: Start sends it
  const id = state.stream.id;
  const value = state.form.values[name];
  try {
    await api("PATCH", `/v1/streams/${id}/params`, { [name]: value });
    fieldError(name, null);
    showError("");
  } catch (error) {
    if (error.status !== 409) { fieldError(name, error.message); return showError(error.message); }
    // not hot: reload the pipeline while the current one keeps serving
    try {
      await api("PATCH", `/v1/streams/${id}`, { params: { [name]: value } });
      state.reloadPending = { fields: [name], since: Date.now() };
      fieldError(name, null);
      showError("");
      renderMessages();
    } catch (e) { fieldError(name, e.message); showError(e.message); }
  }
}

/** Send every value that differs from what the stream runs (a loaded preset): one PATCH, reloading if needed. */
async function sendAll() {
  if (!state.stream) return;
  const running = state.lastParams || state.stream.params;
  const patch = {};
  for (const [name, value] of Object.entries(state.form.values)) {
    if (JSON.stringify(value) !== JSON.stringify(running[name])) patch[name] = value;
  }
  if (!Object.keys(patch).length) return;
  try {
    await api("PATCH", `/v1/streams/${state.stream.id}`, { params: patch });
    const reloads = Object.keys(patch).filter((k) => state.form.reload.has(k) || state.info.reload_parts[k]);
    if (reloads.length) state.reloadPending = { fields: reloads, since: Date.now() };
    showError("");
  } catch (error) { showError(error.message); }
}

async function loadSchema() {
  const response = await fetch("/web/params-schema");
  state.info = await response.json();
  state.form = new ParamsForm($("params"), state.info, paramChanged);
  const shared = presetFromUrl();
  if (shared) {
    state.form.set(shared.params, { fromDefaults: true });
    $("preset-name").value = shared.name || "";
    $("preset-link").textContent = `loaded the shared preset “${shared.name || "unnamed"}”`;
  }
  document.body.dataset.formReady = "1";
}

// The filter engine's effects, from the status (engine.effects): a picker in the first view.
function effectPicker(effects, current) {
  if (state.form.extras.length) return; // (the status names the effect the engine loaded with, not later ones)
  const inSchema = "effect" in state.info.schema.properties;
  const wrap = document.createElement("div");
  wrap.className = "field";
  wrap.dataset.field = "effect-picker";
  const select = document.createElement("select");
  select.name = "effect-picker";
  for (const effect of effects) select.add(new Option(effect, effect));
  if (current) select.value = current;
  select.addEventListener("change", () => {
    if (inSchema) {
      state.form.values.effect = select.value;
      paramChanged("effect");
    } else { // the filter engine reads its effect from the prompt's words
      state.form.set({ prompt: select.value });
      paramChanged("prompt");
    }
  });
  const label = document.createElement("div");
  label.className = "label";
  label.innerHTML = '<span class="title">Effect</span>';
  const help = document.createElement("small");
  help.className = "muted help";
  help.textContent = inSchema ? "the filter engine's effects" : "the filter engine picks its effect from the prompt's words: choosing one writes it as the prompt";
  wrap.append(label, select, help);
  state.form.extras.push(wrap);
  state.form.render();
}

// ---- presets: saved in this browser, shared as a link -----------------------------

const PRESETS = "sd-presets";
const presets = () => JSON.parse(localStorage.getItem(PRESETS) || "{}");

function listPresets(selected) {
  const select = $("presets");
  select.replaceChildren(new Option("— saved presets —", ""));
  for (const name of Object.keys(presets()).sort()) select.add(new Option(name, name));
  if (selected) select.value = selected;
}

const b64url = (text) => btoa(String.fromCharCode(...new TextEncoder().encode(text)))
  .replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
const unb64url = (text) => new TextDecoder().decode(Uint8Array.from(
  atob(text.replace(/-/g, "+").replace(/_/g, "/")), (c) => c.charCodeAt(0)));

function presetFromUrl() {
  const match = location.hash.match(/preset=([A-Za-z0-9_-]+)/);
  if (!match) return null;
  try { return JSON.parse(unb64url(match[1])); } catch { showError("the preset in this link is damaged"); return null; }
}

function savePreset() {
  const name = $("preset-name").value.trim();
  if (!name) return showError("name the preset first");
  const all = presets();
  all[name] = state.form.changed();
  localStorage.setItem(PRESETS, JSON.stringify(all));
  listPresets(name);
  $("preset-link").textContent = `saved “${name}”`;
}

async function loadPreset() {
  const name = $("presets").value;
  if (!name) return;
  state.form.set(presets()[name], { fromDefaults: true });
  $("preset-name").value = name;
  $("preset-link").textContent = `loaded “${name}”`;
  await sendAll();
}

function deletePreset() {
  const name = $("presets").value;
  if (!name) return;
  const all = presets();
  delete all[name];
  localStorage.setItem(PRESETS, JSON.stringify(all));
  listPresets();
}

async function sharePreset() {
  const name = $("preset-name").value.trim();
  const link = `${location.origin}/#preset=${b64url(JSON.stringify({ name, params: state.form.changed() }))}`;
  const out = $("preset-link");
  out.replaceChildren();
  const a = document.createElement("a");
  a.href = a.textContent = link;
  a.id = "share-link";
  out.append(a);
  try { await navigator.clipboard.writeText(link); out.append(" (copied)"); } catch { /* no clipboard permission */ }
}

// ---- WebRTC helpers -----------------------------------------------------------------

function iceGathered(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const check = () => { if (pc.iceGatheringState === "complete") resolve(); };
    pc.addEventListener("icegatheringstatechange", check);
    setTimeout(resolve, 2000); // enough for host candidates on a LAN; the answer has the rest
  });
}

async function negotiate(pc, url) {
  await pc.setLocalDescription(await pc.createOffer());
  await iceGathered(pc);
  const response = await fetch(url, { method: "POST", headers: { "Content-Type": "application/sdp" },
                                      body: pc.localDescription.sdp });
  if (response.status !== 201) throw new Error(`${url}: HTTP ${response.status} ${await response.text()}`);
  await pc.setRemoteDescription({ type: "answer", sdp: await response.text() });
  return new URL(response.headers.get("Location"), url).href;
}

// ---- sending --------------------------------------------------------------------------

async function openSource() {
  const size = { width: state.stream.params.width, height: state.stream.params.height };
  if ($("source").value === "screen") return navigator.mediaDevices.getDisplayMedia({ video: size });
  return navigator.mediaDevices.getUserMedia({ video: size, audio: false });
}

async function sendWhip(track) {
  const pc = new RTCPeerConnection();
  pc.addTransceiver(track, { direction: "sendonly" });
  state.pcIn = pc;
  state.whipSession = await negotiate(pc, state.stream.whip_url);
}

function wsUrl(whipUrl) {
  const url = new URL(whipUrl.replace(/\/whip$/, "/ws"));
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

// A relay-protocol input frame (docs/protocol.md): the page's own capture time
// travels in the header and comes back with the result, so the round trip from
// capture to display is measured on one clock, the page's.
function relayFrame(jpeg, width, height, seq) {
  const name = new TextEncoder().encode(state.stream.id);
  const buffer = new ArrayBuffer(32 + name.length + jpeg.byteLength);
  const view = new DataView(buffer);
  [0x53, 0x44, 1, 1, 1, 0, name.length, 0].forEach((byte, i) => view.setUint8(i, byte));
  view.setBigUint64(8, BigInt(seq));
  view.setFloat64(16, Date.now() / 1000);
  view.setUint16(24, width);
  view.setUint16(26, height);
  view.setUint32(28, 0);
  new Uint8Array(buffer, 32).set(name);
  new Uint8Array(buffer, 32 + name.length).set(new Uint8Array(jpeg));
  return buffer;
}

function sendWebSocket(video) {
  const { width, height } = state.stream.params;
  const canvas = new OffscreenCanvas(width, height);
  const context = canvas.getContext("2d");
  const ws = new WebSocket(wsUrl(state.stream.whip_url));
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  state.g2gKind = "measured";
  let inFlight = 0;
  let seq = 0;
  ws.onmessage = async (event) => {
    if (typeof event.data === "string") {
      const message = JSON.parse(event.data);
      if (message.type === "error") showError(message.message);
      return;
    }
    inFlight = Math.max(0, inFlight - 1);
    const sent = new DataView(event.data).getFloat64(16) * 1000;
    if ($("playback").dataset.ws === "1") await drawFrame(event.data);
    state.g2g.push(Date.now() - sent); // capture -> on the page (drawn, when watching the WebSocket)
  };
  const pump = async () => {
    if (ws.readyState !== WebSocket.OPEN) return;
    if (inFlight < 2 && video.readyState >= 2) { // two in flight hides the round trip, no backlog
      context.drawImage(video, 0, 0, width, height);
      const blob = await canvas.convertToBlob({ type: "image/jpeg", quality: 0.85 });
      ws.send(relayFrame(await blob.arrayBuffer(), width, height, seq++));
      inFlight += 1;
    }
  };
  state.timers.push(setInterval(pump, 1000 / 30));
  // a result lost to latest-frame-wins must not stall the pump
  state.timers.push(setInterval(() => { inFlight = 0; }, 1000));
}

async function drawFrame(buffer) {
  const view = new DataView(buffer);
  const start = 32 + view.getUint8(6); // header, then the channel name, then the image
  const bitmap = await createImageBitmap(new Blob([buffer.slice(start)], { type: "image/jpeg" }));
  const canvas = $("output-canvas");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  canvas.getContext("2d").drawImage(bitmap, 0, 0);
}

// ---- watching ---------------------------------------------------------------------------

async function watch() {
  const mode = $("playback").value;
  const useCanvas = $("transport").value === "ws" && mode === "ws";
  $("output-video").hidden = mode !== "whep";
  $("output-mjpeg").hidden = mode !== "mjpeg";
  $("output-canvas").hidden = !useCanvas;
  $("playback").dataset.ws = useCanvas ? "1" : "0";
  if (mode === "mjpeg") {
    $("output-mjpeg").src = state.stream.mjpeg_url;
  } else if (mode === "whep") {
    const pc = new RTCPeerConnection();
    pc.addTransceiver("video", { direction: "recvonly" });
    pc.ontrack = (event) => { playing($("output-video"), new MediaStream([event.track])); };
    state.pcOut = pc;
    state.whepSession = await negotiate(pc, state.stream.output_stream_url);
  }
  if ($("transport").value === "whip" && mode === "whep") state.g2gKind = "estimate";
  $("g2g-label").textContent = {
    measured: "capture → page (WebSocket, measured)",
    estimate: "glass to glass (WebRTC, estimate)",
  }[state.g2gKind] || "glass to glass (not measurable here)";
  $("g2g-label").title = {
    measured: "measured in this page: the time from taking a camera frame to its result arriving "
      + "(and drawn, when watching over the WebSocket); camera and display delays not included",
    estimate: "estimated from WebRTC stats: half the round trip each way + server latency p50 "
      + "+ the player's jitter buffer and decode time; encode and camera delays not included",
  }[state.g2gKind] || "MJPEG playback carries no timing the page can read";
}

// Played from the Start click, not by the autoplay attribute alone: Chromium pauses muted autoplay
// videos scrolled out of view (a phone, scrolled to the controls), which would stop the output.
function playing(video, stream) {
  video.srcObject = stream;
  video.play().catch(() => {});
}

function visibleOutput() {
  return [$("output-video"), $("output-mjpeg"), $("output-canvas")].find((el) => !el.hidden);
}

// ---- glass to glass ------------------------------------------------------------------------

async function rtt(pc) {
  if (!pc) return null;
  let found = null;
  (await pc.getStats()).forEach((r) => {
    if (r.type === "candidate-pair" && r.nominated && r.currentRoundTripTime !== undefined) found = r.currentRoundTripTime * 1000;
  });
  return found;
}

async function estimateG2G(serverMs) {
  if (!state.pcOut || serverMs === null || serverMs === undefined) return null;
  let buffer = 0;
  (await state.pcOut.getStats()).forEach((r) => {
    if (r.type === "inbound-rtp" && r.kind === "video") {
      if (r.jitterBufferEmittedCount) buffer += (r.jitterBufferDelay / r.jitterBufferEmittedCount) * 1000;
      if (r.framesDecoded) buffer += (r.totalDecodeTime / r.framesDecoded) * 1000;
    }
  });
  const [inMs, outMs] = [await rtt(state.pcIn), await rtt(state.pcOut)];
  return serverMs + buffer + (inMs || 0) / 2 + (outMs || 0) / 2;
}

async function glassToGlass(serverMs) {
  if (state.g2gKind === "measured") {
    const samples = state.g2g.splice(0).sort((a, b) => a - b);
    return samples.length ? samples[Math.floor(samples.length / 2)] : null;
  }
  if (state.g2gKind === "estimate") return estimateG2G(serverMs);
  return null;
}

// ---- status: what is happening, and why ------------------------------------------------

const ordinal = (n) => n + ((n % 100 >= 11 && n % 100 <= 13) ? "th" : ({ 1: "st", 2: "nd", 3: "rd" }[n % 10] || "th"));
const clock = (ms) => new Date(ms).toLocaleTimeString();

/** The waiting line: the status's queue details when it has them, else the server's capacity (/health). */
function queueText(data) {
  const queue = data.queue || {};
  const health = (state.health || {}).capacity;
  const slots = queue.slots ?? (health ? health.total : null);
  const inUse = queue.in_use ?? (health ? health.used : null);
  if (typeof data.queue_detail === "string") return data.queue_detail;
  if (!slots) return "waiting for a worker: none is connected";
  const place = queue.position ? ` (${ordinal(queue.position)} in the queue)` : "";
  return `waiting for a slot: ${inUse} of ${slots} in use${place}`;
}

function progressOf(data) {
  return data.progress || (data.engine || {}).progress || (data.worker_stats || {}).progress || null;
}

function showProgress(progress) {
  const box = $("progress-box");
  box.hidden = !progress;
  if (!progress) return;
  const fraction = progressFraction(progress);
  const bar = $("progress");
  if (fraction === null) bar.removeAttribute("value"); else bar.value = fraction;
  $("progress-text").textContent = progressText(progress);
}

function renderMessages() {
  const data = state.status;
  const items = [];
  const add = (kind, text, name) => items.push({ kind, text, name });
  if (data) {
    const info = data.inference_status || {};
    // waiting for a slot: the status's detail says it in words ("waiting for a slot: 2 of 2 in use")
    const detail = data.queue && typeof data.detail === "string" ? "waiting_for_worker"
      : String(data.detail || "").startsWith("idle") ? "idle" : data.detail;
    switch (detail) {
      case "waiting_for_worker": add("info", data.queue ? data.detail : queueText(data), "queue"); break;
      case "loading": add("info", "loading the pipeline on " + (data.worker || "a worker") + "…", "loading"); break;
      case "reloading": add("info", "reloading: the old pipeline is still serving until the new one is ready", "reloading"); break;
      case "idle": add("info", "idle: no input for a while, so the worker slot was given back; input brings it back", "idle"); break;
      case "error": add("error", `the pipeline failed: ${info.last_error || "no reason given"}`, "engine-error"); break;
      default: break;
    }
    if (state.reloadPending && data.detail !== "reloading") {
      add("info", `reload requested (${state.reloadPending.fields.join(", ")}): the old pipeline keeps serving until the new one is ready`, "reloading");
    }
    const reload = info.last_reload_error;
    if (reload) {
      const kept = Object.keys(reload.rejected_params || {}).join(", ");
      add("error", `change v${reload.params_version} did not load (${clock(reload.time)}): ${reload.error}`
          + (kept ? `; still running the previous ${kept}` : ""), "reload-error");
    }
    if (info.last_error && data.detail !== "error") {
      add("warn", `last error${info.last_error_time ? ` (${clock(info.last_error_time)})` : ""}: ${info.last_error}`, "last-error");
    }
    const output = (data.gateway_status || {}).error;
    if (output) add("warn", `output: ${output}`, "output-error");
    if (data.state === "DEGRADED_INPUT") add("warn", `input is slow: ${info.input_fps.toFixed(1)} fps`, "slow-input");
    if (data.state === "DEGRADED_INFERENCE") add("warn", "the pipeline is slower than the input: frames are dropped", "slow-output");
  }
  const list = $("messages");
  list.replaceChildren(...items.map(({ kind, text, name }) => {
    const li = document.createElement("li");
    li.className = `msg ${kind}`;
    li.dataset.message = name;
    li.textContent = text;
    return li;
  }));
  showProgress(data ? progressOf(data) : null);
}

function showStats(data) {
  const set = (name, text) => { document.querySelector(`[data-stat=${name}]`).textContent = text; };
  const info = data.inference_status;
  const ms = (v) => (v === null || v === undefined ? "–" : `${v.toFixed(1)} ms`);
  set("state", data.state + (data.detail && data.state !== "ONLINE" ? ` (${data.detail})` : ""));
  set("fps", `${info.input_fps.toFixed(1)} / ${info.output_fps.toFixed(1)}`);
  set("latency", `${ms(data.latency_ms.p50)} / ${ms(data.latency_ms.p99)}`);
  const drops = data.drops || {};
  set("drops", Object.entries(drops).map(([k, v]) => `${k} ${v}`).join(", ") || "0");
  set("params", `v${data.output_params_version} of v${data.params_version}`);
  set("worker", data.worker ? `${data.worker} (${(data.engine || {}).engine || "loading"})` : "waiting");
  const badge = $("state-badge");
  badge.textContent = data.state;
  badge.className = `badge state-${data.state.toLowerCase()}`;
  document.body.dataset.outputParamsVersion = data.output_params_version;
  document.body.dataset.state = data.state;
}

async function pollStats() {
  if (!state.stream) return;
  const id = state.stream.id;
  let data;
  try {
    data = (await api("GET", `/v1/streams/${id}/status`)).data;
  } catch (error) {
    return showError(error.message);
  }
  if (!state.stream || state.stream.id !== id) return; // stopped meanwhile
  state.status = data;
  state.lastParams = data.inference_status.last_params;
  if (state.reloadPending && data.detail !== "reloading" && data.output_params_version >= data.params_version) {
    state.reloadPending = null;
  }
  const reload = data.inference_status.last_reload_error;
  if (reload && reload.time !== state.seenReloadError) { // the stream went back to what serves: so does the form
    state.seenReloadError = reload.time;
    state.reloadPending = null;
    state.form.set(state.lastParams);
  }
  if (data.detail === "waiting_for_worker") await refreshHealth();
  showStats(data);
  renderMessages();
  const engine = data.engine || {};
  if (Array.isArray(engine.effects) && engine.effects.length) effectPicker(engine.effects, engine.effect);
  const g2g = await glassToGlass(data.latency_ms.p50);
  document.querySelector("[data-stat=g2g]").textContent = g2g === null ? "–" : `${g2g.toFixed(0)} ms`;
  const now = Date.now() / 1000;
  state.charts.fps.push(now, [data.inference_status.input_fps, data.inference_status.output_fps]);
  state.charts.latency.push(now, [data.latency_ms.p50, data.latency_ms.p99, g2g]);
}

// ---- links: where OBS and players connect -------------------------------------------------

function showLinks() {
  const dl = $("urls");
  dl.replaceChildren();
  if (!state.stream) {
    dl.innerHTML = '<dt>stream</dt><dd class="muted">start a stream to see its URLs</dd>';
    return;
  }
  const s = state.stream;
  const origin = new URL(s.whip_url).origin;
  const rows = [
    ["stream", s.id, "id"],
    ["stream key", s.stream_key, "stream-key"],
    ["WHIP (this stream)", s.whip_url, "whip"],
    ["OBS WHIP server", `${origin}/whip`, "obs-server"],
    ["WHEP", s.output_stream_url, "whep"],
    ["viewer (OBS Browser Source)", `${origin}/view/${s.output_playback_id}`, "viewer"],
    ["MJPEG", s.mjpeg_url, "mjpeg"],
    ["HLS", s.hls_url, "hls"],
  ];
  for (const [label, value, name] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = label;
    const dd = document.createElement("dd");
    dd.dataset.url = name;
    if (/^https?:/.test(value) && name !== "whip" && name !== "obs-server" && name !== "whep") {
      const a = document.createElement("a");
      a.href = a.textContent = value;
      a.target = "_blank";
      dd.append(a);
    } else {
      dd.textContent = value;
    }
    if (name === "obs-server") dd.title = "OBS: Settings → Stream → Service WHIP, this Server, the stream key as Bearer Token";
    dl.append(dt, dd);
  }
}

// ---- snapshot and recording ----------------------------------------------------------------

function download(blob, name) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10_000);
}

const stamp = () => new Date().toISOString().replace(/[:.]/g, "-").slice(0, 19);

function outputSize(source) {
  return [source.videoWidth || source.naturalWidth || source.width, source.videoHeight || source.naturalHeight || source.height];
}

function snapshot() {
  const source = visibleOutput();
  const [width, height] = outputSize(source);
  if (!width || !height) return showError("no output frame yet");
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  canvas.getContext("2d").drawImage(source, 0, 0);
  canvas.toBlob((blob) => download(blob, `streamdiffusion-${stamp()}.png`), "image/png");
}

function toggleRecord() {
  if (state.recorder) { state.recorder.stop(); return; }
  const source = visibleOutput();
  let stream;
  if (source === $("output-video") && source.srcObject) {
    stream = source.srcObject;
  } else { // MJPEG or canvas: repaint into a canvas the recorder reads
    const [width, height] = outputSize(source);
    const canvas = document.createElement("canvas");
    canvas.width = width || 512;
    canvas.height = height || 512;
    const context = canvas.getContext("2d");
    const paint = () => { if (state.recorder) { context.drawImage(source, 0, 0, canvas.width, canvas.height); requestAnimationFrame(paint); } };
    stream = canvas.captureStream(30);
    requestAnimationFrame(paint);
  }
  const type = ["video/webm;codecs=vp9", "video/webm;codecs=vp8", "video/webm"].find((t) => MediaRecorder.isTypeSupported(t));
  const recorder = new MediaRecorder(stream, type ? { mimeType: type } : {});
  state.recorded = [];
  state.recordedBytes = 0;
  recorder.ondataavailable = (event) => {
    if (event.data.size) { state.recorded.push(event.data); state.recordedBytes += event.data.size; }
    $("record-info").textContent = `recording · ${(state.recordedBytes / 1024).toFixed(0)} KB`;
  };
  recorder.onstop = () => {
    state.recorder = null;
    $("record").textContent = "Record";
    $("record").classList.remove("recording");
    $("record-info").textContent = `saved ${(state.recordedBytes / 1024).toFixed(0)} KB`;
    download(new Blob(state.recorded, { type: "video/webm" }), `streamdiffusion-${stamp()}.webm`);
  };
  state.recorder = recorder;
  recorder.start(500);
  $("record").textContent = "Stop recording";
  $("record").classList.add("recording");
  $("record-info").textContent = "recording";
}

// ---- start / stop ----------------------------------------------------------------------------

async function refreshHealth() {
  try {
    const h = await (await fetch("/health")).json();
    state.health = h;
    $("health").textContent = `v${h.version} · ${h.gpu ? h.gpu.name : "CPU"} · ${h.workers.length} worker(s), `
      + `${h.capacity.used} of ${h.capacity.total} slots in use`;
  } catch {
    $("health").textContent = "server unreachable";
  }
}

async function start() {
  showError("");
  $("start").disabled = true;
  try {
    state.stream = await api("POST", "/v1/streams", { pipeline: "streamdiffusion", params: state.form.changed() });
    state.lastParams = state.stream.params;
    document.body.dataset.streaming = "1";
    showLinks();
    state.charts.fps.clear();
    state.charts.latency.clear();
    state.media = await openSource();
    playing($("input"), state.media);
    if ($("transport").value === "whip") await sendWhip(state.media.getVideoTracks()[0]);
    else sendWebSocket($("input"));
    await watch();
    state.timers.push(setInterval(pollStats, 1000));
    pollStats();
    $("stop").disabled = false;
    $("snapshot").disabled = false;
    $("record").disabled = false;
  } catch (error) {
    showError(error.message);
    await stop({ keepError: true });
  }
}

async function stop({ keepError = false } = {}) {
  if (state.recorder) state.recorder.stop();
  for (const timer of state.timers) clearInterval(timer);
  state.timers = [];
  for (const session of [state.whipSession, state.whepSession]) {
    if (session) fetch(session, { method: "DELETE" }).catch(() => {});
  }
  for (const pc of [state.pcIn, state.pcOut]) if (pc) pc.close();
  if (state.ws) state.ws.close();
  if (state.media) state.media.getTracks().forEach((t) => t.stop());
  if (state.stream) await api("DELETE", `/v1/streams/${state.stream.id}`).catch(() => {});
  Object.assign(state, { stream: null, pcIn: null, pcOut: null, whipSession: null, whepSession: null,
                         ws: null, media: null, status: null, lastParams: null, reloadPending: null,
                         g2g: [], g2gKind: null, seenReloadError: null });
  // a clean page: no picture, no stale numbers or messages
  $("input").srcObject = null;
  $("output-video").srcObject = null;
  $("output-mjpeg").removeAttribute("src");
  const canvas = $("output-canvas");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  for (const dd of document.querySelectorAll("[data-stat]")) dd.textContent = "–";
  $("state-badge").textContent = "idle";
  $("state-badge").className = "badge";
  $("record-info").textContent = "";
  if (!keepError) showError("");
  for (const name of pending.keys()) clearTimeout(pending.get(name));
  pending.clear();
  renderMessages();
  showLinks();
  if (state.charts) { state.charts.fps.clear(); state.charts.latency.clear(); }
  delete document.body.dataset.state;
  delete document.body.dataset.outputParamsVersion;
  delete document.body.dataset.streaming;
  $("start").disabled = false;
  $("stop").disabled = true;
  $("snapshot").disabled = true;
  $("record").disabled = true;
}

// The output as the viewer sees it, reduced to a mean colour: lets tests and
// users check that a parameter change really reached the picture.
window.sampleOutput = () => meanColour(visibleOutput());

$("transport").addEventListener("change", () => {
  const playback = $("playback");
  const wsOption = [...playback.options].find((o) => o.value === "ws");
  if ($("transport").value === "ws" && !wsOption) playback.add(new Option("WebSocket", "ws"));
});
$("start").addEventListener("click", start);
$("stop").addEventListener("click", () => stop());
$("snapshot").addEventListener("click", snapshot);
$("record").addEventListener("click", toggleRecord);
$("preset-save").addEventListener("click", savePreset);
$("preset-load").addEventListener("click", loadPreset);
$("preset-delete").addEventListener("click", deletePreset);
$("preset-share").addEventListener("click", sharePreset);
window.addEventListener("beforeunload", () => { stop(); });

state.charts = {
  fps: new Chart($("chart-fps"), "fps", [{ label: "in", stroke: "#5ad1ff" }, { label: "out", stroke: "#ff6bd6" }], "fps"),
  latency: new Chart($("chart-latency"), "latency (ms)", [
    { label: "server p50", stroke: "#8fd694" }, { label: "server p99", stroke: "#f0c05a" },
    { label: "glass to glass", stroke: "#ff7b7b" }], "ms"),
};
listPresets();
refreshHealth();
loadSchema();
