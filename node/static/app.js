// hyphae dashboard: renders /api/v1/dashboard snapshots streamed over server-sent events.
"use strict";

const token = new URLSearchParams(location.search).get("token");
const withToken = (path) => (token ? `${path}?token=${encodeURIComponent(token)}` : path);
for (const id of ["api-link", "metrics-link", "openapi-link"]) {
  const a = document.getElementById(id);
  a.href = withToken(a.getAttribute("href"));
}

const $ = (id) => document.getElementById(id);
const short = (id) => (id && id.length > 16 ? `${id.slice(0, 8)}…${id.slice(-6)}` : id || "?");
const fmtBytes = (n) => {
  if (n == null) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
};
const fmtNum = (x, d = 3) => (x == null ? "–" : Number(x).toFixed(d));
const fmtValue = (v) => {
  if (Array.isArray(v)) return v.map((x) => (typeof x === "string" ? short(x) : x)).join(", ") || "–";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toFixed(4);
  if (typeof v === "string" && v.length > 24) return `${v.slice(0, 12)}…`;
  return String(v);
};
const fmtDur = (s) => {
  if (s == null) return "–";
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
};

function facts(el, rows) {
  el.replaceChildren();
  for (const [k, v] of rows) {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v;
    el.append(dt, dd);
  }
}

function chart(el, series, opts = {}) {
  const width = () => Math.max(el.clientWidth, 260);
  const plot = new uPlot({ width: width(), height: 220, series, scales: { x: { time: false } }, ...opts },
                         series.map(() => []), el);
  new ResizeObserver(() => plot.setSize({ width: width(), height: 220 })).observe(el);
  return plot;
}

const lossChart = chart($("loss-chart"), [
  { label: "step" },
  { label: "train loss", stroke: "#2f7d5b", width: 2 },
  { label: "validation loss", stroke: "#b4651b", width: 2, points: { show: true }, spanGaps: true },
]);
const rateChart = chart($("rate-chart"), [
  { label: "step" },
  { label: "tokens/s", stroke: "#3b6fb6", width: 2 },
]);

function renderTraining(t) {
  if (!t) return;
  facts($("training-facts"), [
    ["state", t.state], ["algorithm", `${t.algorithm} · ${t.preset}`], ["step", t.step],
    ["loss", fmtNum(t.loss)], ["validation loss", fmtNum(t.val_loss)],
    ["tokens/s", t.tokens_per_s == null ? "–" : Math.round(t.tokens_per_s)],
    ["checkpoint", t.checkpoint_step == null ? "–" : `step ${t.checkpoint_step}`],
    ["worker", `pid ${t.worker_pid ?? "–"} · ${t.worker_restarts} restart(s)`],
    ...Object.entries(t.algorithm_state || {}).map(([k, v]) => [k.replaceAll("_", " "), fmtValue(v)]),
  ]);
  const steps = new Set();
  for (const h of t.history) steps.add(h.step);
  for (const e of t.evals) steps.add(e.step);
  const xs = [...steps].sort((a, b) => a - b);
  const loss = new Map(t.history.map((h) => [h.step, h.loss]));
  const val = new Map(t.evals.map((e) => [e.step, e.val_loss]));
  lossChart.setData([xs, xs.map((s) => loss.get(s) ?? null), xs.map((s) => val.get(s) ?? null)]);
  const rateRows = t.history.filter((h) => h.tokens_per_s != null);
  rateChart.setData([rateRows.map((h) => h.step), rateRows.map((h) => h.tokens_per_s)]);
}

function renderNode(n) {
  $("peer-id").textContent = n.peer_id;
  const hw = n.hardware || {};
  facts($("node-facts"), [
    ["version", n.version], ["uptime", fmtDur(n.uptime_s)], ["network", n.network],
    ["roles", n.roles.join(", ")], ["reachability", n.reachability ?? "unknown"],
    ["addresses", n.addrs.join("\n")],
    ["hardware", `${hw.cpus ?? "?"} CPUs · ${fmtBytes(hw.memory_bytes)} RAM · ${hw.machine ?? ""}`],
    ["DHT", `${n.routing_table_size} peers in the routing table`],
  ]);
  const badges = $("badges");
  badges.replaceChildren();
  const add = (text, cls = "") => {
    const b = document.createElement("span"); b.className = `badge ${cls}`; b.textContent = text; badges.append(b);
  };
  add(`v${n.version}`);
  add(`${n.connections} peer(s)`, n.connections ? "" : "warn");
  add(n.reachability ?? "reachability unknown", n.reachability === "public" ? "" : "warn");
}

function renderRun(run, training) {
  const rows = [];
  if (run) {
    rows.push(["run", run.name ?? "–"]);
    rows.push(["members", `${run.live ?? "?"} live · ${run.suspect ?? 0} suspect · ${run.gone ?? 0} gone`]);
    if (run.config && Object.keys(run.config).length) rows.push(["config", JSON.stringify(run.config)]);
    const experts = Object.entries(run.experts || {});
    if (experts.length) {
      const byOwner = new Map();
      for (const [e, owner] of experts) byOwner.set(owner, [...(byOwner.get(owner) || []), e]);
      for (const [owner, es] of byOwner) rows.push([`experts of ${short(owner)}`, es.sort((a, b) => a - b).join(", ")]);
    }
  }
  if (training && training.members) rows.push(["training with", training.members.map(short).join(", ")]);
  facts($("run-facts"), rows.length ? rows : [["", "not in a run"]]);
}

