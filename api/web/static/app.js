// The browser client: create a stream, send the camera or screen over WHIP
// or WebSocket, watch the result over WHEP, MJPEG or the WebSocket, change
// parameters live, show stats. No build step: plain ES modules.

const $ = (id) => document.getElementById(id);
const state = { stream: null, pcIn: null, pcOut: null, whipSession: null, whepSession: null,
                ws: null, media: null, timers: [], settings: null };
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
    throw error;
  }
  return data;
}

// ---- parameter form, built from /api/settings (seed-001 UI hints) ----------

function fieldFor(name, spec) {
  const label = document.createElement("label");
  label.textContent = spec.title || name;
  let input;
  const kind = spec.field || (spec.type === "boolean" ? "checkbox" : spec.type === "string" ? "text" : "number");
  if (kind === "textarea") {
    input = document.createElement("textarea");
    input.rows = 2;
  } else {
    input = document.createElement("input");
    input.type = { range: "range", checkbox: "checkbox", seed: "number", number: "number" }[kind] || "text";
    if (spec.min !== undefined) input.min = spec.min;
    if (spec.max !== undefined) input.max = spec.max;
    input.step = spec.step !== undefined ? spec.step : (spec.type === "integer" || kind === "seed" ? 1 : "any");
  }
  input.name = name;
  input.dataset.type = spec.type || "string";
  if (input.type === "checkbox") input.checked = Boolean(spec.default);
  else if (spec.default !== undefined && spec.default !== null && typeof spec.default !== "object") input.value = spec.default;
  if (input.type === "range") {
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = input.value;
    input.addEventListener("input", () => { value.textContent = input.value; });
    label.append(value);
  }
  label.append(input);
  return label;
}

function readField(input) {
  if (input.type === "checkbox") return input.checked;
  if (input.dataset.type === "integer") return parseInt(input.value, 10);
  if (input.dataset.type === "number") return parseFloat(input.value);
  return input.value;
}

function formValues() {
  const values = {};
  for (const input of $("params").elements) if (input.name) values[input.name] = readField(input);
  return values;
}

async function loadSettings() {
  const response = await fetch("/api/settings");
  if (!response.ok) return;
  state.settings = await response.json();
  const form = $("params");
  const props = (state.settings.input_params || {}).properties || {};
  for (const [name, spec] of Object.entries(props)) {
    if (spec.hide) continue;
    form.append(fieldFor(name, spec));
  }
  let pending = null;
  form.addEventListener("input", (event) => {
    clearTimeout(pending);
    const input = event.target;
    pending = setTimeout(() => sendParam(input.name, readField(input)), 250);
  });
}

async function sendParam(name, value) {
  if (!state.stream) return;
  const id = state.stream.id;
  try {
    await api("PATCH", `/v1/streams/${id}/params`, { [name]: value });
  } catch (error) {
    if (error.status !== 409) return showError(error.message);
    // not hot: reload the pipeline while the current one keeps serving
    await api("PATCH", `/v1/streams/${id}`, { params: { [name]: value } }).catch((e) => showError(e.message));
  }
  showError("");
}

// ---- WebRTC helpers ---------------------------------------------------------

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

// ---- sending ------------------------------------------------------------------

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

function sendWebSocket(video) {
  const { width, height } = state.stream.params;
  const canvas = new OffscreenCanvas(width, height);
  const context = canvas.getContext("2d");
  const ws = new WebSocket(wsUrl(state.stream.whip_url));
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  let inFlight = 0;
  ws.onmessage = async (event) => {
    if (typeof event.data === "string") {
      const message = JSON.parse(event.data);
      if (message.type === "error") showError(message.message);
      return;
    }
    inFlight = Math.max(0, inFlight - 1);
    if ($("playback").dataset.ws === "1") drawFrame(event.data);
  };
  const pump = async () => {
    if (ws.readyState !== WebSocket.OPEN) return;
    if (inFlight < 2 && video.readyState >= 2) { // two in flight hides the round trip, no backlog
      context.drawImage(video, 0, 0, width, height);
      const blob = await canvas.convertToBlob({ type: "image/jpeg", quality: 0.85 });
      ws.send(await blob.arrayBuffer());
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

// ---- watching -----------------------------------------------------------------

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
    pc.ontrack = (event) => { $("output-video").srcObject = new MediaStream([event.track]); };
    state.pcOut = pc;
    state.whepSession = await negotiate(pc, state.stream.output_stream_url);
  }
}

// ---- stats --------------------------------------------------------------------

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
  document.body.dataset.outputParamsVersion = data.output_params_version;
  document.body.dataset.state = data.state;
}

async function pollStats() {
  if (!state.stream) return;
  try {
    showStats((await api("GET", `/v1/streams/${state.stream.id}/status`)).data);
  } catch (error) {
    showError(error.message);
  }
}

// ---- start / stop -------------------------------------------------------------

async function start() {
  showError("");
  $("start").disabled = true;
  try {
    state.stream = await api("POST", "/v1/streams", { pipeline: "streamdiffusion", params: formValues() });
    $("stream-info").textContent = `stream ${state.stream.id} · WHIP ${state.stream.whip_url}`;
    state.media = await openSource();
    $("input").srcObject = state.media;
    if ($("transport").value === "whip") await sendWhip(state.media.getVideoTracks()[0]);
    else sendWebSocket($("input"));
    await watch();
    state.timers.push(setInterval(pollStats, 1000));
    $("stop").disabled = false;
  } catch (error) {
    showError(error.message);
    await stop();
  }
}

async function stop() {
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
                         ws: null, media: null });
  $("output-mjpeg").removeAttribute("src");
  $("start").disabled = false;
  $("stop").disabled = true;
}

// The output as the viewer sees it, reduced to a mean colour: lets tests and
// users check that a parameter change really reached the picture.
window.sampleOutput = () => {
  const source = [$("output-video"), $("output-mjpeg"), $("output-canvas")].find((el) => !el.hidden);
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = 64;
  const context = canvas.getContext("2d");
  context.drawImage(source, 0, 0, 64, 64);
  const pixels = context.getImageData(0, 0, 64, 64).data;
  const sum = [0, 0, 0];
  for (let i = 0; i < pixels.length; i += 4) { sum[0] += pixels[i]; sum[1] += pixels[i + 1]; sum[2] += pixels[i + 2]; }
  return sum.map((v) => v / (pixels.length / 4));
};

$("transport").addEventListener("change", () => {
  const playback = $("playback");
  const wsOption = [...playback.options].find((o) => o.value === "ws");
  if ($("transport").value === "ws" && !wsOption) playback.add(new Option("WebSocket", "ws"));
});
$("start").addEventListener("click", start);
$("stop").addEventListener("click", stop);
window.addEventListener("beforeunload", () => { stop(); });

fetch("/health").then((r) => r.json()).then((h) => {
  $("health").textContent = `v${h.version} · ${h.gpu ? h.gpu.name : "CPU"} · ${h.workers.length} worker(s)`;
}).catch(() => { $("health").textContent = "server unreachable"; });
loadSettings();
