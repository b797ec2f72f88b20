// The dashboard of `actors serve`: reads the v1 API (by relative URLs: the
// app may be mounted under a prefix) with the token in a header (never a cookie or the URL: a cross-site request cannot act, and
// the token is in no log), polls the counts, streams the events.
"use strict";

const STATUS_EVERY_MS = 1000;
const TABLES_EVERY_MS = 2000;
const HISTORY_SECONDS = 300;
const EVENTS_KEPT = 50;

let token = null;
const history = []; // {t, processed, pending}: the chart's points
let streaming = null;

const $ = (id) => document.getElementById(id);

function say(text) {
  $("status-line").textContent = text;
}

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${token}`, ...(options.headers || {}) };
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    options = { ...options, body: JSON.stringify(options.json) };
  }
  const response = await fetch(path, { ...options, headers, credentials: "omit" });
  if (response.status === 401) throw new Unauthorized("the token was refused");
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) {
    throw new Error((data && data.error) || `${response.status} ${response.statusText}`);
  }
  return data;
}

// A page of rows, whichever key the API put them under.
function rows(data, ...keys) {
  if (Array.isArray(data)) return data;
  for (const key of [...keys, "items"]) {
    if (data && Array.isArray(data[key])) return data[key];
  }
  return [];
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === undefined || text === null ? "" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

// -- counts and the chart --------------------------------------------------

async function refreshStatus() {
  const status = await api("v1/status");
  for (const name of ["pending", "in_flight", "dead", "processed", "active_actors"]) {
    const value = status[name];
    $(`c-${name}`).textContent = value === undefined ? "–" : value.toLocaleString();
  }
  const health = status.health || {};
  $("health").textContent = health.healthy ? "healthy" : "not healthy";
  $("health").title = health.reason || "";
  $("health").className = `badge ${health.healthy ? "ok" : "bad"}`;
  const now = Date.now() / 1000;
  history.push({ t: now, processed: status.processed || 0, pending: status.pending || 0 });
  while (history.length && history[0].t < now - HISTORY_SECONDS) history.shift();
  draw();
}

function draw() {
  const canvas = $("chart");
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth * ratio;
  const height = canvas.clientHeight * ratio;
  canvas.width = width;
  canvas.height = height;
  const g = canvas.getContext("2d");
  g.clearRect(0, 0, width, height);
  if (history.length < 2) return;
  const rates = [];
  for (let i = 1; i < history.length; i++) {
    const a = history[i - 1];
    const b = history[i];
    rates.push({ t: b.t, v: Math.max(0, (b.processed - a.processed) / Math.max(b.t - a.t, 0.001)) });
  }
  const backlog = history.map((p) => ({ t: p.t, v: p.pending }));
  $("now-rate").textContent = Math.round(rates[rates.length - 1].v).toLocaleString();
  $("now-backlog").textContent = backlog[backlog.length - 1].v.toLocaleString();
  // The window grows to HISTORY_SECONDS from the first point: the chart
  // fills its width from the start.
  const t1 = history[history.length - 1].t;
  const t0 = history[0].t;
  const line = (points, color) => {
    const top = Math.max(1, ...points.map((p) => p.v));
    g.strokeStyle = color;
    g.lineWidth = 2 * ratio;
    g.beginPath();
    points.forEach((p, i) => {
      const x = ((p.t - t0) / (t1 - t0)) * width;
      const y = height - (p.v / top) * (height - 8 * ratio) - 4 * ratio;
      if (i === 0) g.moveTo(x, y);
      else g.lineTo(x, y);
    });
    g.stroke();
  };
  line(rates, "#2457a6");
  line(backlog, "#c77700");
}

// -- tables ----------------------------------------------------------------

async function refreshTables() {
  const [sessions, dead] = await Promise.all([
    api("v1/sessions?limit=10"),
    api("v1/dead-letters?limit=50"),
  ]);
  const sessionBody = $("sessions").tBodies[0];
  sessionBody.replaceChildren();
  for (const s of rows(sessions, "sessions")) {
    const tr = document.createElement("tr");
    cell(tr, s.session_id);
    cell(tr, s.pending);
    cell(tr, s.in_flight);
    cell(tr, s.dead);
    sessionBody.appendChild(tr);
  }
  const deadBody = $("dead").tBodies[0];
  deadBody.replaceChildren();
  for (const letter of rows(dead, "dead_letters")) {
    const tr = document.createElement("tr");
    tr.dataset.id = letter.id;
    cell(tr, letter.id);
    cell(tr, letter.session_id);
    cell(tr, letter.attempts);
    errorCell(tr, letter.last_error || "");
    const actions = cell(tr, "", "actions");
    actions.append(button("Retry", "retry", () => retry(letter.id)));
    actions.append(" ");
    actions.append(button("Abort", "abort danger", () => abort(letter.id)));
    deadBody.appendChild(tr);
  }
}

// The error's last line (the exception), its whole text (a traceback) folded.
function errorCell(row, error) {
  const td = cell(row, "", "error");
  const lines = error.split("\n").filter((line) => line.trim());
  const details = document.createElement("details");
  const summary = document.createElement("summary");
  summary.textContent = lines.length ? lines[lines.length - 1] : "";
  const full = document.createElement("pre");
  full.textContent = error;
  details.append(summary, full);
  td.appendChild(details);
}

function button(text, cls, action) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.className = cls;
  b.addEventListener("click", () => act(action));
  return b;
}

async function act(action) {
  try {
    await action();
    await Promise.all([refreshStatus(), refreshTables()]);
  } catch (error) {
    failed(error);
  }
}

const retry = (id) => api("v1/dead-letters/retry", { method: "POST", json: { ids: [id] } });
const abort = (id) => api(`v1/messages/${encodeURIComponent(id)}/abort`, { method: "POST" });

// -- events (Server-Sent Events read with fetch: EventSource sends no header)

async function streamEvents() {
  const controller = new AbortController();
  streaming = controller;
  const response = await fetch("v1/events", {
    headers: { Authorization: `Bearer ${token}`, Accept: "text/event-stream" },
    credentials: "omit",
    signal: controller.signal,
  });
  if (response.status === 401) throw new Unauthorized("the token was refused");
  if (!response.ok || !response.body) throw new Error(`events: ${response.status}`);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = frame
        .split("\n")
        .filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart())
        .join("\n");
      if (data) showEvent(data);
    }
  }
}

function showEvent(data) {
  let text = data;
  try {
    const event = JSON.parse(data);
    if (event.kind === "backlog") return; // (the counts above show it)
    text = [event.kind, event.session_id, event.detail].filter((x) => x).join("  ");
  } catch (_) {
    // (not JSON: shown as it came)
  }
  const li = document.createElement("li");
  li.textContent = `${new Date().toLocaleTimeString()}  ${text}`; // (arrival time)
  const list = $("events");
  list.prepend(li);
  while (list.children.length > EVENTS_KEPT) list.lastChild.remove();
}

async function keepStreaming() {
  while (token) {
    try {
      await streamEvents();
    } catch (error) {
      if (error.name === "AbortError") return;
      if (error instanceof Unauthorized) return failed(error);
      say(`events: ${error.message}; reconnecting`);
    }
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

// -- the page --------------------------------------------------------------

function failed(error) {
  if (error instanceof Unauthorized) {
    token = null;
    if (streaming) streaming.abort();
    $("board").hidden = true;
    $("login").hidden = false;
  }
  say(error.message);
}

async function tick(refresh) {
  if (!token) return;
  try {
    await refresh();
    say(`updated ${new Date().toLocaleTimeString()}`);
  } catch (error) {
    failed(error);
  }
}

$("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  token = $("token").value.trim();
  $("token").value = "";
  $("login").hidden = true;
  $("board").hidden = false;
  await tick(refreshStatus);
  await tick(refreshTables);
  keepStreaming();
});

setInterval(() => tick(refreshStatus), STATUS_EVERY_MS);
setInterval(() => tick(refreshTables), TABLES_EVERY_MS);
$("login").hidden = false;
