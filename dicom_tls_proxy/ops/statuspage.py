"""The status document (`status`) shown to a person: one self-contained HTML page, and plain text
for a terminal (`dicom-tls-proxy status`).

Why its own module: what the page looks like changes for other reasons than what it says. The page
is a shell with the document embedded as JSON and a few lines of script that draw the tables from
it, then fetch /status.json every REFRESH seconds and draw them again (no full reload, the filter
and the scroll position stay). Drawing happens in one place, the script, and only through
`textContent`: AE titles and certificate subjects come from the network and are never markup.

What it must never do: load anything from outside the proxy (no CDN, no web font, no image: hospital
networks have no internet; the Content-Security-Policy `CSP` allows the page's own script and style
only, by hash); put a value into markup unescaped (the embedded JSON has `<`, `>` and `&` written
as \\u escapes, so no value can end the script element); write a control character to a terminal.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

REFRESH = 5  # seconds between two fetches of /status.json

STYLE = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2430;
background:#f4f6f9}
header{background:#1d2b3f;color:#fff;padding:10px 18px;display:flex;flex-wrap:wrap;gap:18px;
align-items:baseline}
header h1{font-size:18px;margin:0}
main{padding:8px 18px 30px}
section{background:#fff;border:1px solid #d8dee8;border-radius:6px;margin:12px 0;padding:6px 12px}
h2{font-size:15px;margin:6px 0}
.counts{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0}
.count{background:#fff;border:1px solid #d8dee8;border-radius:6px;padding:6px 14px;min-width:110px}
.count b{display:block;font-size:22px}
.scroll{max-height:60vh;overflow:auto}
table{border-collapse:collapse;width:100%;font-size:13px}
th{position:sticky;top:0;background:#e9edf3;text-align:left;white-space:nowrap}
th,td{padding:3px 8px;border-bottom:1px solid #e6e9ef;vertical-align:top}
td.num{text-align:right;white-space:nowrap}
.mono,.sha{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:12px}
.mono{white-space:nowrap}.sha{word-break:break-all;min-width:16em}
.ok{color:#17683a}.bad{color:#b3261e;font-weight:600}.muted{color:#6b7686}
header .ok,header .bad{padding:1px 8px;border-radius:4px;background:#fff}
.warn{background:#fff1c2}.alarm{background:#ffd4d0;font-weight:600}
input{font:inherit;padding:2px 6px;margin:4px 0}
#state.alarm{color:#b3261e;background:none}
"""

