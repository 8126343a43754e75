// hepop's own page: calls, one call's ladder, an overview of traffic and capture health, and SQL.
// Plain JavaScript as the browser runs it, no build step and no framework. It reads only hepop's API:
// /query (the `calls` view and hep_N tables) and HOMER's /api/v3 (the ladder, logs, RTCP, exports, login).
// Data is put in the page as text (textContent, SVG attributes), never as HTML.
"use strict";

const PAGE_ROWS = 50;
const RANGES = { "15m": 15 * 60e3, "1h": 3600e3, "6h": 6 * 3600e3, "24h": 24 * 3600e3 };
const HEALTH_REFRESH_MS = 5000;
const SVG = "http://www.w3.org/2000/svg";
const COLOURS = ["#1f5fbf", "#1a7f37", "#c62828", "#8250df", "#bf8700", "#0a7ea4", "#6b7280", "#cf222e"];

// -- small helpers ------------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

const sqlText = (value) => "'" + String(value).replace(/'/g, "''") + "'";
const sqlTime = (ms) => `TIMESTAMPTZ ${sqlText(new Date(ms).toISOString())}`;
const pad = (n, width = 2) => String(n).padStart(width, "0");

function showTime(ms, withDate = true) {
  const d = new Date(ms);
  const clock = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
  return withDate ? `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${clock}` : clock;
}

const hostOf = (ip, port) => (String(ip).includes(":") ? `[${ip}]:${port}` : `${ip}:${port}`);

// 487 Request Terminated answers a CANCEL: the caller hung up while it rang, no failure.
const CANCELLED = 487;

function statusClass(status) {
  if (status === null || status === undefined) return "none";
  if (status === CANCELLED) return "cancelled";
  return status >= 200 && status < 300 ? "ok" : "fail";
}

// -- the API: a token in the tab's session, a login when the server asks for one -----------------------

const auth = {
  get token() { return sessionStorage.getItem("hepop-token"); },
  set token(value) { value ? sessionStorage.setItem("hepop-token", value) : sessionStorage.removeItem("hepop-token"); },
};

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

let loginWaiters = [];

async function request(path, { method = "GET", body, raw = false } = {}) {
  const headers = {};
  if (auth.token) headers.Authorization = `Bearer ${auth.token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (response.status === 401 && !path.startsWith("/api/v3/auth")) {
    await askLogin();
    return request(path, { method, body, raw });
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { const answer = await response.json(); message = answer.message || answer.error || message; } catch (e) { /* not JSON */ }
    throw new ApiError(response.status, message);
  }
  return raw ? response : response.json();
}

// A query through /query: its rows, the time window the server applied and whether the rows were cut.
async function query(sql) {
  const response = await request("/query", { method: "POST", body: { query: sql, format: "json" }, raw: true });
  return { rows: await response.json(), window: response.headers.get("X-Hepop-Time-Window") || "",
           truncated: response.headers.get("X-Hepop-Truncated") === "true",
           files: response.headers.get("X-Hepop-Files") || "" };
}

function askLogin() {
  document.getElementById("login").hidden = false;
  document.querySelector("#login-form input[name=username]").focus();
  return new Promise((resolve) => loginWaiters.push(resolve));
}

async function logIn(event) {
  event.preventDefault();
  const form = event.target;
  const error = document.getElementById("login-error");
  error.textContent = "";
  const token = form.token.value.trim();
  try {
    if (token) {            // a route behind the token says whether it is the right one
      const check = await fetch("/metrics", { headers: { Authorization: `Bearer ${token}` } });
      if (check.status === 401) throw new ApiError(401, "the API token is not accepted");
      auth.token = token;
    } else {
      const answer = await request("/api/v3/auth", { method: "POST",
                                                      body: { username: form.username.value, password: form.password.value } });
      auth.token = answer.token;
    }
  } catch (e) {
    error.textContent = e.message;
    return;
  }
  form.reset();
  document.getElementById("login").hidden = true;
  document.getElementById("logout").hidden = false;
  const waiting = loginWaiters;
  loginWaiters = [];
  waiting.forEach((resolve) => resolve());
}

// -- the route: everything a view shows is in the URL's hash, so a link can be sent --------------------

function currentRoute() {
  const [view, search] = (location.hash.replace(/^#\/?/, "") || "calls").split("?");
  return { view, params: new URLSearchParams(search || "") };
}

function go(view, params) {
  const search = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== "" && v !== null && v !== undefined));
  location.hash = `#/${view}${search.toString() ? "?" + search : ""}`;
}

// The range of a view's `range` (15m, 1h, 6h, 24h) or of its from/to (local times), in ms.  The last 15
// minutes unless asked: the call list aggregates every call of its range.
function rangeOf(params) {
  const name = params.get("range") || "15m";
  if (name === "custom") {
    const from = Date.parse(params.get("from")), to = Date.parse(params.get("to"));
    if (!isNaN(from) && !isNaN(to) && from < to) return { name, from, to };
  }
  const to = Date.now();
  return { name: RANGES[name] ? name : "15m", from: to - (RANGES[name] || RANGES["15m"]), to };
}

function rangeControls(params, range) {
  const select = el("select", { name: "range", "aria-label": "time range" },
    ...["15m", "1h", "6h", "24h", "custom"].map((name) =>
      el("option", { value: name, selected: name === range.name, text: name === "custom" ? "from / to" : `last ${name}` })));
  const local = (ms) => { const d = new Date(ms - new Date(ms).getTimezoneOffset() * 60e3); return d.toISOString().slice(0, 16); };
  const from = el("input", { type: "datetime-local", name: "from", value: params.get("from") || local(range.from) });
  const to = el("input", { type: "datetime-local", name: "to", value: params.get("to") || local(range.to) });
  const showCustom = () => { from.hidden = to.hidden = select.value !== "custom"; };
  select.addEventListener("change", showCustom);
  showCustom();
  return [select, from, to];
}

// -- calls -------------------------------------------------------------------------------------------

// The condition a search box's text stands for: an address, a status code (or a number of that form), a
// number or user, or a Call-ID.
function searchCondition(text) {
  const value = text.trim();
  if (!value) return "";
  if (/^\d{1,3}(\.\d{1,3}){3}$/.test(value) || (/^[0-9a-f:.]+$/i.test(value) && value.includes(":") && value.split(":").length > 2)) {
    return `(src_ip = ${sqlText(value)} OR dst_ip = ${sqlText(value)})`;
  }
  const users = `from_user = ${sqlText(value)} OR to_user = ${sqlText(value)} OR ruri_user = ${sqlText(value)}`;
  if (/^[1-6]\d\d$/.test(value)) return `(status = ${value} OR ${users})`;
  if (/^\+?[\d*#]+$/.test(value)) return `(${users})`;
  return `(call_id = ${sqlText(value)} OR ${users})`;
}

// The call list shows INVITE dialogs unless another method is asked for: REGISTER, OPTIONS and SUBSCRIBE
// dialogs far outnumber calls at most sites.
const ANY_METHOD = "any";
function methodOf(params) { return params.get("method") || "INVITE"; }

function callsSql(params, range) {
  const page = Math.max(0, parseInt(params.get("page") || "0", 10) || 0);
  const conditions = [`time BETWEEN ${sqlTime(range.from)} AND ${sqlTime(range.to)}`];
  const search = searchCondition(params.get("q") || "");
  if (search) conditions.push(search);
  if (params.get("failed") === "1") conditions.push(`(status IS NULL OR (status >= 300 AND status <> ${CANCELLED}))`);
  const method = methodOf(params);
  if (method !== ANY_METHOD) conditions.push(`method = ${sqlText(method)}`);
  return { page, sql: `SELECT * FROM calls WHERE ${conditions.join(" AND ")} ORDER BY time DESC ` +
                      `LIMIT ${PAGE_ROWS + 1} OFFSET ${page * PAGE_ROWS}` };
}

async function showCalls(view, params) {
  const range = rangeOf(params);
  const form = el("form", { class: "bar", role: "search" },
    el("input", { type: "search", name: "q", value: params.get("q") || "", placeholder: "number, Call-ID, IP address or status",
                  "aria-label": "search calls" }),
    ...rangeControls(params, range),
    el("label", {}, el("input", { type: "checkbox", name: "failed", value: "1", checked: params.get("failed") === "1" }), " failed only"),
    el("select", { name: "method", "aria-label": "method" },
      ...["INVITE", ANY_METHOD, "REGISTER", "OPTIONS", "MESSAGE", "SUBSCRIBE", "NOTIFY"].map((m) =>
        el("option", { value: m, selected: methodOf(params) === m, text: m === ANY_METHOD ? "any method" : m }))),
    el("button", { type: "submit", text: "Search" }));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const data = new FormData(form);
    go("calls", { q: data.get("q"), range: data.get("range"), from: data.get("range") === "custom" ? data.get("from") : "",
                  to: data.get("range") === "custom" ? data.get("to") : "", failed: data.get("failed") ? "1" : "",
                  method: data.get("method") });
  });
  const status = el("p", { class: "muted", text: "searching…" });
  view.append(form, status);
  const { page, sql } = callsSql(params, range);
  const result = await query(sql);
  const rows = result.rows.slice(0, PAGE_ROWS);
  status.textContent = rows.length ? `calls ${page * PAGE_ROWS + 1}–${page * PAGE_ROWS + rows.length}, newest first ` +
                                     `(window ${result.window})` : `no calls (window ${result.window})`;
  const table = el("table", { class: "calls" },
    el("thead", {}, el("tr", {}, ...["Start", "From → To (R-URI)", "Status", "Duration", "PDD", "User agent",
                                     "Source → Destination", "Msgs"].map((h) => el("th", { text: h })))),
    el("tbody", {}, ...rows.map((call) => callRow(call))));
  const pager = el("div", { class: "pager" },
    el("button", { type: "button", text: "← newer", disabled: page === 0,
                   onclick: () => go("calls", { ...Object.fromEntries(params), page: page - 1 }) }),
    el("span", { class: "muted", text: `page ${page + 1}` }),
    el("button", { type: "button", text: "older →", disabled: result.rows.length <= PAGE_ROWS,
                   onclick: () => go("calls", { ...Object.fromEntries(params), page: page + 1 }) }));
  view.append(table, pager);
}

function callRow(call) {
  const start = Date.parse(call.time), end = Date.parse(call.last_time);
  const users = `${call.from_user || "?"} → ${call.to_user || "?"}` + (call.ruri_user && call.ruri_user !== call.to_user ? ` (${call.ruri_user})` : "");
  const row = el("tr", { class: "call", "data-call-id": call.call_id, tabindex: "0", title: call.call_id },
    el("td", { text: showTime(start) }),
    el("td", { text: users }),
    el("td", {}, el("span", { class: `status ${statusClass(call.status)}`,
                              text: call.status === CANCELLED ? `${call.status} cancelled` : call.status ?? "no answer" })),
    el("td", { class: "num", text: call.duration_s === null ? "" : `${call.duration_s.toFixed(1)} s` }),
    el("td", { class: "num", text: call.pdd_ms === null ? "" : `${call.pdd_ms} ms` }),
    el("td", { text: call.user_agent || "" }),
    el("td", { text: `${hostOf(call.src_ip, call.src_port)} → ${hostOf(call.dst_ip, call.dst_port)}` }),
    el("td", { class: "num", text: call.messages }));
  const open = () => go("call", { id: call.call_id, from: start, to: end });
  row.addEventListener("click", open);
  row.addEventListener("keydown", (event) => { if (event.key === "Enter") open(); });
  return row;
}

// -- one call: the ladder, its logs and RTCP, its exports --------------------------------------------

function transactionRequest(params) {
  const from = parseInt(params.get("from"), 10) || Date.now() - 3600e3;
  const to = parseInt(params.get("to"), 10) || from;
  return { timestamp: { from, to }, param: { search: { "1_call": { callid: [params.get("id")] } }, location: {},
           transaction: { call: true, registration: true, rest: true } } };
}

async function showCall(view, params) {
  const body = transactionRequest(params);
  const title = el("h2", { text: `Call ${params.get("id")}` });
  const tabs = el("div", { class: "tabs", role: "tablist" });
  const panel = el("div", { class: "panel" });
  const downloads = el("div", { class: "bar" },
    el("button", { type: "button", text: "Download pcap", onclick: () => download("/api/v3/export/call/messages/pcap", body, "call.pcap") }),
    el("button", { type: "button", text: "Download text", onclick: () => download("/api/v3/export/call/messages/text", body, "call.txt") }));
  view.append(title, downloads, tabs, panel);
  const answer = await request("/api/v3/call/transaction", { method: "POST", body });
  const messages = answer.data.messages || [];
  const shows = { Ladder: () => drawLadder(panel, messages),
                  Logs: () => showLogs(panel, body),
                  RTCP: () => showRtcp(panel, body) };
  for (const name of Object.keys(shows)) {
    tabs.append(el("button", { type: "button", role: "tab", "data-tab": name, text: name, onclick: () => openTab(name) }));
  }
  async function openTab(name) {
    for (const button of tabs.children) button.classList.toggle("active", button.dataset.tab === name);
    panel.replaceChildren();
    try { await shows[name](); } catch (e) { panel.append(el("p", { class: "error", text: e.message })); }
  }
  await openTab("Ladder");
}

async function download(path, body, name) {
  const response = await request(path, { method: "POST", body, raw: true });
  const url = URL.createObjectURL(await response.blob());
  const link = el("a", { href: url, download: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60e3);     // the browser has the file by then; free its copy
}

function firstLine(raw) { return String(raw || "").split(/\r?\n/, 1)[0]; }

// The label of a message's arrow: the method, or the status with its reason phrase.
function labelOf(message) {
  const line = firstLine(message.raw);
  const response = /^SIP\/2\.0\s+(\d{3})\s*(.*)$/.exec(line);
  if (response) return { text: `${response[1]} ${response[2]}`.trim(),
                         kind: response[1] < "200" || Number(response[1]) === CANCELLED ? "prov" : response[1] < "300" ? "ok" : "fail" };
  return { text: message.method || line.split(" ")[0] || "?", kind: "req" };
}

// A label cut to the room its arrow gives (LABEL_CHAR_PX a character), the whole text on hover.
const LABEL_CHAR_PX = 7;
function cutTo(text, room_px) {
  const chars = Math.max(4, Math.floor(room_px / LABEL_CHAR_PX));
  return text.length <= chars ? text : text.slice(0, chars - 1) + "…";
}

const KIND_COLOURS = { req: "var(--req)", ok: "var(--ok)", fail: "var(--fail)", prov: "var(--prov)" };
const COLUMN_PX = 190, ROW_PX = 30, TOP_PX = 46, LEFT_PX = 90;

function drawLadder(panel, messages) {
  if (!messages.length) { panel.append(el("p", { text: "no SIP messages of this call in its time range" })); return; }
  const hosts = [];
  for (const m of messages) for (const h of [m.aliasSrc, m.aliasDst]) if (!hosts.includes(h)) hosts.push(h);
  const x = (host) => LEFT_PX + hosts.indexOf(host) * COLUMN_PX + COLUMN_PX / 2;
  const width = LEFT_PX + hosts.length * COLUMN_PX, height = TOP_PX + messages.length * ROW_PX + 10;
  const svg = el("svg:svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "SIP ladder" });
  const defs = el("svg:defs");
  for (const [kind, colour] of Object.entries(KIND_COLOURS)) {
    defs.append(el("svg:marker", { id: `head-${kind}`, viewBox: "0 0 10 10", refX: "10", refY: "5", markerWidth: "8", markerHeight: "8", orient: "auto-start-reverse" },
      el("svg:path", { d: "M0,0 L10,5 L0,10 z", fill: colour })));
  }
  svg.append(defs);
  hosts.forEach((host) => {
    svg.append(el("svg:text", { class: "host", x: x(host), y: 18, "text-anchor": "middle", text: host }),
               el("svg:line", { x1: x(host), y1: 26, x2: x(host), y2: height, stroke: "#d0d7de", "stroke-width": 2 }));
  });
  const first = messages[0].timeSeconds * 1e6 + messages[0].timeUseconds;
  const seen = new Set();
  const detail = el("div", { class: "message" }, el("p", { class: "muted", text: "click an arrow to read its message" }));
  messages.forEach((m, i) => {
    const y = TOP_PX + i * ROW_PX + ROW_PX / 2;
    const label = labelOf(m);
    const key = `${m.aliasSrc}|${m.aliasDst}|${m.raw}`;
    const retransmission = seen.has(key);
    seen.add(key);
    const colour = KIND_COLOURS[label.kind];
    const x1 = x(m.aliasSrc), x2 = x(m.aliasDst);
    const since = ((m.timeSeconds * 1e6 + m.timeUseconds - first) / 1e6).toFixed(3);
    const group = el("svg:g", { class: `arrow ${label.kind}${retransmission ? " retransmission" : ""}`, "data-index": i, tabindex: "0" },
      el("svg:text", { x: 6, y: y + 4, text: `+${since} s` }));
    if (x1 === x2) {        // a message to the same host and port: a loop
      group.append(el("svg:path", { d: `M${x1},${y - 8} h40 v16 h-38`, fill: "none", stroke: colour, "stroke-width": 1.5,
                                    "marker-end": `url(#head-${label.kind})`, "stroke-dasharray": retransmission ? "5 3" : null }));
    } else {
      group.append(el("svg:line", { class: "hit", x1, y1: y, x2, y2: y, stroke: "transparent", "stroke-width": 16 }),
                   el("svg:line", { x1, y1: y, x2, y2: y, stroke: colour, "stroke-width": 1.5, "marker-end": `url(#head-${label.kind})`,
                                    "stroke-dasharray": retransmission ? "5 3" : null }));
    }
    const text = label.text + (retransmission ? " (retransmission)" : "");
    const room = x1 === x2 ? COLUMN_PX - 60 : Math.abs(x2 - x1) - 16;
    group.append(el("svg:text", { class: "label", x: (x1 + x2) / 2 + (x1 === x2 ? 50 : 0), y: y - 5, "text-anchor": x1 === x2 ? "start" : "middle",
                                  fill: colour, text: cutTo(text, room), "data-full": text }),
                 el("svg:title", { text }));
    const select = () => {
      for (const other of svg.querySelectorAll(".arrow.selected")) other.classList.remove("selected");
      group.classList.add("selected");
      showMessage(detail, m, since);
    };
    group.addEventListener("click", select);
    group.addEventListener("keydown", (event) => { if (event.key === "Enter") select(); });
    svg.append(group);
  });
  panel.append(el("p", { class: "muted", text: `${messages.length} messages, ${hosts.length} hosts` }),
               el("div", { class: "split" }, el("div", { class: "ladder" }, svg), detail));
}

function showMessage(detail, m, since) {
  const lines = String(m.raw || "").split(/\r?\n/);
  const pre = el("pre", { class: "sip" });
  lines.forEach((line, i) => {
    const header = /^([A-Za-z0-9-]+)(\s*:)(.*)$/.exec(line);
    if (i === 0) pre.append(el("span", { class: "first", text: line }));
    else if (header) pre.append(el("span", { class: "name", text: header[1] }), header[2] + header[3]);
    else pre.append(line);
    if (i < lines.length - 1) pre.append("\n");
  });
  detail.replaceChildren(
    el("p", {}, el("strong", { text: labelOf(m).text }), ` at ${showTime(m.timeSeconds * 1000 + m.timeUseconds / 1000)} (+${since} s), `,
       `${m.aliasSrc} → ${m.aliasDst}, ${m.protocol === 6 ? "TCP" : m.protocol === 17 ? "UDP" : `protocol ${m.protocol}`}`),
    pre);
}

async function showLogs(panel, body) {
  const answer = await request("/api/v3/call/report/log", { method: "POST", body });
  if (!answer.data.length) { panel.append(el("p", { text: "no logs (HEP type 100) carry this call's Call-ID" })); return; }
  panel.append(el("table", {}, el("thead", {}, el("tr", {}, el("th", { text: "Time" }), el("th", { text: "From" }), el("th", { text: "Log" }))),
    el("tbody", {}, ...answer.data.map((row) => el("tr", {},
      el("td", { text: showTime(row.timeSeconds * 1000 + row.timeUseconds / 1000) }),
      el("td", { text: hostOf(row.srcIp, row.srcPort) }),
      el("td", { class: "log", text: row.raw }))))));
}

// One RTCP report's figures: interarrival jitter (ms, at 8 kHz, the telephony clock), fraction lost (%),
// and a MOS estimated by the simplified E-model (R = 93.2 - delay and loss impairments).
function rtcpFigures(row) {
  let report;
  try { report = JSON.parse(row.raw); } catch (e) { return null; }
  const block = (report.report_blocks || report.report_block || [])[0];
  if (!block) return null;
  const jitterMs = (block.ia_jitter || 0) / 8;
  const lossPercent = ((block.fraction_lost || 0) / 256) * 100;
  const latencyMs = jitterMs * 2 + 10;
  const r = 93.2 - (latencyMs < 160 ? latencyMs / 40 : (latencyMs - 120) / 10) - lossPercent * 2.5;
  const mos = r < 0 ? 1 : 1 + 0.035 * r + 7e-6 * r * (r - 60) * (100 - r);
  return { time: row.timeSeconds * 1000 + row.timeUseconds / 1000, jitterMs, lossPercent, mos: Math.min(4.5, Math.max(1, mos)),
           source: hostOf(row.srcIp, row.srcPort) };
}

async function showRtcp(panel, body) {
  const answer = await request("/api/v3/call/report/qos", { method: "POST", body });
  const figures = answer.rtcp.data.map(rtcpFigures).filter(Boolean);
  if (!figures.length) { panel.append(el("p", { text: "no RTCP reports (HEP type 5) carry this call's Call-ID" })); return; }
  const bySource = {};
  for (const f of figures) (bySource[f.source] ||= []).push(f);
  for (const [title, key, unit] of [["Jitter", "jitterMs", "ms"], ["Packet loss", "lossPercent", "%"], ["MOS (estimated)", "mos", ""]]) {
    const series = Object.entries(bySource).map(([name, points]) => ({ name, points: points.map((p) => [p.time, p[key]]) }));
    panel.append(lineChart(title, unit, series));
  }
  panel.append(el("p", { class: "muted", text: `${figures.length} RTCP reports` }));
}

// -- charts ------------------------------------------------------------------------------------------

const CHART_W = 760, CHART_H = 160, MARGIN = { left: 50, right: 10, top: 10, bottom: 22 };

function axes(svg, low, high, maxValue, unit) {
  const innerH = CHART_H - MARGIN.top - MARGIN.bottom;
  for (const fraction of [0, 0.5, 1]) {
    const y = MARGIN.top + innerH * (1 - fraction);
    svg.append(el("svg:line", { x1: MARGIN.left, x2: CHART_W - MARGIN.right, y1: y, y2: y, stroke: "#eaeef2" }),
               el("svg:text", { x: MARGIN.left - 4, y: y + 4, "text-anchor": "end", text: `${+(maxValue * fraction).toPrecision(3)}${unit}` }));
  }
  svg.append(el("svg:text", { x: MARGIN.left, y: CHART_H - 6, text: showTime(low) }),
             el("svg:text", { x: CHART_W - MARGIN.right, y: CHART_H - 6, "text-anchor": "end", text: showTime(high) }));
}

function legend(names, colourOf = (name, i) => COLOURS[i % COLOURS.length]) {
  return el("div", { class: "legend" }, ...names.map((name, i) => {
    const item = el("span", { text: name });
    item.style.setProperty("--swatch", colourOf(name, i));
    return item;
  }));
}

// Lines of [time, value] points, over the points' times or the range [low, high] given.
function lineChart(title, unit, series, range = null) {
  const points = series.flatMap((s) => s.points);
  const low = range ? range.from : Math.min(...points.map((p) => p[0]));
  const high = range ? range.to : Math.max(...points.map((p) => p[0]), low + 1);
  const maxValue = Math.max(...points.map((p) => p[1]), unit === "" ? 4.5 : 1e-9);
  const svg = el("svg:svg", { width: CHART_W, height: CHART_H, viewBox: `0 0 ${CHART_W} ${CHART_H}`, role: "img", "aria-label": title });
  axes(svg, low, high, maxValue, unit);
  const px = (t) => MARGIN.left + ((t - low) / (high - low)) * (CHART_W - MARGIN.left - MARGIN.right);
  const py = (v) => MARGIN.top + (1 - v / maxValue) * (CHART_H - MARGIN.top - MARGIN.bottom);
  series.forEach((s, i) => {
    const colour = COLOURS[i % COLOURS.length];
    svg.append(el("svg:polyline", { points: s.points.map((p) => `${px(p[0])},${py(p[1])}`).join(" "), fill: "none", stroke: colour, "stroke-width": 1.5 }));
    for (const p of s.points) {
      svg.append(el("svg:circle", { cx: px(p[0]), cy: py(p[1]), r: 2.5, fill: colour },
                    el("svg:title", { text: `${s.name}: ${+p[1].toPrecision(4)}${unit}` })));
    }
  });
  return el("div", { class: "chart" }, el("h3", { text: title }), svg, legend(series.map((s) => s.name)));
}

const CLASS_COLOURS = { "1xx": "#6b7280", "2xx": "#1a7f37", "3xx": "#bf8700", "4xx": "#c62828", "5xx": "#8250df", "6xx": "#7d2222" };

// Stacked bars: rows of {bucket (ms), kind, n}, one bar per bucket, the kinds in the same order in each.
function barChart(title, rows, bucketMs, low, high, colours = {}) {
  const kinds = [...new Set(rows.map((r) => r.kind))].sort();
  const colourOf = (kind) => colours[kind] || COLOURS[kinds.indexOf(kind) % COLOURS.length];
  rows = [...rows].sort((a, b) => a.bucket - b.bucket || kinds.indexOf(a.kind) - kinds.indexOf(b.kind));
  const totals = new Map();
  for (const r of rows) totals.set(r.bucket, (totals.get(r.bucket) || 0) + r.n);
  const maxValue = Math.max(1, ...totals.values());
  const svg = el("svg:svg", { width: CHART_W, height: CHART_H, viewBox: `0 0 ${CHART_W} ${CHART_H}`, role: "img", "aria-label": title });
  axes(svg, low, high, maxValue, "");
  const innerW = CHART_W - MARGIN.left - MARGIN.right, innerH = CHART_H - MARGIN.top - MARGIN.bottom;
  const barW = Math.max(1, (innerW * bucketMs) / (high - low) - 1);
  const stacked = new Map();
  for (const r of rows) {
    const below = stacked.get(r.bucket) || 0;
    stacked.set(r.bucket, below + r.n);
    const x = MARGIN.left + ((r.bucket - low) / (high - low)) * innerW;
    svg.append(el("svg:rect", { x, width: barW, y: MARGIN.top + innerH * (1 - (below + r.n) / maxValue), height: (innerH * r.n) / maxValue,
                                fill: colourOf(r.kind) }, el("svg:title", { text: `${r.kind}: ${r.n}` })));
  }
  return el("div", { class: "chart" }, el("h3", { text: title }), rows.length ? svg : el("p", { class: "muted", text: "nothing in this range" }),
            legend(kinds, colourOf));
}

// -- overview: traffic over the range and the capture's health ------------------------------------------

async function showOverview(view, params, stillShown) {
  const range = rangeOf(params);
  const form = el("form", { class: "bar" }, ...rangeControls(params, range), el("button", { type: "submit", text: "Show" }));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const data = new FormData(form);
    go("overview", { range: data.get("range"), from: data.get("range") === "custom" ? data.get("from") : "",
                     to: data.get("range") === "custom" ? data.get("to") : "" });
  });
  const health = el("div", { class: "cards" });
  const charts = el("div");
  view.append(el("h3", { text: "Capture" }), health, form, charts);
  refreshHealth(health, stillShown);
  const bucketMinutes = Math.max(1, Math.ceil((range.to - range.from) / 60e3 / 360));
  const bucket = `time_bucket(INTERVAL ${bucketMinutes} MINUTE, time)`;
  const where = `time BETWEEN ${sqlTime(range.from)} AND ${sqlTime(range.to)}`;
  const [methods, classes, kpis] = await Promise.all([
    query(`SELECT epoch_ms(${bucket}) AS bucket, sip_method AS kind, count(*) AS n FROM hep_1 WHERE ${where} ` +
          `AND sip_method IS NOT NULL GROUP BY ALL ORDER BY bucket, n DESC`),
    query(`SELECT epoch_ms(${bucket}) AS bucket, (sip_status // 100)::VARCHAR || 'xx' AS kind, count(*) AS n FROM hep_1 ` +
          `WHERE ${where} AND sip_status IS NOT NULL GROUP BY ALL ORDER BY bucket, kind`),
    query(KPI_SQL(bucket, where))]);
  const per = bucketMinutes === 1 ? "per minute" : `per ${bucketMinutes} minutes`;
  charts.append(barChart(`Requests ${per}, by method`, methods.rows, bucketMinutes * 60e3, range.from, range.to),
                barChart(`Responses ${per}, by class`, classes.rows, bucketMinutes * 60e3, range.from, range.to, CLASS_COLOURS),
                ...kpiCharts(kpis.rows, per, range), el("p", { class: "muted", text: `window ${methods.window}` }));
}

// The call KPIs of the calls that began in each bucket, per capture node, from the `calls` view: INVITE
// dialogs with a final answer; NER counts the answers that are the callee's (answered, busy, no answer,
// cancelled), as the README's SQL and PromQL do.
const KPI_SQL = (bucket, where) =>
  `SELECT epoch_ms(${bucket}) AS bucket, node, 100 * avg((status BETWEEN 200 AND 299)::INT) AS asr, ` +
  `100 * avg((status BETWEEN 200 AND 299 OR status IN (486, 600, 408, 480, 487))::INT) AS ner, ` +
  `avg(duration_s) FILTER (WHERE status BETWEEN 200 AND 299) AS acd, median(pdd_ms) AS pdd_median, ` +
  `quantile_cont(pdd_ms, 0.95) AS pdd_p95 FROM calls WHERE ${where} AND method = 'INVITE' AND status IS NOT NULL ` +
  `GROUP BY ALL ORDER BY bucket, node`;

function kpiCharts(rows, per, range) {
  const nodes = [...new Set(rows.map((r) => r.node))].sort();
  const series = (field, suffix = "") => nodes.map((node) => ({
    name: `node ${node}${suffix}`,
    points: rows.filter((r) => r.node === node && r[field] !== null).map((r) => [r.bucket, r[field]]) }))
    .filter((s) => s.points.length);
  const chart = (title, unit, lines) => lines.length ? lineChart(title, unit, lines, range) :
    el("div", { class: "chart" }, el("h3", { text: title }), el("p", { class: "muted", text: "no calls in this range" }));
  return [chart(`ASR ${per}`, " %", series("asr")), chart(`NER ${per}`, " %", series("ner")),
          chart(`ACD ${per}`, " s", series("acd")),
          chart(`Post-dial delay ${per}, median and 95th percentile`, " ms",
                [...series("pdd_median", " median"), ...series("pdd_p95", " p95")])];
}

// The counters of /metrics (Prometheus text) as {name{labels}: value}.
function parseMetrics(text) {
  const values = {};
  for (const line of text.split("\n")) {
    const match = /^hepop_([a-z_]+)(\{[^}]*\})?\s+(\S+)$/.exec(line);
    if (match) values[match[1] + (match[2] || "")] = Number(match[3]);
  }
  return values;
}

