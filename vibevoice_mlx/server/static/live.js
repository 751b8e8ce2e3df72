// The playground's live mode: what is typed or pasted goes to WS v1/audio/speech/stream as `input.text` deltas
// while it is typed, and the audio (binary PCM16 frames at 24 kHz) is played as it arrives. Enter, the Finish
// button or a pause sends `input.done` (speak what is pending); the next keystroke starts a new utterance on
// the same connection. Uses $, vv, play, openAudio, showError, voices, isPreset and health from playground.js.
"use strict";

// The live mode's state, for the status line and for the browser test (window.vv.live).
const live = (vv.live = {
  state: "closed", frames: 0, bytes: 0, samples: 0, utterances: 0, done: 0, ttfa: null, serverTtfa: null,
  sent: "", error: null, idle: false,
});
let socket = null;
let opening = null; // the promise of the open socket, while it opens
let utteranceStart = null; // when the first input.text of the current utterance left
let pauseTimer = null;
let liveCarry = new Uint8Array(0);

function liveStatus(state, text) {
  live.state = state;
  $("live-status").textContent = text;
  $("live-finish").disabled = !socket;
  $("live-close").disabled = !socket;
}

function liveError(message) {
  live.error = message;
  showError(message);
}

// The voice is typed or picked: the list offers the presets and saved voices the server has; a preset it has
// not fetched yet can still be named.
function renderLiveVoices() {
  const list = $("live-voices");
  list.replaceChildren();
  for (const v of [...voices.filter(isPreset), ...voices.filter((v) => !isPreset(v))]) {
    const option = new Option(v.id, v.id);
    option.label = !isPreset(v) ? "saved voice (1.5B / 7B)"
      : "preset (realtime model" + (v.downloaded === false ? ", downloaded on first use)" : ")");
    list.append(option);
  }
}
window.renderLiveVoices = renderLiveVoices;

function streamUrl() {
  const url = new URL("v1/audio/speech/stream", document.baseURI);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  // A browser cannot set headers on a WebSocket: the key goes in the query, as the server allows.
  const key = $("api-key").value.trim();
  if (key) url.searchParams.set("api_key", key);
  return url.toString();
}

function sessionConfig() {
  const config = { type: "session.config", model: $("model-pick").value || undefined, response_format: "pcm",
    audio_transport: "binary" };
  if ($("live-voice").value.trim()) config.voice = $("live-voice").value.trim();
  if ($("live-steps").value !== "") config.steps = Number($("live-steps").value);
  if ($("live-cfg").value !== "") config.cfg_scale = Number($("live-cfg").value);
  if ($("seed").value !== "") config.seed = Number($("seed").value);
  return config;
}

function onAudio(bytes) {
  if (utteranceStart !== null && live.ttfa === null) {
    live.ttfa = (performance.now() - utteranceStart) / 1000;
    $("ttfa").textContent = `${(live.ttfa * 1000).toFixed(0)} ms`;
  }
  const all = new Uint8Array(liveCarry.length + bytes.length);
  all.set(liveCarry);
  all.set(bytes, liveCarry.length);
  const even = all.length - (all.length % 2);
  liveCarry = all.slice(even);
  const pcm = new Int16Array(all.buffer.slice(0, even));
  live.frames++;
  live.bytes += bytes.length;
  live.samples += pcm.length;
  play(pcm);
  $("live-frames").textContent = String(live.frames);
  $("live-seconds").textContent = `${(live.samples / SAMPLE_RATE).toFixed(2)} s`;
  liveStatus("speaking", "Speaking…");
}

