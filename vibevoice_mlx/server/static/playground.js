// The playground: asks /v1/audio/speech for SSE with 16-bit PCM, plays each delta as it arrives (Web Audio),
// and offers the whole take as a WAV file at the end. No build step, no dependencies. The live mode (live.js)
// shares the key, the model and voice lists and the player defined here.
"use strict";

const SAMPLE_RATE = 24000;
const $ = (id) => document.getElementById(id);
// What the page is doing, for people (the status line) and for the browser test (window.vv).
const vv = (window.vv = { state: "loading", bytes: 0, samples: 0, chunks: 0, played: 0, error: null, seed: null });
let health = null;
let voices = [];
let models = [];
let audio = null; // { ctx, next }
let controller = null;

function setState(state, text) {
  vv.state = state;
  document.body.dataset.state = state;
  if (text !== undefined) $("status").textContent = text;
}

function showError(message) {
  vv.error = message;
  $("error").textContent = message || "";
}

function headers(extra) {
  const h = Object.assign({}, extra);
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorMessage(resp) {
  try {
    const body = await resp.json();
    return (body.error && body.error.message) || resp.statusText;
  } catch (e) {
    return resp.status + " " + resp.statusText;
  }
}

// Speaker ids in the script, in speaker order: "Speaker N:" or "[N]:" at the start of a line.
function speakerIds(script) {
  const ids = new Set();
  for (const m of script.matchAll(/^\s*(?:speaker\s*(\d+)\s*:|\[(\d+)\]\s*:)/gim)) ids.add(Number(m[1] ?? m[2]));
  return ids.size ? [...ids].sort((a, b) => a - b) : [1];
}

function renderSpeakers() {
  const box = $("speakers");
  const chosen = [...box.querySelectorAll("select")].map((s) => s.value);
  box.replaceChildren();
  speakerIds($("script").value).forEach((id, i) => {
    const row = document.createElement("div");
    row.className = "speaker";
    const label = document.createElement("span");
    label.textContent = "Speaker " + id;
    const select = document.createElement("select");
    select.dataset.speaker = String(id);
    select.add(new Option("(model picks)", ""));
    for (const v of voices.filter((v) => !isPreset(v))) select.add(new Option(v.id + (v.seconds ? ` (${v.seconds.toFixed(1)} s)` : ""), v.id));
    if (chosen[i] && voices.some((v) => v.id === chosen[i])) select.value = chosen[i];
    row.append(label, select);
    box.append(row);
  });
}

// A preset of the realtime model, as /v1/voices lists it beside the saved voices.
function isPreset(v) {
  return v.object === "voice.preset";
}

function renderModels() {
  const select = $("model-pick");
  const chosen = select.value;
  select.replaceChildren();
  const ids = models.length ? models.map((m) => m.id) : [health ? health.model : "tts-1"];
  for (const id of ids) select.add(new Option(id, id));
  if (ids.includes(chosen)) select.value = chosen;
}

async function loadModels() {
  const resp = await fetch("v1/models", { headers: headers() });
  if (resp.ok) models = (await resp.json()).data;
  renderModels();
}

async function loadVoices() {
  await loadModels();
  const resp = await fetch("v1/voices", { headers: headers() });
  if (!resp.ok) {
    showError("Voices: " + (await errorMessage(resp)));
    return;
  }
  const body = await resp.json();
  voices = [...body.data, ...(body.presets || [])]; // the realtime presets come beside the saved voices
  renderSpeakers();
  if (window.renderLiveVoices) window.renderLiveVoices();
}

async function uploadVoice(event) {
  event.preventDefault();
  const form = new FormData();
  form.append("name", $("voice-name").value.trim());
  form.append("file", $("voice-file").files[0]);
  $("upload-status").textContent = "Encoding…";
  const resp = await fetch("v1/voices", { method: "POST", headers: headers(), body: form });
  if (!resp.ok) {
    $("upload-status").textContent = "";
    showError("Upload: " + (await errorMessage(resp)));
    return;
  }
  const voice = await resp.json();
  $("upload-status").textContent = `Saved ${voice.id}.`;
  showError("");
  await loadVoices();
}

// An AudioContext that runs (the first click or keystroke allows it), with the play head at its clock.
async function openAudio() {
  const ctx = audio ? audio.ctx : new AudioContext();
  await ctx.resume();
  audio = { ctx, next: 0 };
}

function play(pcm) {
  if (!audio) return;
  const buffer = audio.ctx.createBuffer(1, pcm.length, SAMPLE_RATE);
  const data = buffer.getChannelData(0);
  for (let i = 0; i < pcm.length; i++) data[i] = pcm[i] / 32768;
  const source = audio.ctx.createBufferSource();
  source.buffer = buffer;
  source.connect(audio.ctx.destination);
  source.onended = () => vv.played++;
  // Each chunk starts where the previous one ends; after a stall, a little later than now.
  const at = Math.max(audio.next, audio.ctx.currentTime + 0.05);
  source.start(at);
  audio.next = at + buffer.duration;
}

function wavBlob(chunks, samples) {
  const header = new DataView(new ArrayBuffer(44));
  const text = (offset, s) => [...s].forEach((c, i) => header.setUint8(offset + i, c.charCodeAt(0)));
  text(0, "RIFF");
  header.setUint32(4, 36 + samples * 2, true);
  text(8, "WAVE");
  text(12, "fmt ");
  header.setUint32(16, 16, true);
  header.setUint16(20, 1, true);
  header.setUint16(22, 1, true);
  header.setUint32(24, SAMPLE_RATE, true);
  header.setUint32(28, SAMPLE_RATE * 2, true);
  header.setUint16(32, 2, true);
  header.setUint16(34, 16, true);
  text(36, "data");
  header.setUint32(40, samples * 2, true);
  return new Blob([header, ...chunks], { type: "audio/wav" });
}

function decodeBase64(text) {
  const raw = atob(text);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return bytes;
}

function requestBody() {
  const body = {
    model: $("model-pick").value || (health ? health.model : "tts-1"),
    input: $("script").value,
    response_format: "pcm",
    stream_format: "sse",
    steps: Number($("steps").value),
    cfg_scale: Number($("cfg").value),
  };
  const chosen = [...$("speakers").querySelectorAll("select")].map((s) => s.value);
  if (chosen.some((v) => v)) body.voices = chosen;
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if ($("max-seconds").value !== "") body.max_seconds = Number($("max-seconds").value);
  return body;
}

async function generate() {
  showError("");
  $("result").hidden = true;
  Object.assign(vv, { bytes: 0, samples: 0, chunks: 0, played: 0, seed: null });
  await openAudio();
  controller = new AbortController();
  $("generate").disabled = true;
  $("stop").disabled = false;
  const progress = $("progress");
  progress.hidden = false;
  progress.removeAttribute("value");
  const body = requestBody();
  setState("waiting", "Waiting for the model…");
  const pcmChunks = [];
  let carry = new Uint8Array(0);
  try {
    const resp = await fetch("v1/audio/speech", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    vv.seed = resp.headers.get("X-VibeVoice-Seed");
    vv.warning = resp.headers.get("X-VibeVoice-Warning");  // a voice saved by another model
    setState("streaming", "Generating…");
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let done = null;
    while (!done) {
      const { value, done: eof } = await reader.read();
      if (eof) break;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data:")) continue;
        const event = JSON.parse(line.slice(5));
        if (event.type === "speech.audio.delta") {
          const bytes = decodeBase64(event.audio);
          const all = new Uint8Array(carry.length + bytes.length);
          all.set(carry);
          all.set(bytes, carry.length);
          const even = all.length - (all.length % 2);
          carry = all.slice(even);
          const pcm = new Int16Array(all.buffer.slice(0, even));
          pcmChunks.push(pcm);
          vv.bytes += bytes.length;
          vv.samples += pcm.length;
          vv.chunks++;
          play(pcm);
          const seconds = vv.samples / SAMPLE_RATE;
          if (body.max_seconds) progress.value = Math.min(1, seconds / body.max_seconds);
          $("status").textContent = `Generating… ${seconds.toFixed(2)} s of audio`;
        } else if (event.type === "speech.audio.done") {
          done = event;
        } else if (event.type === "error") {
          throw new Error(event.error.message);
        }
      }
    }
    if (!done) throw new Error("The stream ended before the server said it was done.");
    const blob = wavBlob(pcmChunks, vv.samples);
    const url = URL.createObjectURL(blob);
    $("player").src = url;
    $("download").href = url;
    $("result").hidden = false;
    setState("done", `Done: ${(vv.samples / SAMPLE_RATE).toFixed(2)} s of audio, seed ${done.seed}` +
      (done.truncated ? " (cut at the limit)" : "") + (vv.warning ? `. Warning: ${vv.warning}.` : ""));
  } catch (e) {
    if (e.name === "AbortError") {
      setState("stopped", "Stopped.");
    } else {
      showError(e.message);
      setState("error", "");
    }
  } finally {
    progress.hidden = true;
    $("generate").disabled = false;
    $("stop").disabled = true;
    controller = null;
  }
}

async function start() {
  $("api-key").value = localStorage.getItem("vibevoice-api-key") || "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem("vibevoice-api-key", $("api-key").value.trim());
    loadVoices();
  });
  $("script").addEventListener("input", renderSpeakers);
  $("upload").addEventListener("submit", uploadVoice);
  $("generate").addEventListener("click", generate);
  $("stop").addEventListener("click", () => controller && controller.abort());
  renderSpeakers();
  try {
    health = await (await fetch("health")).json();
    $("model").textContent = health.model;
    renderModels();
    $("key-row").hidden = !health.auth;
    if (!health.auth || $("api-key").value) await loadVoices();
    setState("idle", "");
  } catch (e) {
    showError("The server does not answer: " + e.message);
    setState("error", "");
  }
}

start();