SCRIPT = """
"use strict";
const $ = (id) => document.getElementById(id);
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function size(n) {
  if (typeof n !== "number") return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}
function span(s) {
  if (typeof s !== "number") return "";
  s = Math.floor(s);
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600);
  const m = Math.floor(s % 3600 / 60);
  return d ? d + "d " + h + "h" : h ? h + "h " + m + "m" : m ? m + "m " + s % 60 + "s" : s + "s";
}
function expiry(days) {
  if (typeof days !== "number") return ["?", ""];
  return [days.toFixed(1), days < 7 ? "alarm" : days < 30 ? "warn" : ""];
}
function list(a) { return Array.isArray(a) && a.length ? a.join(", ") : ""; }
function allow(a) {
  if (!a) return "";
  const parts = [];
  if (a.calling_ae && a.calling_ae.length) parts.push("calling AE " + list(a.calling_ae));
  if (a.peer && a.peer.length) parts.push("peer " + list(a.peer));
  if (a.source && a.source.length) parts.push("source " + list(a.source));
  return parts.length ? parts.join("; ") : "anyone";
}
function health(h) {
  if (!h) return ["not checked", "muted"];
  if (h.ok === null || h.ok === undefined) return ["not checked yet", "muted"];
  const rtt = typeof h.rtt_ms === "number" ? " " + h.rtt_ms.toFixed(1) + " ms" : "";
  return h.ok ? ["up" + rtt, "ok"] : ["DOWN: " + (h.cause || ""), "bad"];
}
// rows: objects; cols: [title, value(row) -> text | [text, class], class of the cell]
function fill(id, rows, cols, filter) {
  const table = $(id);
  const head = el("tr");
  for (const c of cols) head.appendChild(el("th", c[0]));
  const thead = el("thead"); thead.appendChild(head);
  const body = el("tbody");
  for (const row of rows || []) {
    const tr = el("tr");
    for (const c of cols) {
      let v = c[1](row), cls = c[2] || "";
      if (Array.isArray(v)) { cls = (cls + " " + v[1]).trim(); v = v[0]; }
      tr.appendChild(el("td", v, cls));
    }
    if (filter && !tr.textContent.toLowerCase().includes(filter)) tr.hidden = true;
    body.appendChild(tr);
  }
  table.replaceChildren(thead, body);
}
let current = null;
function render(d) {
  current = d;
  const p = d.proxy || {};
  $("version").textContent = "version " + (p.version || "?");
  $("uptime").textContent = "up " + span(p.uptime_s);
  $("config").textContent = (p.config || "") + " (loaded " + (p.config_loaded || "?") + ")";
  $("workers").textContent = "workers " + (p.workers || 1);
  $("ready").textContent = p.stopping ? "DRAINING" : p.ready ? "ready" : "NOT READY";
  $("ready").className = p.ready && !p.stopping ? "ok" : "bad";
  const assoc = d.associations || [], refusals = d.recent_refusals || [];
  const peers = d.peer_certificates || [], own = d.certificates || [];
  const soon = [...own, ...peers].filter(
    (c) => typeof c.days_left === "number" && c.days_left < 30);
  $("n-assoc").textContent = assoc.length;
  $("n-refused").textContent = refusals.length;
  $("n-routes").textContent = (d.routes || []).length;
  $("n-peers").textContent = peers.length;
  $("n-soon").textContent = soon.length;
  $("n-soon").className = soon.some((c) => c.days_left < 7) ? "bad" : "";
  fill("listeners", d.listeners, [
    ["Name", (l) => l.name], ["Address", (l) => list(l.addresses) || l.bind, "mono"],
    ["TLS table", (l) => l.tls ? "[tls." + l.tls + "]" : "plaintext"],
    ["Verify", (l) => l.verify || ""], ["Peer certificate", (l) => l.peer_certificate || ""],
    ["Profile", (l) => l.profile || ""], ["Allowed sources", (l) => list(l.allow_source) || "any"],
  ]);
  fill("routes", d.routes, [
    ["Route", (r) => r.name], ["Called AE", (r) => r.called_ae || ""],
    ["Upstream", (r) => r.upstream || "", "mono"],
    ["TLS", (r) => r.upstream_tls ? "[tls." + r.upstream_tls + "]" : r.upstream ? "plaintext" : ""],
    ["Mode", (r) => r.mode || ""], ["Allowed", (r) => allow(r.allow)],
    ["Health", (r) => r.upstream ? health(r.health) : ""],
    ["Now", (r) => r.associations_now, "num"], ["Since start", (r) => r.associations_total, "num"],
    ["Refused", (r) => r.refusals_total, "num"],
  ].concat((d.routes || []).some((r) => r.queue) ?  // store-and-forward routes
    [["Queue", (r) => r.queue ? r.queue.queued + " queued, " + r.queue.queued_bytes + " bytes" +
      (r.queue.oldest_age_s == null ? "" : ", oldest " + Math.round(r.queue.oldest_age_s) + " s") +
      "; " + r.queue.failed + " failed" : ""]] : []));
  const filter = $("filter").value.trim().toLowerCase();
  fill("associations", assoc, [
    ["Peer", (a) => a.peer, "mono"], ["Calling AE", (a) => a.calling_ae],
    ["Called AE", (a) => a.called_ae], ["Route", (a) => a.route],
    ["Certificate subject", (a) => a.peer_subject || "(none)"],
    ["SHA-256", (a) => a.peer_sha256, "sha"],
    ["TLS", (a) => [a.tls_version, a.cipher].filter(Boolean).join(" ")],
    ["Up", (a) => size(a.bytes_up), "num"], ["Down", (a) => size(a.bytes_down), "num"],
    ["Duration", (a) => span(a.duration_s), "num"],
  ], filter);
  fill("refusals", refusals, [
    ["Time", (r) => r.ts, "mono"], ["Peer", (r) => r.peer, "mono"],
    ["Calling AE", (r) => r.calling_ae], ["Called AE", (r) => r.called_ae],
    ["Reason", (r) => r.reason + (r.explanation ? ": " + r.explanation : ""), "bad"],
    ["Detail", (r) => r.detail], ["Certificate subject", (r) => r.peer_subject || ""],
    ["SHA-256 (for accepted_thumbprints)", (r) => r.peer_sha256 || "", "sha"],
  ]);
  fill("certificates", own, [
    ["TLS table", (c) => c.tls], ["Kind", (c) => c.kind],
    ["Subject", (c) => c.subject || c.issuer],
    ["Not after / next update", (c) => c.not_after || c.next_update, "mono"],
    ["Days left", (c) => expiry(c.days_left), "num"],
  ]);
  fill("peers", peers, [
    ["Subject", (c) => c.subject], ["Issuer", (c) => c.issuer],
    ["SHA-256", (c) => c.sha256, "sha"],
    ["Not after", (c) => c.not_after, "mono"], ["Days left", (c) => expiry(c.days_left), "num"],
    ["First seen", (c) => c.first_seen, "mono"], ["Last seen", (c) => c.last_seen, "mono"],
    ["Associations", (c) => c.associations, "num"],
  ]);
  $("state").textContent = "as of " + (d.generated || "?");
  $("state").className = "";
}
async function refresh() {
  try {
    const r = await fetch("/status.json", {cache: "no-store"});
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json());
  } catch (e) {
    $("state").textContent = "not updated (" + e.message + "); last " +
      (current && current.generated || "?");
    $("state").className = "alarm";
  }
  setTimeout(refresh, REFRESH_MS);
}
$("filter").addEventListener("input", () => current && render(current));
render(JSON.parse($("data").textContent));
setTimeout(refresh, REFRESH_MS);
""".replace("REFRESH_MS", str(REFRESH * 1000))


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


