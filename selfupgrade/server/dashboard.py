"""The dashboard hbs serves at ``/``: one page, no build step, refreshed every second.

It shows the fleet by version and by state, each rollout's waves with their progress and
counts by state, the failures with their reasons, and why a rollout halted. It only reads
``/selfupgrade/v1/status``, ``/selfupgrade/v1/rollouts`` and ``/selfupgrade/v1/rollouts/{id}``.
"""

from __future__ import annotations

__all__ = ["DASHBOARD_HTML"]

DASHBOARD_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>hbs - selfupgrade</title>
<style>
  :root { --ok: #2e7d32; --bad: #c62828; --warn: #ef6c00; --run: #1565c0; --mute: #757575; }
  body { font: 14px/1.4 system-ui, sans-serif; margin: 0; background: #f5f6f8; color: #222; }
  header { background: #263238; color: #fff; padding: 10px 20px; display: flex;
           justify-content: space-between; align-items: baseline; }
  header h1 { font-size: 18px; margin: 0; }
  main { display: grid; grid-template-columns: 400px 1fr; gap: 16px; padding: 16px 20px; }
  section { background: #fff; border-radius: 6px; padding: 12px 16px;
            box-shadow: 0 1px 2px rgba(0,0,0,.08); }
  h2 { font-size: 15px; margin: 0 0 8px; }
  table { border-collapse: collapse; width: 100%; }
  td, th { text-align: left; padding: 3px 6px; border-bottom: 1px solid #eee; }
  .bar { background: #e0e0e0; border-radius: 3px; height: 14px; position: relative;
         overflow: hidden; min-width: 120px; }
  .bar > span { position: absolute; top: 0; bottom: 0; left: 0; }
  .done { background: var(--ok); } .fail { background: var(--bad); }
  .status { font-weight: 600; text-transform: uppercase; font-size: 12px; padding: 2px 6px;
            border-radius: 3px; color: #fff; }
  .st-active { background: var(--run); } .st-complete { background: var(--ok); }
  .st-halted, .st-aborted { background: var(--bad); } .st-paused { background: var(--warn); }
  .st-cancelled { background: var(--mute); }
  .halt { color: var(--bad); font-weight: 600; margin: 6px 0; }
  .wave { margin: 8px 0 12px; } .wave h3 { font-size: 14px; margin: 0 0 4px; }
  .counts span { display: inline-block; margin-right: 10px; color: #444; }
  .muted { color: var(--mute); }
</style>
</head>
<body>
<header><h1>hbs &middot; selfupgrade</h1><span id="updated" class="muted"></span></header>
<main>
  <div>
    <section id="fleet"><h2>Fleet by version</h2><div id="versions">loading...</div></section>
    <section style="margin-top:16px"><h2>Fleet by state</h2><div id="states"></div></section>
    <section style="margin-top:16px"><h2>Rollouts</h2><div id="rollouts"></div></section>
  </div>
  <div>
    <section id="rollout"><h2 id="rollout-title">No rollout yet</h2>
      <div id="rollout-summary"></div><div id="waves"></div></section>
    <section style="margin-top:16px"><h2>Failures</h2><div id="failures">none</div></section>
  </div>
</main>
<script>
"use strict";
const STATES = ["pending", "downloading", "installing", "restarting", "confirmed", "failed",
                "rolled back", "lost"];
let selected = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}
function bar(done, failed, total) {
  const b = el("div", {class: "bar"});
  const pd = total ? 100 * done / total : 0, pf = total ? 100 * failed / total : 0;
  b.append(el("span", {class: "done", style: `width:${pd}%`}));
  b.append(el("span", {class: "fail", style: `left:${pd}%;width:${pf}%`}));
  return b;
}
function table(rows, head) {
  const t = el("table");
  if (head) t.append(el("tr", {}, ...head.map(h => el("th", {}, h))));
  for (const r of rows) t.append(el("tr", {}, ...r.map(c => el("td", {}, c))));
  return t;
}
function duration(s) {
  if (s === null || s === undefined) return "unknown";
  s = Math.round(s);
  return s >= 3600 ? `${Math.floor(s/3600)}h${Math.floor(s%3600/60)}m`
       : s >= 60 ? `${Math.floor(s/60)}m${s%60}s` : `${s}s`;
}
async function get(path) {
  const r = await fetch(path, {cache: "no-store"});
  if (!r.ok) throw new Error(path + " answered " + r.status);
  return r.json();
}
function renderFleet(status) {
  const total = status.hosts || 0;
  const rows = Object.entries(status.versions).sort().map(([v, n]) =>
    [v, String(n), bar(n, 0, total)]);
  document.getElementById("versions").replaceChildren(
    rows.length ? table(rows, ["version", "hosts", ""]) : "no heartbeats yet");
  document.getElementById("states").replaceChildren(
    table(Object.entries(status.states).sort().map(([s, n]) => [s, String(n)])));
}
function renderRollouts(list) {
  const rows = list.map(r => {
    const a = el("a", {href: "#", "data-id": r.id}, r.id);
    a.onclick = (e) => { e.preventDefault(); selected = r.id; refresh(); };
    return [a, r.version, el("span", {class: `status st-${r.status}`}, r.status),
            `${Math.min(r.wave + 1, r.waves)}/${r.waves}`];
  });
  document.getElementById("rollouts").replaceChildren(
    rows.length ? table(rows, ["id", "version", "status", "wave"]) : "none");
}
function renderRollout(d) {
  const t = d.task;
  document.getElementById("rollout-title").replaceChildren(
    `${t.kind === "rollback" ? "Rollback" : "Rollout"} ${t.id} \u2192 ${t.order.version} `,
    el("span", {class: `status st-${d.status}`, id: "rollout-status"}, d.status));
  const summary = [el("div", {}, `${d.done} of ${d.members} hosts confirmed, ${d.failed} given up,
    ${d.failures} failed attempt(s) (${d.silent} silent after the order),
    ${d.in_flight} in flight. ETA: ${duration(d.eta_s)}.
    Window ${d.window_open ? "open" : "closed"}.`)];
  if (d.halt_reason) summary.push(el("div", {class: "halt", id: "halt-reason"}, d.halt_reason));
  document.getElementById("rollout-summary").replaceChildren(...summary);
  const waves = d.waves.map(w => {
    const counts = el("div", {class: "counts"},
      ...STATES.map(s => el("span", {"data-state": s}, `${s}: ${w.states[s] || 0}`)));
    const bake = w.bake_left_s !== null ? ` \u00b7 baking, ${duration(w.bake_left_s)} left` : "";
    return el("div", {class: "wave", "data-wave": w.index, "data-phase": w.phase},
      el("h3", {}, `Wave ${w.index + 1}: ${w.name} \u00b7 ${w.phase}${bake} \u00b7 `
        + `${w.done}/${w.members} confirmed \u00b7 max ${w.max_in_flight} at once \u00b7 `
        + `${w.failures}/${w.budget} failures allowed`),
      bar(w.done, w.failed, w.members), counts);
  });
  document.getElementById("waves").replaceChildren(...waves);
  const f = d.failures_list.map(x => [x.host, `wave ${x.wave + 1}`, String(x.attempts),
                                      x.gave_up ? "gave up" : "will retry", x.reason]);
  document.getElementById("failures").replaceChildren(
    f.length ? table(f, ["host", "wave", "attempts", "", "reason"]) : "none");
}
async function refresh() {
  try {
    const [status, list] = await Promise.all([get("/selfupgrade/v1/status"),
                                              get("/selfupgrade/v1/rollouts")]);
    renderFleet(status);
    renderRollouts(list.rollouts);
    const id = selected || (list.rollouts[0] && list.rollouts[0].id);
    if (id) renderRollout(await get(`/selfupgrade/v1/rollouts/${encodeURIComponent(id)}`));
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    document.getElementById("updated").textContent = "error: " + e.message;
  }
}
refresh();
setInterval(refresh, 1000);
</script>
</body>
</html>
"""
