// The dashboard: everything comes from the API with the bearer token (sessionStorage).
// Job output, paper ids and metrics are untrusted: they only ever go into textContent
// and SVG attributes, never into HTML. Live output is read from GET /jobs/<id>/events
// with fetch() and a stream reader, since EventSource cannot send an Authorization header.
"use strict";

const TOKEN_KEY = "trainium-executor-token";
const REFRESH_MS = 2000;
const MAX_SHOWN = 2 * 1024 * 1024; // characters of output kept on the page
const $ = (id) => document.getElementById(id);
const results = new Map(); // job_id -> its full document, once finished (they never change)
let current = null; // {jobId, abort}
let needLogin = false; // no polling until a token is typed

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

function headers() {
  const t = token();
  return t ? { Authorization: "Bearer " + t } : {};
}

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const resp = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (resp.status === 401) throw new Unauthorized("unauthorized");
  return resp;
}

async function json(path) {
  const resp = await api(path);
  const body = await resp.json();
  if (!resp.ok && resp.status !== 503) throw new Error(body.error || resp.statusText);
  return body;
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function badge(node, word) {
  node.textContent = word;
  node.className = "badge s-" + String(word).replace(/[^a-z]/g, "");
}

function num(value, digits) {
  return typeof value === "number" && isFinite(value) ? value.toFixed(digits) : "";
}

function showLogin(message) {
  needLogin = true;
  $("main").hidden = true;
  $("login").hidden = false;
  $("logout").hidden = true;
  $("login-error").textContent = message || "";
  $("token").focus();
}

function showMain() {
  $("login").hidden = true;
  $("main").hidden = false;
  $("logout").hidden = !token();
}

// --- the pool, the queue, recent jobs ---------------------------------------------

function renderPool(health) {
  const pool = health.pool || {};
  badge($("pool-state"), pool.state || health.status);
  $("pool-summary").textContent =
    `${pool.backend || "?"} · ${pool.size} slots · ${pool.idle} idle · ${pool.busy} busy · ` +
    `${(pool.spares || {}).ready ?? "?"} spares ready · isolation ${health.isolation || "?"}`;
  const rows = (pool.workers || []).map((w) => {
    const tr = el("tr");
    tr.append(el("td", w.id), el("td", w.slot ?? "–"));
    const state = el("td");
    const b = el("span");
    badge(b, w.state);
    state.append(b);
    tr.append(state, el("td", w.core === null ? "–" : w.core), el("td", w.current_job || "–"),
      el("td", num(w.rss_mb, 1)), el("td", w.jobs_run));
    tr.dataset.worker = w.id;
    return tr;
  });
  $("workers").replaceChildren(...rows);
}

function renderQueue(queued) {
  const jobs = queued.jobs || [];
  $("queue-line").textContent = `Queue: ${jobs.length} waiting`;
  $("queue").replaceChildren(...jobs.map((j) => el("li", `${j.paper_id} (${j.job_id.slice(0, 8)})`)));
}

async function finishedDocs(jobs) {
  const missing = jobs.filter((j) => j.finished_at && !results.has(j.job_id)).slice(0, 20);
  await Promise.all(missing.map(async (j) => {
    try { results.set(j.job_id, await json(`/jobs/${encodeURIComponent(j.job_id)}`)); } catch (e) { /* next pass */ }
  }));
}

function renderJobs(list) {
  const rows = list.map((j) => {
    const doc = results.get(j.job_id) || {};
    const tr = el("tr");
    tr.dataset.job = j.job_id;
    if (current && current.jobId === j.job_id) tr.classList.add("selected");
    const status = el("td");
    const b = el("span");
    badge(b, j.finished_at ? (j.success ? "success" : (j.error_type || j.status)) : j.status);
    status.append(b);
    tr.append(el("td", j.paper_id), status, el("td", num(j.execution_time, 2)),
      el("td", num(doc.training_loss, 4)), el("td", num(doc.validation_accuracy, 4)),
      el("td", j.finished_at ? j.finished_at.slice(11, 19) : ""));
    tr.addEventListener("click", () => openJob(j.job_id));
    return tr;
  });
  $("jobs").replaceChildren(...rows);
  renderChart(list.filter((j) => typeof j.execution_time === "number").slice(0, 30).reverse());
}

function renderChart(jobs) {
  const svg = $("chart");
  const ns = "http://www.w3.org/2000/svg";
  const node = (tag, attrs, text) => {
    const n = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, String(v));
    if (text !== undefined) n.textContent = text;
    return n;
  };
  const max = Math.max(0.001, ...jobs.map((j) => j.execution_time));
  const width = 600, height = 120, left = 40, bottom = 105;
  const step = jobs.length ? Math.min(40, (width - left - 5) / jobs.length) : 0;
  const parts = [node("line", { x1: left, y1: bottom, x2: width, y2: bottom, class: "axis" }),
    node("text", { x: 2, y: 12 }, `${max.toFixed(1)} s`), node("text", { x: 2, y: bottom }, "0"),
    node("text", { x: left, y: height - 2 }, "durations of recent jobs, oldest first")];
  jobs.forEach((j, i) => {
    const h = Math.max(1, (j.execution_time / max) * (bottom - 10));
    const bar = node("rect", { x: left + i * step + 1, y: bottom - h, width: Math.max(1, step - 2), height: h,
      class: j.success === false ? "bar failed" : "bar" });
    bar.append(node("title", {}, `${j.paper_id}: ${j.execution_time.toFixed(2)} s`));
    parts.push(bar);
  });
  svg.replaceChildren(...parts);
}

