// The swarm page: polls /v1/swarm and builds the DOM with textContent only, so text from
// a peer's card is always text. An API key, if the node wants one, comes from #key=...
"use strict";
const REFRESH_MS = 3000;
const key = new URLSearchParams(location.hash.slice(1)).get("key");

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function table(headers, rows) {
  if (!rows.length) return el("p", "none", "muted");
  const t = el("table");
  const head = t.insertRow();
  for (const h of headers) head.appendChild(el("th", h));
  for (const row of rows) {
    const tr = t.insertRow();
    for (const cell of row) {
      const td = tr.insertCell();
      if (cell instanceof Node) td.appendChild(cell); else td.textContent = String(cell);
    }
  }
  return t;
}

function id(text) { return el("span", text, "id"); }
function gb(bytes) { return (bytes / 1e9).toFixed(1) + " GB"; }
function size(bytes) { return bytes >= 1e9 ? gb(bytes) : (bytes / 1e6).toFixed(1) + " MB"; }
function hardware(c) {
  const acc = c.accelerators.length ? " " + c.accelerators.join(", ") : "";
  return `${c.os}/${c.arch}, ${c.cpu_cores} cores, ${gb(c.ram_available)} free of ` +
    `${gb(c.ram_total)}, ${c.compute_gflops} GFLOP/s${acc}`;
}

function bar(blocks, spans, gaps) {
  const b = el("div", null, "bar");
  const part = (cls, s) => {
    const d = el("div", null, cls);
    d.style.left = (100 * s.start / blocks) + "%";
    d.style.width = (100 * (s.end - s.start) / blocks) + "%";
    b.appendChild(d);
  };
  spans.forEach(s => part("span", s));
  gaps.forEach(g => part("gap", g));
  return b;
}

function render(s) {
  const n = s.node;
  const node = document.getElementById("node");
  node.replaceChildren(
    el("div", "This node: "), id(n.peer_id),
    el("div", hardware(n) + `, load ${n.load}` + (n.local_only ? " (local mode)" : "")),
    el("div", "version " + n.software_version, "muted"));
  node.className = "";
  document.getElementById("peer-count").textContent =
    `(${s.peers.length}` + (s.peers_total > s.peers.length ? ` of ${s.peers_total}` : "") + ")";
  document.getElementById("peers").replaceChildren(table(
    ["peer (verified card)", "hardware", "load", "models", "blocks served", "card age"],
    s.peers.map(p => [id(p.peer_id), hardware(p), p.load, p.models.join(", ") || "-",
      p.layers.map(l => `${l.model} ${l.start}-${l.end}`).join(", ") || "-", p.age_s + " s"])));
  const models = el("div");
  models.appendChild(table(["model", "runs"], s.models.map(m => [m.id, m.where])));
  for (const c of s.coverage) {
    models.appendChild(el("h3", `${c.model}: ${c.blocks} blocks, ` +
      (c.covered ? "fully covered" : "gaps: " + c.gaps.map(g => `${g.start}-${g.end}`).join(", ")),
      c.covered ? "ok" : "bad"));
    models.appendChild(table(["peer", "blocks", ""], c.spans.map(sp => [
      sp.peer_id === n.peer_id ? id(sp.peer_id + " (this node)") : id(sp.peer_id),
      `${sp.start}-${sp.end}`, bar(c.blocks, [sp], [])])));
    models.appendChild(bar(c.blocks, c.spans, c.gaps));
  }
  document.getElementById("models").replaceChildren(models);
  document.getElementById("sessions").replaceChildren(
    el("p", `${s.shard_sessions} shard session(s) served for peers`, "muted"),
    table(["model", "runs", "tokens", "tok/s", "age"],
      s.sessions.map(x => [x.model, x.where, x.tokens, x.tok_per_s, x.age_s + " s"])));
  const c = s.cache;
  document.getElementById("cache").replaceChildren(
    el("p", `${c.models} model(s), ${gb(c.used_bytes)} of ${gb(c.budget_bytes)}; ` +
      `${c.loads} load(s), ${c.evictions} eviction(s)`, "muted"),
    table(["model", "kind", "provider", "size", "uses", "in use"],
      c.loaded.map(m => [m.name, m.kind, m.provider, size(m.size_bytes), m.uses, m.in_use])));
  document.getElementById("pulls").replaceChildren(table(["file (sha256)", "chunks", "bytes"],
    s.pulls.map(p => [id(p.blob + "…"), p.chunks, p.bytes])));
}

async function refresh() {
  const status = document.getElementById("status");
  try {
    const r = await fetch("/v1/swarm", key ? {headers: {Authorization: "Bearer " + key}} : {});
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json());
    status.textContent = "updated " + new Date().toLocaleTimeString();
    status.className = "muted";
  } catch (e) {
    status.textContent = "cannot reach the node: " + e.message;
    status.className = "bad";
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
