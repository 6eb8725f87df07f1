// Ambit's mesh console: a few views over the control plane's JSON API, redrawn every
// few seconds. No framework and nothing from other origins: the page must work on a
// machine without the internet.
"use strict";

const view = () => document.getElementById("view");
const SVG = "http://www.w3.org/2000/svg";
let timer = null;

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

function svg(tag, attrs = {}) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

async function api(path) {
  const r = await fetch(path, { credentials: "same-origin" });
  if (!r.ok) throw new Error(`${path}: ${r.status} ${await r.text()}`);
  return r.json();
}

function status(text) {
  document.getElementById("status").textContent = text;
}

const num = (x, digits = 1) => (x === null || x === undefined) ? "–" : Number(x).toFixed(digits);

function bytes(x) {
  if (!x) return "0 B";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (x >= 1024 && i < units.length - 1) { x /= 1024; i++; }
  return `${x.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function security(s) {
  return { mutual_tls: "mutual TLS", plaintext: "plaintext", denied: "denied" }[s] || s;
}

// The graph: namespaces as columns, workloads down each column, edges as arrows
// coloured by their security.
function drawGraph(g) {
  const byNs = {};
  for (const n of g.nodes) (byNs[n.namespace] = byNs[n.namespace] || []).push(n);
  const namespaces = Object.keys(byNs).sort();
  const colW = 360, rowH = 150, pad = 120;
  const pos = {};
  namespaces.forEach((ns, c) => {
    byNs[ns].sort((a, b) => a.name.localeCompare(b.name)).forEach((n, r) => {
      pos[n.id] = { x: pad + c * colW, y: pad + 30 + r * rowH };
    });
  });
  const rows = Math.max(1, ...namespaces.map(ns => byNs[ns].length));
  const width = pad * 2 + Math.max(1, namespaces.length) * colW;
  const height = pad * 2 + rows * rowH;
  const s = svg("svg", { width, height, id: "graph", role: "img", "aria-label": "service graph" });
  const defs = svg("defs");
  for (const [id, colour] of [["mutual_tls", "#2a8a3a"], ["plaintext", "#d98a00"], ["denied", "#c62828"]]) {
    const m = svg("marker", { id: `arrow-${id}`, viewBox: "0 0 10 10", refX: 22, refY: 5, markerWidth: 8, markerHeight: 8, orient: "auto-start-reverse" });
    m.append(svg("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: colour }));
    defs.append(m);
  }
  s.append(defs);
  namespaces.forEach((ns, c) => {
    const t = svg("text", { x: pad + c * colW - 20, y: pad - 10, "font-weight": "bold" });
    t.textContent = `namespace ${ns}`;
    s.append(t);
  });
  for (const e of g.edges) {
    const a = pos[e.source], b = pos[e.destination];
    if (!a || !b) continue;
    const grp = svg("g", { class: `edge ${e.security}`, "data-source": e.source, "data-target": e.destination, "data-security": e.security });
    grp.append(svg("line", { x1: a.x, y1: a.y, x2: b.x, y2: b.y, "marker-end": `url(#arrow-${e.security})` }));
    const lines = [security(e.security)];
    if (e.requests_total > 0) {
      lines.push(`${num(e.requests_per_s)} req/s · ${num((e.error_rate || 0) * 100)}% errors`);
      lines.push(`p50 ${num(e.p50_ms)} ms · p99 ${num(e.p99_ms)} ms`);
    } else if (e.connections_per_s > 0) {
      lines.push(`${num(e.connections_per_s, 2)} conn/s · ${bytes(e.bytes_per_s)}/s`);
    } else {
      lines.push(`${e.connections_total} connections · ${bytes(e.bytes_total)}`);
    }
    if (e.denied_total > 0) lines.push(`${e.denied_total} denied`);
    // The label beside the middle of the edge, off the line.
    const mx = (a.x + b.x) / 2, my = (a.y + b.y) / 2;
    const vertical = Math.abs(b.x - a.x) < Math.abs(b.y - a.y);
    const label = svg("text", { x: vertical ? mx + 14 : mx, y: vertical ? my - 8 * lines.length : my - 14 * lines.length, "text-anchor": vertical ? "start" : "middle" });
    lines.forEach((line, i) => {
      const span = svg("tspan", { x: vertical ? mx + 14 : mx, dy: i ? "1.2em" : "0" });
      span.textContent = line;
      label.append(span);
    });
    const title = svg("title");
    title.textContent = `${e.source} → ${e.destination} (${e.service || "no service"})\n${security(e.security)}` +
      (e.source_principal ? `\nfrom ${e.source_principal}` : "") + (e.destination_principal ? `\nto ${e.destination_principal}` : "") +
      `\n${e.connections_total} connections, ${bytes(e.bytes_total)}`;
    grp.append(title, label);
    s.append(grp);
  }
  for (const n of g.nodes) {
    const p = pos[n.id];
    const grp = svg("g", { class: `node ${n.kind}`, "data-id": n.id, tabindex: 0 });
    grp.append(svg("circle", { cx: p.x, cy: p.y, r: 16 }));
    const t = svg("text", { x: p.x, y: p.y + 34, "text-anchor": "middle" });
    t.textContent = n.name;
    grp.append(t);
    if (n.kind === "workload") grp.addEventListener("click", () => { location.hash = `#/workload/${n.namespace}/${n.name}`; });
    s.append(grp);
  }
  return s;
}

