// vitals dashboard: plain JS, no build step. Reads the API with a dev token, draws the last 14
// days as SVG bar charts, and patches its cache from the realtime WebSocket as envelopes arrive.
"use strict";

const DAYS = 14;
const METRICS = { steps: "sum", heart_rate: "mean", active_energy: "sum", hrv_sdnn: "mean" };
const STAGES = ["deep", "core", "rem", "asleep_unspecified", "awake"];
const COLORS = { steps: "#4cc2ff", heart_rate: "#f778ba", active_energy: "#ffa657", hrv_sdnn: "#7ee787", deep: "#3b5bdb", core: "#4cc2ff", rem: "#d2a8ff", asleep_unspecified: "#74c0fc", awake: "#ffa657" };

const state = { token: null, rollups: new Map(), sleep: new Map(), sessions: new Map(), updates: 0, ws: null };
const $ = (sel) => document.querySelector(sel);

function dates() {
  const out = [];
  const today = new Date();
  for (let i = DAYS - 1; i >= 0; i--) {
    const d = new Date(today.getFullYear(), today.getMonth(), today.getDate() - i);
    out.push(`${d.getFullYear()}-${String(d.getMonth() + 1).padStart(2, "0")}-${String(d.getDate()).padStart(2, "0")}`);
  }
  return out;
}

async function api(path) {
  const r = await fetch(path, { headers: { Authorization: `Bearer ${state.token}` } });
  const body = await r.json();
  if (!r.ok) throw new Error(`${body.error ? body.error.code + ": " + body.error.message : r.status}`);
  return body;
}

async function all(path) {
  let items = [], cursor = null, last = null;
  do {
    const sep = path.includes("?") ? "&" : "?";
    const page = await api(cursor ? `${path}${sep}cursor=${encodeURIComponent(cursor)}` : path);
    items = items.concat(page.data);
    cursor = page.next_cursor;
    last = page;
  } while (cursor);
  return { items, freshness: last.freshness };
}

function bars(el, days, values, color, fmt) {
  const w = 400, h = 140, pad = 18, bw = (w - pad) / days.length;
  const max = Math.max(1, ...values.map((v) => (Array.isArray(v) ? v.reduce((a, b) => a + b.v, 0) : v || 0)));
  let svg = `<svg viewBox="0 0 ${w} ${h}" preserveAspectRatio="none">`;
  days.forEach((d, i) => {
    const x = pad + i * bw + 2;
    const v = values[i];
    if (Array.isArray(v)) {
      let y = h - pad;
      for (const part of v) {
        const bh = ((h - 2 * pad) * part.v) / max;
        y -= bh;
        svg += `<rect class="bar" data-date="${d}" data-part="${part.k}" x="${x}" y="${y}" width="${bw - 4}" height="${bh}" fill="${COLORS[part.k] || color}"><title>${d} ${part.k}: ${fmt(part.v)}</title></rect>`;
      }
    } else if (v != null) {
      const bh = ((h - 2 * pad) * v) / max;
      svg += `<rect class="bar" data-date="${d}" data-value="${v}" x="${x}" y="${h - pad - bh}" width="${bw - 4}" height="${bh}" fill="${color}"><title>${d}: ${fmt(v)}</title></rect>`;
    }
    if (i % 2 === 0) svg += `<text class="axis" x="${x}" y="${h - 4}">${d.slice(5)}</text>`;
  });
  svg += `<text class="axis" x="0" y="10">${fmt(max)}</text></svg>`;
  el.innerHTML = values.some((v) => v != null && (!Array.isArray(v) || v.length)) ? svg : `<div class="empty">no data in the last ${DAYS} days yet</div>`;
}

