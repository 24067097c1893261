// loadcast control room: renders the views that /ui/events pushes (each one complete).
// No build step; uPlot (vendored) draws the charts. Text from Kafka is set with
// textContent only, never as HTML.
"use strict";
(() => {
  const $ = (sel) => document.querySelector(sel);
  const params = new URLSearchParams(location.search);
  let focus = params.get("endpoint") || "";
  const horizon = params.get("horizon") || "";
  let view = null;          // the last view received
  let offset = 0;           // server clock - browser clock, ms
  let source = null;
  let live = false;
  let lastMessage = 0;      // browser time of the last view or heartbeat
  let lostAt = null;        // browser time the connection was lost
  const plots = new Map();  // endpoint -> {u, box}
  const WATCHDOG_MS = 25000;  // no heartbeat for this long: reconnect

  // ---- formatting: numbers always with units, times in the viewer's zone
  const num = (v) => {
    if (v == null) return "—";  // a NaN or infinity on the wire arrives as null
    const a = Math.abs(v);
    return a >= 100 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : v.toFixed(2);
  };
  const rps = (v) => (v == null ? "—" : `${num(v)} req/s`);
  const time = (ms) => (ms == null ? "—" : new Date(ms).toLocaleTimeString([], {
    hour: "2-digit", minute: "2-digit", second: "2-digit" }));
  const dur = (s) => (s == null ? "—" : s < 1 ? "now" : s < 120 ? `${s.toFixed(0)} s`
    : s < 7200 ? `${(s / 60).toFixed(1)} min` : `${(s / 3600).toFixed(1)} h`);
  const pct = (v) => (v == null ? "—" : `${(v * 100).toFixed(1)} %`);
  const serverNow = () => Date.now() + offset;

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v != null) e.setAttribute(k, String(v));
    }
    for (const c of children) {
      if (c != null) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }
  const sub = (text) => el("span", { class: "sub" }, text);
  // the value sits in one span, so that on a phone it stays right of its column's name
  const cell = (label, attrs, ...children) =>
    el("td", { "data-label": label, ...attrs }, el("span", { class: "v" }, ...children));

  // ---- connection
  function connect() {
    const q = new URLSearchParams();
    if (focus) q.set("endpoint", focus);
    if (horizon) q.set("horizon", horizon);
    source = new EventSource(`/ui/events?${q}`);
    source.addEventListener("view", (e) => {
      lastMessage = Date.now();
      setLive(true);
      render(JSON.parse(e.data));
    });
    source.addEventListener("beat", () => { lastMessage = Date.now(); setLive(true); });
    source.onerror = () => {
      setLive(false);
      // EventSource retries by itself after a network error, not after an error answer
      if (source.readyState === EventSource.CLOSED) setTimeout(reconnect, 2000);
    };
  }
  function reconnect() {
    if (source) source.close();
    connect();
  }
  function setLive(on) {
    if (on === live) return;
    live = on;
    lostAt = on ? null : Date.now();
    const pill = $("#conn");
    pill.dataset.state = on ? "live" : "reconnecting";
    pill.textContent = on ? "live" : "reconnecting…";
    document.body.classList.toggle("disconnected", !on);
    renderBanners();
  }

  // ---- rendering
  function render(v) {
    view = v;
    offset = v.now - Date.now();
    $("#updated").textContent = time(v.updated_at);
    $("#updated").setAttribute("datetime", v.updated_at ? new Date(v.updated_at).toISOString() : "");
    $("#totals").textContent = `${v.endpoints_total} endpoint(s), ${v.mirrors.length} mirror(s)`;
    $("#notes").textContent = v.notes.join(" ");
    renderBanners();
    renderOverview();
    renderCharts();
    renderMirrors();
  }

  function renderBanners() {
    const box = $("#banners");
    box.replaceChildren();
    if (!live) {
      const since = view ? ` The figures below are as of ${time(view.now)} and are not live.` : "";
      box.append(el("div", { class: "banner-disconnected", "data-kind": "disconnected" },
        `✖ API unreachable: live connection lost at ${time(lostAt)}, reconnecting.${since}`));
    }
    if (!view) return;
    const kinds = new Set(view.banners.map((b) => b.kind));
    for (const b of view.banners) {
      const icon = b.kind === "feed" ? "✖" : "⚠";
      box.append(el("div", { class: `banner-${b.kind}`, "data-kind": b.kind }, `${icon} ${b.text}`));
    }
    // while the API is unreachable, scores run out on the browser's clock
    const stale = view.overview.filter((r) => serverNow() > r.valid_until);
    if (!kinds.has("stale") && stale.length) {
      box.append(el("div", { class: "banner-stale", "data-kind": "stale" },
        `⚠ Stale scores: ${stale.length} of ${view.endpoints_total} endpoint(s) past ` +
        `valid_until (${stale.slice(0, 10).map((r) => r.endpoint_id).join(", ")})`));
    }
  }

  function runsOut(r) {
    const left = (s) => (s == null ? null : Math.max(0, (view.now + s * 1000 - serverNow()) / 1000));
    const mean = left(r.exhaustion_s);
    const band = left(r.band_exhaustion_s);
    if (mean == null) {
      return ["not within forecast", sub(band == null ? "band: not either"
        : band < 1 ? "band: now" : `band: in ${dur(band)}`)];
    }
    return [mean < 1 ? "now" : `in ${dur(mean)}`, sub(`at ${time(serverNow() + mean * 1000)}`)];
  }

  function renderOverview() {
    const body = $("#overview tbody");
    const h = view.overview.find((r) => r.forecast)?.forecast;
    $("#forecast-head").textContent = h ? `Forecast +${h.ahead_s} s (h=${h.horizon})` : "Forecast";
    body.replaceChildren(...view.overview.map((r) => {
      const stale = serverNow() > r.valid_until;
      const f = r.forecast;
      const flags = [];
      if (stale) flags.push(el("span", { class: "flag flag-stale" }, "◌ stale"));
      if (r.anomalous) flags.push(el("span", { class: "flag flag-anomaly" }, "▲ anomaly"));
      if (r.current_rps > r.capacity_rps) flags.push(el("span", { class: "flag flag-over" }, "✖ over capacity"));
      if (!flags.length) flags.push("ok");
      const tr = el("tr", { "data-endpoint": r.endpoint_id, class: stale ? "stale" : null,
        title: r.reasons.join("; ") || null },
        cell("Endpoint", {}, el("b", {}, r.endpoint_id), sub(`${r.api} · ${r.region}`)),
        cell("Runs out", { "data-field": "exhaustion" }, ...runsOut(r)),
        cell("Current", { class: "num", "data-field": "current_rps", "data-value": r.current_rps }, rps(r.current_rps)),
        cell("Forecast", { class: "num", "data-field": "forecast", "data-value": f ? f.mean : null },
          f ? rps(f.mean) : "—",
          f ? sub(`90 %: ${num(f.lower)}–${num(f.upper)} req/s, at ${time(f.at)}`) : null),
        cell("Capacity", { class: "num", "data-field": "capacity_rps", "data-value": r.capacity_rps },
          rps(r.capacity_rps), sub(r.capacity_source.toLowerCase())),
        cell("Predicted utilisation", { class: "num", "data-field": "utilization" }, pct(r.utilization)),
        cell("Score", { class: "num", "data-field": "score", "data-value": r.score }, r.score == null ? "—" : r.score.toFixed(2)),
        cell("p99 / errors", { class: "num" }, `${num(r.latency_p99_ms)} ms`, sub(`${pct(r.error_rate)} errors`)),
        cell("Flags", { "data-field": "flags" }, ...flags));
      tr.addEventListener("click", () => chartEndpoint(r.endpoint_id));
      return tr;
    }));
  }

  function chartEndpoint(endpoint) {
    focus = endpoint;
    const q = new URLSearchParams(location.search);
    q.set("endpoint", endpoint);
    history.replaceState(null, "", `?${q}`);
    reconnect();
  }

  function plotOptions(endpoint, c, width) {
    const h = c.horizon;
    const val = (u, v) => (v == null ? "—" : rps(v));
    return {
      width, height: 220,
      legend: { live: false },  // names only: a compact legend that fits a phone
      scales: { x: { time: true } },
      axes: [{}, { label: "req/s", size: 56 }],
      series: [
        {},
        { label: "actual", stroke: "#1f5fbf", width: 2, value: val },
        { label: `forecast made ${h} step(s) before`, stroke: "#7a4fbf", dash: [6, 4], width: 1.5, spanGaps: true, value: val },
        { label: "90 % band, low", stroke: "rgba(122,79,191,0.35)", width: 0.5, spanGaps: true, value: val },
        { label: "high", stroke: "rgba(122,79,191,0.35)", width: 0.5, spanGaps: true, value: val },
        { label: "capacity", stroke: "#c0262d", dash: [2, 3], width: 2, value: val },
        { label: "latest forecast", stroke: "#444", dash: [1, 3], width: 1.5, spanGaps: true, value: val },
        { label: "anomaly", stroke: "#c0262d", fill: "#c0262d", width: 0, paths: () => null,
          points: { show: true, size: 9, fill: "#c0262d" }, value: val },
      ],
      bands: [{ series: [4, 3], fill: "rgba(122,79,191,0.15)" }],
    };
  }

  function chartData(c) {
    return [c.t.map((t) => t / 1000), c.actual, c.forecast, c.lower, c.upper, c.capacity,
      c.latest, c.anomalies];
  }

  function renderCharts() {
    const box = $("#charts");
    const wanted = view.charted.filter((e) => view.charts[e]);
    const have = [...plots.keys()];
    if (wanted.join("\n") !== have.join("\n")) {
      for (const p of plots.values()) p.u.destroy();
      plots.clear();
      box.replaceChildren();
      for (const endpoint of wanted) {
        const c = view.charts[endpoint];
        const box1 = el("div", { class: "chart", "data-endpoint": endpoint },
          el("h3", {}, endpoint));
        box.append(box1);
        const width = Math.max(260, box1.clientWidth - 12);
        plots.set(endpoint, { box: box1, u: new uPlot(plotOptions(endpoint, c, width), chartData(c), box1) });
      }
    }
    for (const endpoint of wanted) {
      const c = view.charts[endpoint];
      const p = plots.get(endpoint);
      p.u.setData(chartData(c));
      const last = c.actual.filter((v) => v != null).length;
      p.box.dataset.points = String(last);
      p.box.dataset.lastT = String(c.t[last - 1] ?? "");
    }
    const any = wanted.length ? view.charts[wanted[0]] : null;
    $("#chart-h").textContent = any ? String(any.horizon) : "h";
  }

  const ACTIVITY = { activating: "◔ activating", ready: "● ready", retiring: "◑ retiring",
    retired: "○ retired", failed: "✖ failed", rejected: "✖ rejected" };

  function lead(m) {
    if (m.crossed_at == null) return "demand not over capacity yet";
    if (m.ready_at == null) return "not ready";
    return m.lead_s >= 0 ? `ready ${dur(m.lead_s)} before` : `ready ${dur(-m.lead_s)} late`;
  }

  function renderMirrors() {
    const body = $("#mirrors tbody");
    if (!view.mirrors.length) {
      body.replaceChildren(el("tr", {}, el("td", { colspan: 9 }, "no mirror commanded")));
      return;
    }
    body.replaceChildren(...view.mirrors.map((m) => el("tr",
      { "data-region": m.region, "data-api": m.api, "data-state": m.state },
      cell("Region", {}, m.region), cell("API", {}, m.api),
      cell("State", { "data-field": "state" }, ACTIVITY[m.activity] || m.activity, sub(m.state)),
      cell("Commanded", {}, time(m.commanded_at)), cell("Ready", {}, time(m.ready_at)),
      cell("Demand crossed capacity", {}, time(m.crossed_at)), cell("Lead time", {}, lead(m)),
      cell("Instance", {}, m.instance_url || "—",
        m.capacity_rps != null ? sub(rps(m.capacity_rps)) : null),
      cell("Reason", {}, m.reason || "—"))));
  }

  // ---- timers: countdowns and staleness move with the clock; a silent stream is dead
  setInterval(() => {
    if (live && Date.now() - lastMessage > WATCHDOG_MS) { setLive(false); reconnect(); }
    if (view) { renderBanners(); renderOverview(); }
  }, 1000);
  window.addEventListener("resize", () => {
    for (const p of plots.values()) p.u.setSize({ width: Math.max(260, p.box.clientWidth - 12), height: 220 });
  });
  $("#zone").textContent = Intl.DateTimeFormat().resolvedOptions().timeZone;
  connect();
})();