const sumOf = (values, name) => Object.entries(values).filter(([k]) => k === name || k.startsWith(name + "{"))
                                                     .reduce((total, [, v]) => total + v, 0);

async function refreshHealth(cards, stillShown) {
  let previous = null;
  while (stillShown()) {
    try {
      const [healthAnswer, metrics] = await Promise.all([
        request("/health"), request("/metrics", { raw: true }).then((r) => r.text()).then(parseMetrics)]);
      const now = performance.now(), received = sumOf(metrics, "hep_received_total");
      const rate = previous ? ((received - previous.received) * 1000) / (now - previous.now) : null;
      previous = { now, received };
      const drops = Object.entries(metrics).filter(([k]) => k.startsWith("hep_dropped_total"))
        .map(([k, v]) => `${(/reason="([^"]*)"/.exec(k) || [])[1] || "?"}: ${v}`);
      const card = (name, value) => el("div", { class: "card", "data-card": name }, el("div", { class: "muted", text: name }), el("div", { class: "value", text: value }));
      cards.replaceChildren(
        card("status", healthAnswer.status || "ok"),
        card("received per second", rate === null ? "…" : rate.toFixed(0)),
        card("received", received),
        card("dropped", drops.length ? drops.join(", ") : "0"),
        card("kernel drops", sumOf(metrics, "udp_kernel_drops_total")),
        card("files written", sumOf(metrics, "files_written_total")),
        card("bytes written", formatBytes(sumOf(metrics, "bytes_written_total"))),
        card("uptime", `${Math.round(sumOf(metrics, "uptime_seconds"))} s`));
    } catch (e) {
      cards.replaceChildren(el("p", { class: "error", text: e.message }));
    }
    await new Promise((resolve) => setTimeout(resolve, HEALTH_REFRESH_MS));
  }
}