function render() {
  const days = dates();
  for (const [metric, field] of Object.entries(METRICS)) {
    const values = days.map((d) => {
      const r = state.rollups.get(`${metric}|${d}`);
      return r ? r[field] : null;
    });
    bars(document.querySelector(`[data-metric="${metric}"] .chart`), days, values, COLORS[metric], (v) => (v == null ? "" : Math.round(v).toLocaleString()));
  }
  const nights = days.map((d) => {
    const n = state.sleep.get(d);
    if (!n) return null;
    return STAGES.filter((s) => n.stage_minutes[s]).map((s) => ({ k: s, v: n.stage_minutes[s] / 60 }));
  });
  bars($("#sleep .chart"), days, nights, "#4cc2ff", (v) => v.toFixed(1));
  const sessions = [...state.sessions.values()].sort((a, b) => b.start_ms - a.start_ms).slice(0, 12);
  $("#sessions .table").innerHTML = sessions.length
    ? `<table><tr><th>start</th><th>product</th><th>status</th><th>HR before</th><th>Δ during</th><th>Δ after</th></tr>${sessions
        .map((s) => {
          const hr = (s.metrics || []).find((m) => m.metric === "heart_rate") || {};
          const f = (x) => (x == null ? "–" : x.toFixed(1));
          return `<tr class="session" data-id="${s.session_id}"><td>${new Date(s.start_ms).toLocaleString()}</td><td>${s.product_id || "–"}</td><td>${s.status.toLowerCase()}</td><td>${f(hr.before && hr.before.mean)}</td><td>${f(hr.delta_during)}</td><td>${f(hr.delta_after)}</td></tr>`;
        })
        .join("")}</table>`
    : `<div class="empty">no sessions yet</div>`;
  $("#live-count").textContent = String(state.updates);
}

function showFreshness(all) {
  $("#freshness").className = "";
  $("#freshness").innerHTML = Object.entries(all)
    .map(([p, f]) => `<div data-projection="${p}" data-state="${f.state}">${p}: <span class="badge ${f.state}">${f.state}</span>${f.state === "stale" ? ` ${f.offsets_behind} behind` : ""}</div>`)
    .join("");
  document.querySelectorAll("[data-fresh]").forEach((el) => {
    const f = all[el.dataset.fresh];
    if (f) { el.textContent = f.state; el.className = `badge ${f.state}`; }
  });
}

async function refreshFreshness() {
  try { showFreshness((await api("/v1/freshness")).freshness); } catch (e) { $("#error").textContent = e.message; }
}

async function load() {
  const from = dates()[0];
  const [r, s, x] = await Promise.all([all(`/v1/rollups?from=${from}`), all(`/v1/sleep?from=${from}`), all(`/v1/sessions?from=${Date.now() - DAYS * 86400000}`)]);
  state.rollups = new Map(r.items.map((i) => [`${i.metric}|${i.local_date}`, i]));
  state.sleep = new Map(s.items.map((i) => [i.night_date, i]));
  state.sessions = new Map(x.items.map((i) => [i.session_id, i]));
  render();
  await refreshFreshness();
}

let freshTimer = null;
function apply(env) {
  const body = JSON.parse(env.payload);
  const [projection, what] = env.event_type.split(".");
  const maps = { rollup_day: state.rollups, sleep_night: state.sleep, session_impact: state.sessions };
  const map = maps[projection];
  if (map) {
    if (what === "deleted") map.delete(env.entity_id);
    else map.set(env.entity_id, body);
  }
  state.updates += 1;
  const line = document.createElement("div");
  line.textContent = `${new Date().toLocaleTimeString()} ${env.event_type} ${env.entity_id} v${env.version_epoch}.${env.version_seq}`;
  $("#feed").prepend(line);
  while ($("#feed").children.length > 50) $("#feed").lastChild.remove();
  render();
  clearTimeout(freshTimer);
  freshTimer = setTimeout(refreshFreshness, 300);
}

function connect() {
  if (state.ws) state.ws.close();
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${proto}://${location.host}/v1/realtime?token=${encodeURIComponent(state.token)}`);
  state.ws = ws;
  ws.onopen = () => { $("#live").textContent = "realtime: live"; $("#live").className = "badge live"; };
  ws.onmessage = (m) => apply(JSON.parse(m.data));
  ws.onclose = (e) => {
    $("#live").textContent = `realtime: offline${e.code === 4008 ? " (slow)" : ""}`;
    $("#live").className = "badge offline";
    if (state.ws === ws) setTimeout(() => { if (state.ws === ws) { load().catch(() => {}); connect(); } }, 2000);
  };
}

async function signIn(token) {
  state.token = token.trim();
  $("#error").textContent = "";
  try {
    const payload = JSON.parse(atob(state.token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
    $("#user").textContent = payload.sub;
    await load();
    connect();
  } catch (e) {
    $("#error").textContent = e.message;
  }
}

$("#signin").onclick = () => signIn($("#token").value);
const fromUrl = new URLSearchParams(location.hash.slice(1)).get("token") || new URLSearchParams(location.search).get("token");
if (fromUrl) { $("#token").value = fromUrl; signIn(fromUrl); }
