// The live view: poll /console/live.json every 2 s and update the figures in place.
// The server computes rates and percentiles; this only shows them (and a sparkline).
"use strict";
(() => {
  const root = document.getElementById("live");
  if (!root) return;
  const url = root.dataset.url;
  const history = [];
  const dash = (v) => (v === null || v === undefined ? "—" : String(v));
  const setText = (id, value) => {
    const el = document.getElementById(id);
    if (el) el.textContent = value;
  };
  const cell = (row, text, cls) => {
    const td = row.insertCell();
    td.textContent = text;
    if (cls) td.className = cls;
    return td;
  };

  function upstreams(list) {
    const body = document.getElementById("upstreams");
    body.replaceChildren();
    for (const u of list) {
      const row = body.insertRow();
      cell(row, u.name);
      const badge = document.createElement("span");
      badge.className = "badge " + u.state;
      badge.textContent = u.state;
      cell(row, "").appendChild(badge);
      cell(row, u.outstanding, "n");
      cell(row, u.attempts, "n");
      cell(row, u.errors, "n");
      cell(row, u.consecutive_failures, "n");
      cell(row, u.models.join(", "));
      const code = document.createElement("code");
      code.textContent = u.url;
      cell(row, "").appendChild(code);
    }
  }

  function spark(rate) {
    history.push(rate || 0);
    if (history.length > 60) history.shift();
    const top = Math.max(1, ...history);
    const step = 640 / 59;
    const start = 640 - (history.length - 1) * step; // the newest at the right edge
    const points = history.map((v, i) => `${(start + i * step).toFixed(1)},${(76 - (v / top) * 72).toFixed(1)}`);
    document.querySelector("#spark polyline").setAttribute("points", points.join(" "));
  }

  async function poll() {
    try {
      const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
      if (response.status === 401) {
        window.location.assign("/console/login?next=%2Fconsole%2Flive");
        return;
      }
      const live = await response.json();
      for (const id of ["requests_per_s", "errors_per_s", "in_flight", "overhead_p50_ms",
        "overhead_p99_ms", "overhead_p50_ms_all", "overhead_p99_ms_all", "ledger_queue"]) {
        setText(id, dash(live[id]));
      }
      setText("requests_total", live.requests_total.toLocaleString("en-US"));
      setText("errors_total", live.errors_total.toLocaleString("en-US"));
      setText("credit_trusted", live.credit_trusted ? "trusted" : "NOT trusted");
      setText("replica", live.replica);
      setText("status", `As of ${live.time.slice(0, 19)} UTC.`);
      upstreams(live.upstreams);
      spark(live.requests_per_s);
    } catch (error) {
      setText("status", `Could not reach the gateway (${error.message}); retrying.`);
    }
  }

  poll();
  setInterval(poll, 2000);
})();