CSP = (
    f"default-src 'none'; script-src {_hash(SCRIPT)}; style-src {_hash(STYLE)}; "
    "connect-src 'self'; img-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>dicom-tls-proxy status</title>
<style>STYLE</style></head>
<body>
<header><h1>dicom-tls-proxy</h1><span id="version"></span><span id="uptime"></span>
<span id="workers"></span><span id="ready"></span><span id="config" class="mono"></span>
<span id="state"></span></header>
<main>
<noscript><p>This page draws its tables with JavaScript; the same facts are at
<a href="/status.json">/status.json</a>.</p></noscript>
<div class="counts">
<div class="count"><b id="n-assoc"></b>associations open</div>
<div class="count"><b id="n-refused"></b>recent refusals</div>
<div class="count"><b id="n-routes"></b>routes</div>
<div class="count"><b id="n-peers"></b>peer certificates</div>
<div class="count"><b id="n-soon"></b>certificates expiring within 30 days</div>
</div>
<section><h2>Live associations</h2>
<input id="filter" placeholder="filter (AE, address, subject...)" aria-label="filter">
<div class="scroll"><table id="associations"></table></div></section>
<section><h2>Recent refusals: connections that did not complete (newest first, at most 100)</h2>
<div class="scroll"><table id="refusals"></table></div></section>
<section><h2>Routes</h2><div class="scroll"><table id="routes"></table></div></section>
<section><h2>Listeners</h2><div class="scroll"><table id="listeners"></table></div></section>
<section><h2>Peer certificates (accepted; most recently seen first)</h2>
<div class="scroll"><table id="peers"></table></div></section>
<section><h2>The proxy's certificates, CAs and CRLs</h2>
<div class="scroll"><table id="certificates"></table></div></section>
</main>
<script type="application/json" id="data">DATA</script>
<script>SCRIPT</script>
</body></html>
"""


def render_page(doc: dict[str, Any]) -> bytes:
    """The page, with `doc` embedded for the first drawing."""
    data = json.dumps(doc).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    page = PAGE.replace("STYLE", STYLE, 1).replace("SCRIPT", SCRIPT, 1)
    return page.replace("DATA", data, 1).encode()


# -- the terminal's view ------------------------------------------------------------------------


def as_text(doc: Any) -> str:
    """The document for a terminal (`dicom-tls-proxy status`); whatever `doc` holds, it never
    raises, and no value can write a control character."""
    d = _dict(doc)
    p = _dict(d.get("proxy"))
    lines = [
        f"dicom-tls-proxy {_t(p.get('version'))}, pid {_t(p.get('pid'))}, "
        f"up {_span(p.get('uptime_s'))}, workers {_t(p.get('workers'))}, "
        + ("draining" if p.get("stopping") else "ready" if p.get("ready") else "NOT READY"),
        f"config {_t(p.get('config'))} (loaded {_t(p.get('config_loaded'))})",
        "",
        "listeners:",
    ]
    for li in _list(d.get("listeners")):
        tls = (
            f"TLS [tls.{_t(li.get('tls'))}] verify={_t(li.get('verify'))}"
            if li.get("tls")
            else ("plaintext")
        )
        where = ", ".join(_t(a) for a in _list(li.get("addresses"), dict_only=False))
        lines.append(f"  {_t(li.get('name'))}  {where or _t(li.get('bind'))}  {tls}")
    lines += ["", "routes:"]
    for r in _list(d.get("routes")):
        counts = (
            f"now {_t(r.get('associations_now'))}, since start "
            f"{_t(r.get('associations_total'))}, refused {_t(r.get('refusals_total'))}"
        )
        if not r.get("upstream"):
            lines.append(f"  {_t(r.get('name'))}  {counts}")
            continue
        h = _dict(r.get("health"))
        health = (
            ""
            if not h or h.get("ok") is None
            else "; upstream " + ("up" if h.get("ok") else f"DOWN ({_t(h.get('cause'))})")
        )
        tls = f"TLS [tls.{_t(r.get('upstream_tls'))}]" if r.get("upstream_tls") else "plaintext"
        lines.append(
            f"  {_t(r.get('name'))}  called AE {_t(r.get('called_ae'))} -> "
            f"{_t(r.get('upstream'))} {tls}, {_t(r.get('mode'))}; {counts}{health}"
        )
    associations = _list(d.get("associations"))
    lines += ["", f"associations open: {len(associations)}"]
    for a in associations:
        lines.append(
            f"  {_t(a.get('peer'))}  {_t(a.get('calling_ae'))} -> {_t(a.get('called_ae'))}  "
            f"route {_t(a.get('route'))}  {_t(a.get('tls_version'))}  up {_t(a.get('bytes_up'))} B"
            f"  down {_t(a.get('bytes_down'))} B  {_span(a.get('duration_s'))}"
        )
        if a.get("peer_sha256"):
            lines.append(f"    {_t(a.get('peer_subject'))}  {_t(a.get('peer_sha256'))}")
    refusals = _list(d.get("recent_refusals"))
    lines += ["", f"recent refusals (newest first): {len(refusals)}"]
    for r in refusals:
        lines.append(
            f"  {_t(r.get('ts'))}  {_t(r.get('peer'))}  {_t(r.get('calling_ae'))} -> "
            f"{_t(r.get('called_ae'))}  {_t(r.get('reason'))}: {_t(r.get('detail'))}"
        )
        if r.get("peer_sha256"):
            lines.append(f"    {_t(r.get('peer_subject'))}  {_t(r.get('peer_sha256'))}")
    lines += ["", "certificates:"]
    for c in _list(d.get("certificates")):
        what = c.get("subject") or c.get("issuer")
        when = c.get("not_after") or c.get("next_update")
        lines.append(
            f"  [tls.{_t(c.get('tls'))}] {_t(c.get('kind'))}  {_t(what)}  until {_t(when)}"
            f"{_days(c.get('days_left'))}"
        )
    peers = _list(d.get("peer_certificates"))
    lines += ["", f"peer certificates: {len(peers)}"]
    for c in peers:
        lines.append(
            f"  {_t(c.get('subject'))}  until {_t(c.get('not_after'))}{_days(c.get('days_left'))}"
            f"  {_t(c.get('associations'))} associations, last {_t(c.get('last_seen'))}"
        )
        lines.append(f"    issuer {_t(c.get('issuer'))}  {_t(c.get('sha256'))}")
    return "\n".join(lines)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any, *, dict_only: bool = True) -> list[Any]:
    if not isinstance(value, list):
        return []
    return [v for v in value if isinstance(v, dict)] if dict_only else value


def _t(value: Any) -> str:
    """A value for a terminal: control characters (an escape sequence) shown as `?`."""
    text = "-" if value is None or value == "" else str(value)
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _span(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool) or value != value:
        return "?"
    seconds = int(max(0.0, min(float(value), 1e12)))
    days, rest = divmod(seconds, 86400)
    if days:
        return f"{days}d {rest // 3600}h"
    return f"{rest // 3600}h {rest % 3600 // 60}m {rest % 60}s"


def _days(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool) or value != value:
        return ""
    mark = "  ALARM" if value < 7 else "  WARNING" if value < 30 else ""
    return f" ({value:.1f} days){mark}"