function onMessage(event) {
  if (typeof event.data !== "string") {
    onAudio(new Uint8Array(event.data));
    return;
  }
  const msg = JSON.parse(event.data);
  if (msg.type === "session.created") {
    liveStatus("open", `Connected: ${msg.model}${msg.voice ? ", voice " + msg.voice : ""}.`);
  } else if (msg.type === "speech.audio.delta") {
    onAudio(decodeBase64(msg.audio));
  } else if (msg.type === "speech.audio.done") {
    // The utterance ended (input.done, or the model finished speaking): the next text starts another.
    utteranceStart = null;
    clearTimeout(pauseTimer);
    live.done++;
    const usage = msg.usage || {};
    live.serverTtfa = usage.time_to_first_audio_s ?? null;
    const server = live.serverTtfa === null ? "" : ` (server: ${(live.serverTtfa * 1000).toFixed(0)} ms)`;
    if (live.ttfa !== null) $("ttfa").textContent = `${(live.ttfa * 1000).toFixed(0)} ms${server}`;
    liveStatus("open", `Done: ${usage.characters ?? "?"} characters, ${(usage.audio_seconds ?? 0).toFixed(2)} s of ` +
      "audio. Type on for the next one.");
  } else if (msg.type === "error" && msg.code === "idle_timeout") {
    live.idle = true; // not a failure: the server closes a quiet session, and the next keystroke opens another
  } else if (msg.type === "error") {
    liveError(`${msg.message} (${msg.code})`);
  }
}

function connect() {
  if (socket) return opening;
  showError("");
  live.error = null;
  socket = new WebSocket(streamUrl());
  socket.binaryType = "arraybuffer";
  liveStatus("connecting", "Connecting…");
  const ws = socket;
  opening = new Promise((resolve, reject) => {
    ws.onopen = () => {
      ws.send(JSON.stringify(sessionConfig()));
      resolve(ws);
    };
    ws.onerror = () => reject(new Error("The WebSocket did not open."));
  });
  ws.onmessage = onMessage;
  ws.onclose = (event) => {
    if (socket !== ws) return;
    socket = null;
    opening = null;
    live.sent = $("live-text").value; // what is on screen now was spoken, or given up with the session
    if (event.code !== 1000 && !live.error && !live.idle) {
      liveError(`The live session ended (${event.code} ${event.reason}).`);
    }
    liveStatus("closed", live.error ? "" : (live.idle ? "Closed after a quiet while; " : "Session closed; ") +
      "type to open a new one.");
    live.idle = false;
  };
  return opening;
}

function send(message) {
  socket.send(JSON.stringify(message));
}

async function sendNewText() {
  const text = $("live-text").value;
  let delta;
  if (text.startsWith(live.sent)) {
    delta = text.slice(live.sent.length);
  } else {
    // An edit inside text already sent: that text is spoken as it was; only what follows the edit is new.
    let common = 0;
    while (common < text.length && text[common] === live.sent[common]) common++;
    delta = text.length > live.sent.length ? text.slice(Math.max(common, live.sent.length)) : "";
  }
  live.sent = text;
  if (!delta) return;
  try {
    if (!audio) await openAudio();
    await connect();
  } catch (e) {
    liveError(e.message);
    return;
  }
  if (!socket) return;
  if (utteranceStart === null) {
    utteranceStart = performance.now();
    live.ttfa = null;
    live.utterances++;
    $("ttfa").textContent = "…";
  }
  send({ type: "input.text", text: delta });
  schedulePause();
}

function schedulePause() {
  clearTimeout(pauseTimer);
  const seconds = Number($("live-pause").value);
  if (seconds > 0) pauseTimer = setTimeout(finish, seconds * 1000);
}

function finish() {
  clearTimeout(pauseTimer);
  if (!socket || utteranceStart === null) return;
  send({ type: "input.done" });
  utteranceStart = null;
  liveStatus("finishing", "Speaking what is pending…");
}

function closeSession() {
  clearTimeout(pauseTimer);
  if (!socket) return;
  send({ type: "session.close" });
  utteranceStart = null;
  liveStatus("closing", "Closing after what is pending…");
}

function setMode(mode) {
  document.body.dataset.mode = mode;
  vv.mode = mode;
  $("mode-script").setAttribute("aria-selected", String(mode === "script"));
  $("mode-live").setAttribute("aria-selected", String(mode === "live"));
  if (mode === "live") $("live-text").focus();
}

$("mode-script").addEventListener("click", () => setMode("script"));
$("mode-live").addEventListener("click", () => setMode("live"));
$("live-text").addEventListener("input", sendNewText);
$("live-text").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    finish();
  }
});
$("live-finish").addEventListener("click", finish);
$("live-close").addEventListener("click", closeSession);
$("model-pick").addEventListener("change", () => socket && closeSession()); // a new model: a new session
renderLiveVoices();
if (location.hash === "#live") setMode("live");