function formatBytes(n) {
  for (const unit of ["B", "KiB", "MiB", "GiB"]) { if (n < 1024 || unit === "GiB") return `${n.toFixed(unit === "B" ? 0 : 1)} ${unit}`; n /= 1024; }
}

// -- SQL ---------------------------------------------------------------------------------------------

async function showSql(view, params) {
  const text = el("textarea", { class: "sql", name: "q", "aria-label": "SQL", spellcheck: "false" });
  text.value = params.get("q") || "SELECT method, count(*) AS calls, avg((status BETWEEN 200 AND 299)::INT) AS asr,\n" +
                                  "       avg(duration_s) AS acd_s\nFROM calls WHERE time > now() - INTERVAL 1 HOUR GROUP BY ALL";
  const form = el("form", {}, text, el("div", { class: "bar" }, el("button", { type: "submit", text: "Run" }),
    el("span", { class: "muted", text: "tables: hep_1 (SIP), hep_5 (RTCP), hep_100 (logs), …, and calls" })));
  form.addEventListener("submit", (event) => { event.preventDefault(); go("sql", { q: text.value }); });
  view.append(form);
  if (!params.get("q")) return;
  const status = el("p", { class: "muted", text: "running…" });
  view.append(status);
  const result = await query(params.get("q"));
  status.textContent = `${result.rows.length} rows${result.truncated ? " (cut at the row cap)" : ""}, time window ${result.window}, ${result.files} files`;
  status.dataset.window = result.window;
  const shown = result.rows.slice(0, 1000);
  const columns = shown.length ? Object.keys(shown[0]) : [];
  view.append(el("div", { class: "result" }, el("table", {},
    el("thead", {}, el("tr", {}, ...columns.map((c) => el("th", { text: c })))),
    el("tbody", {}, ...shown.map((row) => el("tr", {}, ...columns.map((c) => {
      const value = row[c];
      return el("td", { title: typeof value === "string" ? value : null,
                        text: value === null ? "NULL" : typeof value === "object" ? JSON.stringify(value) : value });
    })))))));
  if (result.rows.length > shown.length) view.append(el("p", { class: "muted", text: `the first ${shown.length} shown` }));
}