function renderPeers(peers, traffic) {
  const bytes = new Map();
  for (const row of traffic) {
    const b = bytes.get(row.peer) || { sent: 0, received: 0, rate: 0 };
    b.sent += row.sent; b.received += row.received; b.rate += row.rate_bps || 0;
    bytes.set(row.peer, b);
  }
  $("peer-count").textContent = `(${peers.length})`;
  const body = document.querySelector("#peers tbody");
  body.replaceChildren();
  for (const p of peers) {
    const b = bytes.get(p.peer_id) || {};
    const cells = [short(p.peer_id), p.path ?? p.connection, p.direction, fmtNum(p.rtt_ms, 2), fmtBytes(b.sent),
                   fmtBytes(b.received), b.rate ? `${fmtBytes(b.rate)}/s` : "–", p.agent ?? "(hello pending)",
                   p.sources.join(", "), fmtDur(p.connected_s)];
    const tr = document.createElement("tr");
    tr.dataset.peer = p.peer_id;
    cells.forEach((c, i) => {
      const td = document.createElement("td"); td.textContent = c;
      if ([3, 4, 5, 6].includes(i)) td.className = "num";
      if (i === 0) { td.className = "mono"; td.title = p.peer_id; }
      tr.append(td);
    });
    body.append(tr);
  }
}

function renderNetwork(self, peers, links) {
  const svg = $("network");
  const ns = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  const active = new Set(links.filter((l) => l.active).map((l) => l.peer));
  const pos = new Map([[self, [0, 0]]]);
  peers.forEach((p, i) => {
    const a = (2 * Math.PI * i) / Math.max(peers.length, 1) - Math.PI / 2;
    pos.set(p.peer_id, [80 * Math.cos(a), 80 * Math.sin(a)]);
  });
  for (const p of peers) {
    const [x, y] = pos.get(p.peer_id);
    const line = document.createElementNS(ns, "line");
    Object.entries({ x1: 0, y1: 0, x2: x, y2: y }).forEach(([k, v]) => line.setAttribute(k, v));
    line.setAttribute("class", `link ${active.has(p.peer_id) ? "active" : ""}`);
    line.setAttribute("stroke-width", active.has(p.peer_id) ? 3 : 1);
    if (p.connection === "relayed") line.setAttribute("stroke-dasharray", "4 3");
    svg.append(line);
  }
  for (const [id, [x, y]] of pos) {
    const c = document.createElementNS(ns, "circle");
    c.setAttribute("cx", x); c.setAttribute("cy", y); c.setAttribute("r", id === self ? 9 : 7);
    if (id === self) c.setAttribute("class", "self");
    const title = document.createElementNS(ns, "title"); title.textContent = id; c.append(title);
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", x); t.setAttribute("y", y + (y >= 0 ? 17 : -11)); t.textContent = id === self ? "this node" : id.slice(-6);
    svg.append(c, t);
  }
}

function renderDownloads(downloads) {
  let box = document.getElementById("downloads");
  if (!downloads.length) { if (box) box.remove(); return; }
  if (!box) {
    box = document.createElement("div"); box.id = "downloads"; box.className = "card";
    document.querySelector("main").prepend(box);
  }
  box.replaceChildren(Object.assign(document.createElement("h2"), { textContent: "Downloads" }));
  for (const d of downloads) {
    const row = document.createElement("div");
    const bar = document.createElement("progress");
    bar.max = d.total || 1; bar.value = d.done;
    row.append(`${d.what} · ${d.done}/${d.total ?? "?"} chunks · ${fmtBytes(d.size_bytes)} from ${d.providers} peer(s) `, bar);
    box.append(row);
  }
}

function render(state) {
  renderDownloads(state.downloads || []);
  renderNode(state.node);
  renderTraining(state.training);
  renderRun(state.run, state.training);
  renderPeers(state.peers, state.traffic || []);
  renderNetwork(state.node.peer_id, state.peers, state.links || []);
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
}

window.hyphaeDashboard = { lossChart, rateChart };  // for tests and the curious: live chart state

function connect() {
  const source = new EventSource(withToken("api/v1/events"));
  source.onopen = () => $("live").classList.add("on");
  source.onmessage = (ev) => render(JSON.parse(ev.data));
  source.onerror = () => { $("live").classList.remove("on"); };
}

// Actions go through this page's own origin with the daemon's CSRF token, read same-origin: the
// API refuses state-changing requests from other origins and without a token (api_guard.py).
let csrfToken = null;
async function post(path, body) {
  if (csrfToken === null) {
    const res = await fetch(withToken("api/v1/csrf"), { cache: "no-store" });
    if (!res.ok) throw new Error(`GET api/v1/csrf: HTTP ${res.status}`);
    csrfToken = (await res.json()).csrf_token;
  }
  const headers = { "X-Hyphae-CSRF": csrfToken };
  const init = { method: "POST", headers, cache: "no-store" };
  if (body !== undefined) { headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
  const res = await fetch(withToken(path), init);
  const answer = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(answer.error || `POST ${path}: HTTP ${res.status}`);
  return answer;
}

$("leave").onclick = async () => {
  if (!confirm("Stop this node? It leaves the run cleanly, as `hyphae node leave` does.")) return;
  const button = $("leave");
  button.disabled = true;
  try {
    await post("api/v1/node/leave");
    button.textContent = "stopping…";
    document.body.dataset.left = "true";
  } catch (err) {
    button.disabled = false;
    button.title = String(err);
    document.body.dataset.leaveError = String(err);
  }
};

connect();
