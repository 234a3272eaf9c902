// Dashboard: fleet summary, sortable tables, per-node / per-slice SVG plots.
// No library: plain DOM and inline SVG, so the page works offline.
"use strict";
const NS = "http://www.w3.org/2000/svg";

async function getJSON(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(url + ": " + r.status);
  return r.json();
}

function fmt(v) {
  if (v === null || v === undefined) return "";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toFixed(2);
  return String(v);
}

function fillTable(id, rows, keys, onPick) {
  const table = document.getElementById(id);
  const tbody = table.querySelector("tbody");
  tbody.textContent = "";
  for (const r of rows) {
    const tr = document.createElement("tr");
    tr.className = "pick" + (r.up === 0 ? " down" : "");
    for (const k of keys) {
      const td = document.createElement("td");
      td.textContent = fmt(r[k]);
      tr.appendChild(td);
    }
    if (onPick) tr.addEventListener("click", () => onPick(r));
    tbody.appendChild(tr);
  }
  table._rows = rows; table._keys = keys; table._pick = onPick;
}

function sortTable(id, k, desc) {
  const table = document.getElementById(id);
  table._sortKey = k; table._desc = desc;
  const rows = table._rows.slice().sort((a, b) => {
    const x = a[k], y = b[k];
    if (x === y) return 0;
    if (x === null || x === undefined) return 1;
    if (y === null || y === undefined) return -1;
    return (x < y ? -1 : 1) * (desc ? -1 : 1);
  });
  fillTable(id, rows, table._keys, table._pick);
  table.dataset.sort = k + (desc ? ":desc" : ":asc");
}

function makeSortable(id) {
  // Click a header to sort (again: reverse). `?sort=TABLE:KEY[:desc]` in the page's
  // address opens it sorted, so a sorted view can be linked.
  const table = document.getElementById(id);
  table.querySelectorAll("th").forEach((th) => {
    th.addEventListener("click", () => {
      const k = th.dataset.k;
      sortTable(id, k, table._sortKey === k ? !table._desc : false);
    });
  });
}

function sortFromAddress() {
  for (const spec of new URLSearchParams(location.search).getAll("sort")) {
    const [id, k, dir] = spec.split(":");
    const table = document.getElementById(id);
    if (table && table.classList.contains("sortable") && table._keys && table._keys.includes(k))
      sortTable(id, k, dir === "desc");
  }
}

function plot(title, points) {
  // points: [[ts, value], ...] drawn as an SVG polyline with min/max labels.
  const W = 360, H = 140, P = 30;
  const div = document.createElement("div");
  div.className = "plot";
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H);
  svg.dataset.points = String(points.length);
  const t = document.createElementNS(NS, "text");
  t.setAttribute("x", 4); t.setAttribute("y", 12); t.textContent = title;
  svg.appendChild(t);
  if (points.length) {
    const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
    const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
    const sx = (x) => P + (x1 > x0 ? (x - x0) / (x1 - x0) : 0.5) * (W - 2 * P);
    const sy = (y) => H - P + 10 - (y1 > y0 ? (y - y0) / (y1 - y0) : 0.5) * (H - 2 * P);
    const line = document.createElementNS(NS, "polyline");
    line.setAttribute("fill", "none"); line.setAttribute("stroke", "#2255cc");
    line.setAttribute("stroke-width", "1.5");
    line.setAttribute("points", points.map((p) => sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1)).join(" "));
    svg.appendChild(line);
    for (const [y, v] of [[H - P + 14, y0], [P + 4, y1]]) {
      const l = document.createElementNS(NS, "text");
      l.setAttribute("x", 2); l.setAttribute("y", y); l.setAttribute("font-size", "10");
      l.textContent = fmt(v); svg.appendChild(l);
    }
  }
  div.appendChild(svg);
  return div;
}

async function showPlots(table, name, fields) {
  const where = encodeURIComponent('name=="' + name + '"');
  const rows = await getJSON("/query?table=" + table + "&select=" + fields.join(",") +
                             "&where=" + where + "&since=-6h&format=json");
  const box = document.getElementById("plots");
  box.textContent = "";
  document.getElementById("plot-title").textContent = "Plot: " + name;
  for (const f of fields) {
    const pts = rows.filter((r) => r[f] !== null && r[f] !== undefined).map((r) => [r.ts, r[f]]);
    box.appendChild(plot(name + " " + f, pts));
  }
  box.dataset.for = name;
}

async function refresh() {
  const [fleet, nodes, slices] = await Promise.all([
    getJSON("/api/fleet"), getJSON("/query?table=nodes&format=json"),
    getJSON("/query?table=slices&format=json")]);
  document.getElementById("nodes-up").textContent = fleet.nodes_up;
  document.getElementById("nodes-total").textContent = fleet.nodes_total;
  document.getElementById("load-avg").textContent = fmt(fleet.load_avg);
  document.getElementById("round").textContent = fleet.round;
  fillTable("top-cpu", fleet.top_cpu, ["name", "cpu_pct"]);
  fillTable("top-bw", fleet.top_bw, ["name", "tx_rate"]);
  fillTable("nodes", nodes, ["name", "site", "up", "load1", "cpu_pct", "mem_used", "tx_rate", "rx_rate", "liveslices"],
            (r) => showPlots("nodes", r.name, ["load1", "cpu_pct", "tx_rate"]));
  fillTable("slices", slices, ["name", "nodes", "cpu_pct", "mem_bytes", "procs", "tx_rate"],
            (r) => showPlots("slices", r.name, ["cpu_pct", "mem_bytes", "tx_rate"]));
  sortFromAddress();
  const box = document.getElementById("plots");
  if (!box.dataset.for) {
    const params = new URLSearchParams(location.search);
    if (params.get("node")) await showPlots("nodes", params.get("node"), ["load1", "cpu_pct", "tx_rate"]);
    else if (nodes.length) await showPlots("nodes", nodes[0].name, ["load1", "cpu_pct", "tx_rate"]);
    if (params.get("slice")) {
      const keep = Array.from(box.children);
      await showPlots("slices", params.get("slice"), ["cpu_pct", "mem_bytes", "tx_rate"]);
      keep.reverse().forEach((c) => box.insertBefore(c, box.firstChild));
    }
  }
  document.body.dataset.ready = "1";
}

makeSortable("nodes");
makeSortable("slices");
refresh().catch((e) => { document.body.dataset.error = String(e); });
setInterval(() => refresh().catch(() => {}), 30000);