async function showGraph() {
  const g = await api("/api/graph");
  const box = el("section", { id: "graph-view" },
    el("h2", { text: "Service graph" }),
    el("p", { class: "legend" },
      el("span", { class: "mutual_tls", text: "— mutual TLS" }),
      el("span", { class: "plaintext", text: "- - plaintext" }),
      el("span", { class: "denied", text: "— denied by policy" })),
    drawGraph(g),
    el("p", { text: `${g.nodes.length} workloads, ${g.edges.length} edges, ${g.reporters.length} proxies reporting` }));
  view().replaceChildren(box);
  status(`updated ${new Date().toLocaleTimeString()}`);
}

async function showWorkload(ns, name) {
  const w = await api(`/api/workload?namespace=${encodeURIComponent(ns)}&name=${encodeURIComponent(name)}`);
  const dl = el("dl", { id: "workload" });
  const row = (k, v, attrs = {}) => dl.append(el("dt", { text: k }), el("dd", { ...attrs, text: v }));
  row("Identity", w.identity);
  row("Node", w.node || "–");
  row("Addresses", (w.ips || []).join(", ") || "–");
  row("In the mesh", w.enrolled ? "yes" : "no");
  row("Services", w.services.join(", ") || "–");
  row("Waypoint", w.waypoint || "none");
  if (w.certificate) row("Certificate", `serial ${w.certificate.serial}, valid until ${w.certificate.not_after}`, { id: "certificate" });
  else row("Certificate", "none reported yet", { id: "certificate" });
  const policies = el("table", {}, el("tr", {}, el("th", { text: "Policy" }), el("th", { text: "Action" }), el("th", { text: "Selects" }), el("th", { text: "Findings" })));
  for (const p of w.policies) policies.append(el("tr", {}, el("td", { text: `${p.kind} ${p.namespace}/${p.name}` }), el("td", { text: p.action }), el("td", { text: p.selects }), el("td", { text: p.findings.join("; ") })));
  const traffic = el("table", { id: "traffic" }, el("tr", {}, el("th", { text: "From" }), el("th", { text: "To" }), el("th", { text: "Security" }), el("th", { text: "Connections" }), el("th", { text: "Denied" }), el("th", { text: "Requests" })));
  for (const e of w.traffic) traffic.append(el("tr", {}, el("td", { text: e.source }), el("td", { text: e.destination }), el("td", { class: e.security, text: security(e.security) }), el("td", { text: e.connections_total }), el("td", { text: e.denied_total }), el("td", { text: e.requests_total })));
  const traces = el("table", { id: "traces" }, el("tr", {}, el("th", { text: "Trace" }), el("th", { text: "When" }), el("th", { text: "Request" }), el("th", { text: "From" }), el("th", { text: "Status" }), el("th", { text: "Duration" })));
  for (const t of w.traces || []) {
    const id = t.url ? el("a", { href: t.url, target: "_blank", rel: "noopener", text: t.trace_id }) : el("code", { text: t.trace_id });
    traces.append(el("tr", {}, el("td", {}, id), el("td", { text: t.at }), el("td", { text: `${t.method} ${t.service}${t.path}` }), el("td", { text: t.source }), el("td", { text: t.status }), el("td", { text: `${t.duration_ms} ms` })));
  }
  view().replaceChildren(el("section", {}, el("h2", { text: `Workload ${w.namespace}/${w.name}` }), dl,
    el("h3", { text: "Policies that apply" }), policies, el("h3", { text: "Recent traffic and decisions" }), traffic,
    el("h3", { text: "Recent traces (sampled requests through a waypoint)" }), (w.traces || []).length ? traces : el("p", { text: "None sampled." })));
  status(`updated ${new Date().toLocaleTimeString()}`);
}