async function refresh() {
  if (needLogin) return;
  try {
    const [health, recent, queued] = await Promise.all([
      json("/health?verbose=1"), json("/jobs?limit=30"), json("/jobs?status=queued&limit=50")]);
    showMain();
    renderPool(health);
    renderQueue(queued);
    await finishedDocs(recent.jobs || []);
    renderJobs(recent.jobs || []);
    $("error").textContent = "";
  } catch (e) {
    if (e instanceof Unauthorized) { showLogin(token() ? "The token was refused." : ""); return; }
    $("error").textContent = "refresh failed: " + e.message;
  }
}

// --- one job: live output, result, figures ------------------------------------------

function appendOutput(text) {
  const pre = $("job-output");
  const stick = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
  let all = pre.textContent + text;
  if (all.length > MAX_SHOWN) all = "… (earlier output not shown)\n" + all.slice(all.length - MAX_SHOWN);
  pre.textContent = all;
  if (stick) pre.scrollTop = pre.scrollHeight;
}

function renderResult(doc) {
  badge($("job-status"), doc.success ? "success" : (doc.error_type || doc.status));
  const dl = el("dl");
  const fields = [["status", doc.status], ["success", doc.success], ["return_code", doc.return_code],
    ["error", doc.error_type ? `${doc.error_type}: ${doc.error_message || ""}` : "none"],
    ["duration", num(doc.execution_time, 3) + " s"], ["queue_time", num(doc.queue_time, 3) + " s"],
    ["peak_memory_mb", num(doc.peak_memory_mb, 1)], ["worker", doc.worker ? `${doc.worker.id} (pid ${doc.worker.pid})` : "–"]];
  for (const [k, v] of Object.entries(doc.detailed_metrics || {})) fields.push([k, typeof v === "number" ? v : JSON.stringify(v)]);
  for (const [k, v] of fields) dl.append(el("dt", k), el("dd", v));
  $("job-result").replaceChildren(el("h3", "Result"), dl);
}

async function renderFigures(jobId, signal) {
  const listing = await json(`/jobs/${encodeURIComponent(jobId)}/artifacts`);
  const images = (listing.artifacts || []).filter((a) => /^image\/(png|jpeg|gif|webp)$/.test(a.content_type));
  const nodes = [];
  for (const a of images) {
    const resp = await api(a.url, { signal });
    if (!resp.ok) continue;
    const img = el("img");
    img.alt = a.name;
    img.title = a.name;
    img.src = URL.createObjectURL(await resp.blob());
    nodes.push(img);
  }
  $("job-figures").replaceChildren(...(nodes.length ? [el("h3", "Figures"), ...nodes] : []));
}

function parseEvent(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  return data.length ? { event, data: JSON.parse(data.join("\n")) } : null;
}

async function follow(jobId, controller) {
  const resp = await api(`/jobs/${encodeURIComponent(jobId)}/events`, { signal: controller.signal });
  if (!resp.ok) {
    const body = await resp.json().catch(() => ({}));
    throw new Error(body.error || `events: ${resp.status}`);
  }
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const msg = parseEvent(buffer.slice(0, cut));
      buffer = buffer.slice(cut + 2);
      if (!msg) continue;
      if (msg.event === "output") appendOutput(msg.data.text);
      else if (msg.event === "status") badge($("job-status"), msg.data.status);
      else if (msg.event === "result") {
        renderResult(msg.data);
        results.set(jobId, msg.data);
        await renderFigures(jobId, controller.signal);
        return;
      } else if (msg.event === "error") throw new Error(msg.data.error);
    }
  }
}

async function openJob(jobId) {
  if (current) current.abort.abort();
  const controller = new AbortController();
  current = { jobId, abort: controller };
  location.hash = "job=" + encodeURIComponent(jobId);
  $("job").hidden = false;
  $("job-title").textContent = jobId.slice(0, 12);
  $("job-output").textContent = "";
  $("job-result").replaceChildren();
  $("job-figures").replaceChildren();
  document.querySelectorAll("#jobs tr").forEach((tr) => tr.classList.toggle("selected", tr.dataset.job === jobId));
  try {
    await follow(jobId, controller);
  } catch (e) {
    if (e.name === "AbortError") return;
    if (e instanceof Unauthorized) { showLogin("The token was refused."); return; }
    $("error").textContent = "job " + jobId + ": " + e.message;
  }
}

// --- start --------------------------------------------------------------------------

function start() {
  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    needLogin = false;
    refresh().then(() => { if (current && !$("main").hidden) openJob(current.jobId); });
  });
  $("logout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    if (current) current.abort.abort();
    showLogin("");
  });
  refresh().then(() => {
    const m = /job=([A-Za-z0-9._-]+)/.exec(location.hash);
    if (m && !$("main").hidden) openJob(m[1]);
  });
  setInterval(refresh, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", start);
