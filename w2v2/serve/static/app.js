// The w2v2 web page: upload or record, transcribe through the server's OpenAI-style endpoint,
// show the words as buttons that follow the playback, offer the transcript in every format.
"use strict";

const $ = (id) => document.getElementById(id);
const FORMATS = ["txt", "srt", "vtt", "json", "tsv"];
let audioBlob = null;   // the file to send: chosen or recorded
let recorder = null;
let words = [];         // [{start, end, el}] in time order
let modelId = null;

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

async function served() {
  if (modelId) return modelId;
  const r = await fetch("/v1/models", { headers: authHeaders() });
  if (!r.ok) throw new Error((await r.json()).error.message);
  modelId = (await r.json()).data[0].id;
  return modelId;
}

$("file").addEventListener("change", () => {
  audioBlob = $("file").files[0] || null;
  if (audioBlob) status(`Chosen: ${audioBlob.name}`);
});

$("record").addEventListener("click", async () => {
  if (recorder && recorder.state === "recording") {
    recorder.stop();
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (e) {
    status("Recording is not available: " + e.message, true);
    return;
  }
  const chunks = [];
  recorder = new MediaRecorder(stream);
  recorder.ondataavailable = (e) => chunks.push(e.data);
  recorder.onstop = () => {
    stream.getTracks().forEach((t) => t.stop());
    audioBlob = new File(chunks, "recording.webm", { type: recorder.mimeType || "audio/webm" });
    $("record").textContent = "Record";
    $("record").setAttribute("aria-pressed", "false");
    $("record-status").textContent = "Recorded; press Transcribe.";
  };
  recorder.start();
  $("record").textContent = "Stop";
  $("record").setAttribute("aria-pressed", "true");
  $("record-status").textContent = "Recording…";
});

$("upload-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (!audioBlob) {
    status("Choose a file or record something first.", true);
    return;
  }
  $("submit").disabled = true;
  status("Transcribing…");
  try {
    const form = new FormData();
    form.append("file", audioBlob, audioBlob.name || "audio");
    form.append("model", await served());
    form.append("response_format", "verbose_json");
    form.append("timestamp_granularities[]", "word");
    form.append("include_formats", FORMATS.join(","));
    const r = await fetch("/v1/audio/transcriptions", { method: "POST", body: form, headers: authHeaders() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    show(body);
    status(`Done: ${body.duration.toFixed(1)} s of audio, ${body.words.length} words.`);
  } catch (e) {
    status("Failed: " + e.message, true);
  } finally {
    $("submit").disabled = false;
  }
});

function show(result) {
  const player = $("player");
  if (player.src) URL.revokeObjectURL(player.src);
  player.src = URL.createObjectURL(audioBlob);
  const box = $("transcript");
  box.replaceChildren();
  words = [];
  for (const seg of result.segments) {
    const p = document.createElement("p");
    p.className = "segment";
    for (const w of seg.words) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "word";
      b.textContent = w.word;
      b.dataset.start = w.start;
      b.dataset.end = w.end;
      b.title = `${w.start.toFixed(2)}–${w.end.toFixed(2)} s`;
      b.addEventListener("click", () => seek(w.start));
      p.append(b, " ");
      words.push({ start: w.start, end: w.end, el: b });
    }
    box.append(p);
  }
  const links = $("downloads");
  links.replaceChildren();
  const stem = (audioBlob.name || "transcript").replace(/\.[^.]*$/, "");
  for (const fmt of FORMATS) {
    const a = document.createElement("a");
    a.href = URL.createObjectURL(new Blob([result.w2v2_formats[fmt]], { type: "text/plain" }));
    a.download = `${stem}.${fmt}`;
    a.textContent = `Download .${fmt}`;
    links.append(a);
  }
  $("result").hidden = false;
}

function seek(seconds) {
  const player = $("player");
  player.currentTime = seconds;
  player.play().catch(() => {});  // autoplay may be refused; the position is set either way
  highlight(seconds);
}

function highlight(t) {
  for (const w of words) w.el.classList.toggle("current", t >= w.start && t < w.end);
}

$("player").addEventListener("timeupdate", () => highlight($("player").currentTime));