async function showPolicies() {
  const { policies } = await api("/api/policies");
  const t = el("table", { id: "policies" }, el("tr", {}, el("th", { text: "Policy" }), el("th", { text: "Action" }), el("th", { text: "Selects" }), el("th", { text: "Enforced" }), el("th", { text: "Allowed" }), el("th", { text: "Denied" }), el("th", { text: "Dry-run would deny" }), el("th", { text: "Findings" })));
  for (const p of policies) {
    const d = p.decisions || {};
    t.append(el("tr", { "data-policy": `${p.namespace}/${p.name}` }, el("td", { text: `${p.kind} ${p.namespace}/${p.name}${p.dry_run ? " (dry run)" : ""}` }), el("td", { text: p.action }), el("td", { text: p.selects }), el("td", { class: p.enforced ? "" : "bad", text: p.enforced ? "yes" : "NO" }),
      el("td", { class: "allowed", text: d.allow || 0 }), el("td", { class: "denied-count", text: d.deny || 0 }), el("td", { text: d.dry_run_deny || 0 }), el("td", { class: "warn", text: p.findings.join("; ") })));
  }
  view().replaceChildren(el("section", {}, el("h2", { text: "Policies" }), t));
  status(`updated ${new Date().toLocaleTimeString()}`);
}

async function showWaypoints() {
  const { waypoints } = await api("/api/waypoints");
  const t = el("table", { id: "waypoints" }, el("tr", {}, el("th", { text: "Waypoint" }), el("th", { text: "Services" }), el("th", { text: "Routes (backends)" }), el("th", { text: "Replicas reporting" })));
  for (const w of waypoints) t.append(el("tr", {}, el("td", { text: w.name }), el("td", { text: w.services.join(", ") || "–" }),
    el("td", { text: w.routes.map(r => `${r.name}: ${r.backends.join(", ")}`).join("; ") || "–" }), el("td", { text: w.reporting })));
  view().replaceChildren(el("section", {}, el("h2", { text: "Waypoints" }), t));
  status(`updated ${new Date().toLocaleTimeString()}`);
}

async function showSearch(q) {
  const { results } = await api(`/api/search?q=${encodeURIComponent(q)}`);
  const ul = el("ul", { id: "results" });
  for (const r of results) {
    const [ns, name] = r.name.split("/");
    const href = r.kind === "workload" ? `#/workload/${ns}/${name}` : r.kind === "policy" ? "#/policies" : r.kind === "waypoint" ? "#/waypoints" : "#/graph";
    ul.append(el("li", {}, el("a", { href, text: `${r.kind} ${r.name}` })));
  }
  view().replaceChildren(el("section", {}, el("h2", { text: `Search: ${q}` }), results.length ? ul : el("p", { text: "Nothing found." })));
}

async function route() {
  clearInterval(timer);
  const hash = decodeURIComponent(location.hash.replace(/^#\/?/, ""));
  const [page, ...rest] = hash.split("/");
  const draw = {
    "": showGraph, graph: showGraph, policies: showPolicies, waypoints: showWaypoints,
    workload: () => showWorkload(rest[0], rest[1]),
    search: () => showSearch(rest.join("/")),
  }[page] || showGraph;
  const run = () => draw().catch(e => { status(`error: ${e.message}`); });
  await run();
  if (page !== "search") timer = setInterval(run, 3000);
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", () => {
  document.getElementById("search").addEventListener("submit", ev => {
    ev.preventDefault();
    location.hash = `#/search/${encodeURIComponent(document.getElementById("q").value)}`;
  });
  route();
});
