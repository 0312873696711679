// The Hydra node console: reads /console/stream (Server-Sent Events) and draws the
// facts, tables and plots of the last hour. No library: plain DOM and SVG.
// Every value from the node is put on the page with textContent, never as HTML.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const MAX_EVENTS = 300;
  const $ = (id) => document.getElementById(id);
  let history = [];
  let events = [];
  let span = 3600;
  let lastSnapshot = null;

  function el(name, attrs, parent, text) {
    const e = name.startsWith("svg:")
      ? document.createElementNS(SVG, name.slice(4))
      : document.createElement(name);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (parent) parent.appendChild(e);
    return e;
  }

  function setText(id, value) {
    const e = $(id);
    const s = value === null || value === undefined ? "–" : String(value);
    if (e.textContent !== s) e.textContent = s;
  }

  function short(pid) {
    return pid ? "…" + pid.slice(-8) : "";
  }

  function human(n, unit) {
    if (n === null || n === undefined) return "–";
    const units = ["", "k", "M", "G", "T"];
    let i = 0;
    while (Math.abs(n) >= 1000 && i < units.length - 1) {
      n /= 1000;
      i += 1;
    }
    const s = i === 0 ? (Math.round(n * 10) / 10).toString() : n.toFixed(1);
    return s + (units[i] || "") + (unit || "");
  }

  function duration(s) {
    if (s === null || s === undefined) return "–";
    s = Math.max(0, Math.round(s));
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    const h = Math.floor(s / 3600);
    return h + " h " + Math.floor((s % 3600) / 60) + " min";
  }

  function clock(t) {
    const d = new Date(t * 1000);
    return d.toLocaleTimeString([], { hour12: false });
  }

  function fillTable(id, items, cells) {
    const tbody = $(id).tBodies[0];
    const rows = items.map((item) => {
      const tr = el("tr");
      for (const [value, cls, title] of cells(item)) {
        const td = el("td", cls ? { class: cls } : {}, tr, value);
        if (title) td.title = title;
      }
      return tr;
    });
    tbody.replaceChildren(...rows);
  }

  // ------------------------------------------------------------------ plots
  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
    return 10 * p;
  }

  // series: [{name, values: [[t, v|null]...], cls, step}]; marks: [{t, cls, title}]
  function plot(svg, now, series, marks, opts) {
    const W = 600, H = 170, L = 46, R = 10, T = 18, B = 20;
    // the last hour; while the node has run less than that, its whole life (5 min at least)
    const first = points.length ? points[0].t : now;
    const win = Math.min(span, Math.max(300, now - first));
    const t0 = now - win;
    const x = (t) => L + ((t - t0) / win) * (W - L - R);
    let top = 0;
    for (const s of series) for (const [, v] of s.values) if (v !== null && v > top) top = v;
    top = niceMax(Math.max(top, (opts && opts.min) || 1));
    const y = (v) => T + (1 - v / top) * (H - T - B);
    const g = [];
    for (const f of [0, 0.5, 1]) {
      const v = top * f;
      g.push(el("svg:line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "axis" }));
      const label = opts && opts.unit ? human(v, opts.unit) : human(v);
      g.push(el("svg:text", { x: L - 4, y: y(v) + 3, "text-anchor": "end", class: "tick" }, null, label));
    }
    for (const f of [1, 0.75, 0.5, 0.25, 0]) {
      const ago = win * f;
      const label = f === 0 ? "now" : "-" + (ago >= 120 ? Math.round(ago / 60) + " min" : Math.round(ago) + " s");
      g.push(el("svg:text", { x: x(now - ago), y: H - 5, "text-anchor": f === 1 ? "start" : "middle",
        class: "tick" }, null, label));
    }
    for (const m of marks || []) {
      if (m.t < t0) continue;
      const line = el("svg:line", { x1: x(m.t), x2: x(m.t), y1: T, y2: H - B, class: m.cls });
      el("svg:title", {}, line, m.title);
      g.push(line);
    }
    series.forEach((s, i) => {
      let d = "";
      let pen = false;
      let prevY = null;
      for (const [t, v] of s.values) {
        if (t < t0 || v === null || v === undefined) {
          pen = false;
          continue;
        }
        const px = x(t).toFixed(1), py = y(v).toFixed(1);
        if (!pen) d += "M" + px + " " + py;
        else if (s.step) d += "H" + px + "V" + py;
        else d += "L" + px + " " + py;
        pen = true;
        prevY = py;
      }
      if (s.step && pen && prevY !== null) d += "H" + x(now).toFixed(1);
      if (d) {
        const path = el("svg:path", { d: d, class: (s.cls || "series s" + i) });
        el("svg:title", {}, path, s.name);
        g.push(path);
      }
      g.push(el("svg:text", { x: W - R - 4 - (series.length - 1 - i) * 92, y: 11,
        "text-anchor": "end", class: "legend " + (s.cls === "target" ? "ltarget" : "l" + i) }, null,
        "■ " + s.name));
    });
    svg.replaceChildren(...g);
  }

  // the history, and the node's present values as its last point
  let points = [];

  function col(key, sub) {
    return points.map((p) => [p.t, sub ? (p.rates ? p.rates[key] : null) : p[key]]);
  }

  function present(s) {
    const pool = s.pool || {};
    return {
      t: s.now, records: s.counts.records, members: s.counts.members, peers: s.counts.peers,
      exits_live: pool.live, exits_target: pool.target, standby: pool.standby,
      rates: { gossip: s.traffic.gossip, sync: s.traffic.sync, relay: s.traffic.relay },
    };
  }

  function drawPlots(s) {
    const now = s.now;
    points = history.concat([present(s)]);
    plot($("plot-records"), now, [
      { name: "records", values: col("records") },
      { name: "members", values: col("members") },
    ]);
    plot($("plot-peers"), now, [{ name: "peers", values: col("peers"), step: true }]);
    plot($("plot-traffic"), now, [
      { name: "gossip", values: col("gossip", true) },
      { name: "sync", values: col("sync", true) },
      { name: "relay", values: col("relay", true) },
    ], [], { unit: "B" });
    const marks = [];
    for (const e of events) {
      if (e.kind === "dead" && e.role === "exit") {
        marks.push({ t: e.at, cls: "m-dead", title: clock(e.at) + " " + e.text });
      } else if (e.kind === "promote" || e.kind === "promoted") {
        marks.push({ t: e.at, cls: "m-promote", title: clock(e.at) + " " + e.text });
      }
    }
    plot($("plot-exits"), now, [
      { name: "live exits", values: col("exits_live"), step: true },
      { name: "standbys", values: col("standby"), step: true },
      { name: "target", values: col("exits_target"), step: true, cls: "target" },
    ], marks, { min: 3 });
  }

  // ------------------------------------------------------------------ facts
  function render(s) {
    const pool = s.pool || {};
    setText("peer-id", s.peer_id);
    setText("peers-count", s.counts.peers);
    setText("members-count", s.counts.members);
    setText("records-count", s.counts.records);
    setText("exits-live", pool.live);
    setText("exits-target", pool.target);
    setText("relay-pps", human(s.relay.packets_in_per_s));
    setText("relay-bps", human(s.relay.bytes_out_per_s, "B"));
    const q = s.delivery_queue;
    setText("queue", q ? q.pending + " pending" : "not an exit");
    setText("uptime", duration(s.uptime));
    setText("roles", s.roles.join(", "));
    const addrs = $("addresses");
    addrs.replaceChildren(...s.addresses.map((a) => el("li", {}, null, a)));
    fillTable("feeds", s.feeds, (f) => [
      [f.addr, "mono addr", f.addr],
      [f.network, "addr", f.network],
      [f.state, "st-" + f.state],
      [f.conns],
      [f.bytes_in === null ? "–" : human(f.bytes_in, "B")],
      [f.bytes_out === null ? "–" : human(f.bytes_out, "B")],
    ]);
    $("feeds").dataset.states = s.feeds.map((f) => f.state).join(" ");
    const members = pool.members || [];
    setText("pool-summary", pool.target === undefined ? "" :
      `live ${pool.live} · suspect ${pool.suspect} · dead ${pool.dead} · standby ${pool.standby} · target ${pool.target}`);
    fillTable("pool", members, (m) => [
      [short(m.peer_id), "mono", m.peer_id],
      [m.promoted ? "exit (promoted)" : m.role],
      [m.state, "st-" + m.state],
      [clock(m.since)],
    ]);
    const poolRows = $("pool").tBodies[0].rows;
    members.forEach((m, i) => {
      poolRows[i].dataset.peer = m.peer_id;
      poolRows[i].dataset.state = m.state;
    });
    fillTable("peers", s.peers, (p) => [
      [short(p.peer_id), "mono", p.peer_id],
      [p.roles.join(", ")],
      [duration(p.connected_for)],
    ]);
    drawPlots(s);
  }

  function renderEvents() {
    const list = $("events");
    const items = events.slice().reverse().map((e) => {
      const li = el("li", { "data-kind": e.kind, "data-seq": e.seq });
      if (e.peer) li.dataset.peer = e.peer;
      if (e.role) li.dataset.role = e.role;
      el("time", { datetime: new Date(e.at * 1000).toISOString() }, li, clock(e.at));
      el("span", { class: "k k-" + e.kind }, li, e.kind);
      el("span", {}, li, e.text);
      return li;
    });
    list.replaceChildren(...items);
  }

  function receive(msg) {
    const s = JSON.parse(msg.data);
    if (s.history) {
      history = s.history;
      span = s.history_span || span;
      events = s.events;
    } else {
      for (const sample of s.samples || []) history.push(sample);
      for (const e of s.events) events.push(e);
    }
    const oldest = s.now - span;
    while (history.length && history[0].t < oldest) history.shift();
    if (events.length > MAX_EVENTS) events = events.slice(-MAX_EVENTS);
    lastSnapshot = s;
    render(s);
    if (s.history || s.events.length) renderEvents();
    const conn = $("conn");
    conn.textContent = "live · " + clock(s.now);
    conn.className = "conn live";
  }

  function start() {
    const source = new EventSource("/console/stream");
    source.onmessage = receive;
    source.onerror = () => {
      const conn = $("conn");
      conn.textContent = lastSnapshot ? "reconnecting…" : "cannot reach the node";
      conn.className = "conn lost";
    };
  }

  start();
})();