// -- the page ----------------------------------------------------------------------------------------

const VIEWS = { calls: showCalls, call: showCall, overview: showOverview, sql: showSql };
let shownRoute = 0;

async function render() {
  const { view: name, params } = currentRoute();
  const route = ++shownRoute;
  const stillShown = () => route === shownRoute;
  const view = document.getElementById("view");
  view.replaceChildren();
  delete view.dataset.ready;
  for (const link of document.querySelectorAll("header nav a")) {
    link.classList.toggle("active", link.dataset.view === (name === "call" ? "calls" : name));
  }
  const show = VIEWS[name] || showCalls;
  try {
    await show(view, params, stillShown);
  } catch (e) {
    if (stillShown()) view.append(el("p", { class: "error", text: e.message }));
  }
  if (stillShown()) view.dataset.ready = name;
}

document.addEventListener("DOMContentLoaded", () => {
  const offset = -new Date().getTimezoneOffset();
  document.getElementById("zone").textContent = `times in UTC${offset >= 0 ? "+" : "-"}${pad(Math.floor(Math.abs(offset) / 60))}:${pad(Math.abs(offset) % 60)}`;
  document.getElementById("login-form").addEventListener("submit", logIn);
  const logout = document.getElementById("logout");
  logout.hidden = !auth.token;
  logout.addEventListener("click", () => { auth.token = null; logout.hidden = true; render(); });
  window.addEventListener("hashchange", render);
  render();
});
