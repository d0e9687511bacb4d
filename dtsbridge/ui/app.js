// dtsbridge's page for people: jobs with live progress from GET /events.
// No framework, no build step, nothing loaded from elsewhere. The token is typed once,
// kept in sessionStorage and sent only in the Authorization header (never in a URL):
// the event stream is read with fetch() and a body reader, since EventSource cannot
// send headers. Job fields are shown with textContent only (they come from requests).
"use strict";
(function () {
  const KEY = "dtsbridge.token";
  const FINAL = new Set(["SUCCESS", "ERROR", "CANCELLED"]);
  const state = {
    token: null, admin: false, jobs: new Map(), filters: { user: "", status: "" },
    lastId: null, abort: null, samples: new Map(), open: null, loading: false,
  };
  const $ = (id) => document.getElementById(id);

  // -- talking to the service ------------------------------------------------

  async function api(path, options) {
    const opts = Object.assign({ cache: "no-store", credentials: "omit" }, options || {});
    opts.headers = Object.assign({}, opts.headers || {}, { Authorization: state.token });
    const r = await fetch(path, opts);
    let body = null;
    try { body = await r.json(); } catch (e) { body = null; }
    return { status: r.status, body: body };
  }

  function message(res) {
    return (res.body && res.body.error && res.body.error.message) || ("HTTP " + res.status);
  }

  // -- formatting ------------------------------------------------------------

  function bytes(n) {
    if (n === undefined || n === null) return "";
    const units = ["B", "kB", "MB", "GB", "TB", "PB"];
    let v = Number(n), i = 0;
    while (v >= 1000 && i < units.length - 1) { v /= 1000; i++; }
    return (i === 0 ? String(v) : v.toFixed(v < 10 ? 2 : v < 100 ? 1 : 0)) + " " + units[i];
  }

  function when(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    if (isNaN(d)) return iso;
    const p = (x) => String(x).padStart(2, "0");
    return d.getFullYear() + "-" + p(d.getMonth() + 1) + "-" + p(d.getDate()) + " " +
      p(d.getHours()) + ":" + p(d.getMinutes()) + ":" + p(d.getSeconds());
  }

  function duration(s) {
    if (!isFinite(s) || s < 0) return "";
    s = Math.round(s);
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    return (h ? h + "h " : "") + (h || m ? m + "m " : "") + sec + "s";
  }

  function created(job) {
    const t = [job.time_staging, job.time_submitted].filter(Boolean).map((x) => Date.parse(x));
    return t.length ? Math.min.apply(null, t) : 0;
  }

  function percent(job) {
    if (job.status === "SUCCESS") return 100;
    if (!job.bytes_total) return job.files_total === 0 && job.status !== "SUBMITTED" ? 100 : 0;
    return Math.max(0, Math.min(100, (100 * (job.bytes_done || 0)) / job.bytes_total));
  }

  // Throughput of a running job: bytes over the last ~10 s of progress events.
  function note(job) {
    if (job.status !== "TRANSFERRING") { state.samples.delete(job.job_id); return; }
    const list = state.samples.get(job.job_id) || [];
    list.push({ t: performance.now(), b: job.bytes_done || 0 });
    while (list.length > 2 && list[list.length - 1].t - list[0].t > 10000) list.shift();
    state.samples.set(job.job_id, list);
  }

  function rateText(job) {
    if (job.status === "TRANSFERRING") {
      const list = state.samples.get(job.job_id) || [];
      if (list.length < 2) return job.detailed_status || "starting";
      const a = list[0], b = list[list.length - 1];
      const rate = (b.b - a.b) / Math.max(0.001, (b.t - a.t) / 1000);
      let text = bytes(Math.round(rate)) + "/s";
      if (rate > 0 && job.bytes_total) text += " · " + duration((job.bytes_total - b.b) / rate) + " left";
      return text;
    }
    if (job.status === "SUCCESS" && job.time_transferring && job.time_success && job.bytes_total) {
      const s = (Date.parse(job.time_success) - Date.parse(job.time_transferring)) / 1000;
      return s > 0 ? bytes(Math.round(job.bytes_total / s)) + "/s average" : "";
    }
    if (job.status === "SUBMITTED") return "queued";
    if (job.status === "STAGING") return "waiting for the stager";
    return job.reason ? job.reason.replace(/_/g, " ") : "";
  }

  // -- the table ---------------------------------------------------------------

  function matches(job) {
    const f = state.filters;
    return (!f.user || job.target_user === f.user) && (!f.status || job.status === f.status);
  }

  function cell(tr, cls, label) {
    const td = document.createElement("td");
    if (cls) td.className = cls;
    td.dataset.label = label;
    tr.appendChild(td);
    return td;
  }

  function makeRow(id) {
    const tr = document.createElement("tr");
    tr.dataset.jobId = id;
    cell(tr, "status", "Status");
    cell(tr, "user", "User");
    cell(tr, "folder", "Folder");
    cell(tr, "num files", "Files");
    cell(tr, "num bytes", "Bytes");
    const prog = cell(tr, "progress", "Progress");
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.setAttribute("role", "progressbar");
    bar.setAttribute("aria-valuemin", "0");
    bar.setAttribute("aria-valuemax", "100");
    bar.appendChild(document.createElement("span"));
    const rate = document.createElement("div");
    rate.className = "rate";
    prog.append(bar, rate);
    cell(tr, "when", "Submitted");
    const actions = cell(tr, "actions", "");
    const details = document.createElement("button");
    details.type = "button";
    details.className = "ghost small details";
    details.textContent = "Details";
    details.addEventListener("click", () => openDetail(id));
    actions.appendChild(details);
    const cancel = document.createElement("button");
    cancel.type = "button";
    cancel.className = "danger small cancel";
    cancel.textContent = "Cancel";
    cancel.addEventListener("click", () => askCancel(id, cancel));
    actions.appendChild(cancel);
    return tr;
  }

  function fill(tr, job) {
    const c = tr.children;
    const badge = document.createElement("span");
    badge.className = "badge " + job.status;
    badge.textContent = job.status;
    c[0].replaceChildren(badge);
    c[1].textContent = job.target_user || "";
    c[2].textContent = job.path || job.subdirectory || "";
    c[2].title = job.subdirectory || "";
    c[3].textContent = job.files_total === undefined ? "" :
      (job.status === "TRANSFERRING" ? (job.files_done || 0) + " / " : "") + job.files_total;
    c[4].textContent = job.bytes_total === undefined ? "" :
      (job.status === "TRANSFERRING" ? bytes(job.bytes_done || 0) + " / " : "") + bytes(job.bytes_total);
    const pct = percent(job);
    const bar = c[5].querySelector(".bar");
    bar.classList.toggle("done", job.status === "SUCCESS");
    bar.classList.toggle("failed", job.status === "ERROR" || job.status === "CANCELLED");
    bar.setAttribute("aria-valuenow", pct.toFixed(1));
    bar.setAttribute("aria-label", "progress of " + (job.subdirectory || job.job_id));
    bar.firstChild.style.width = pct.toFixed(1) + "%";
    c[5].querySelector(".rate").textContent = rateText(job);
    c[6].textContent = when(job.time_staging || job.time_submitted);
    const cancel = c[7].querySelector(".cancel");
    cancel.hidden = !state.admin || FINAL.has(job.status);
  }

  function render() {
    const rows = $("rows");
    const ids = Array.from(state.jobs.values()).sort((a, b) => created(b) - created(a)).map((j) => j.job_id);
    const existing = new Map(Array.from(rows.children).map((tr) => [tr.dataset.jobId, tr]));
    ids.forEach((id, i) => {
      let tr = existing.get(id);
      if (!tr) tr = makeRow(id);
      existing.delete(id);
      fill(tr, state.jobs.get(id));
      if (rows.children[i] !== tr) rows.insertBefore(tr, rows.children[i] || null);
    });
    existing.forEach((tr) => tr.remove());
    $("empty").hidden = ids.length > 0 || state.loading;
    $("count").textContent = ids.length + (ids.length === 1 ? " job" : " jobs");
  }

  async function load() {
    const q = new URLSearchParams({ limit: "200" });
    if (state.filters.user) q.set("user", state.filters.user);
    if (state.filters.status) q.set("status", state.filters.status);
    state.loading = true;
    const res = await api("/jobs?" + q.toString());
    state.loading = false;
    if (res.status === 401) return signOut("Your token is no longer valid.");
    if (res.status !== 200) { $("jobs-error").textContent = message(res); return; }
    $("jobs-error").textContent = "";
    const fresh = new Map();
    for (const job of res.body.jobs) {
      const seen = state.jobs.get(job.job_id);
      // an event that came while the list loaded is newer than the list
      fresh.set(job.job_id, seen && seen.__event ? seen : job);
    }
    for (const [id, job] of state.jobs) if (job.__event && !fresh.has(id) && matches(job)) fresh.set(id, job);
    state.jobs = fresh;
    render();
  }

  // -- live events -------------------------------------------------------------

  function setLive(on, text) {
    const el = $("live");
    el.className = "live " + (on ? "on" : "off");
    el.textContent = text || (on ? "● live" : "○ reconnecting");
  }

  function onEvent(ev) {
    if (ev.id) state.lastId = ev.id;
    let job;
    try { job = JSON.parse(ev.data); } catch (e) { return; }
    if (!job || !job.job_id) return;
    job.__event = true;
    note(job);
    if (matches(job)) state.jobs.set(job.job_id, job);
    else state.jobs.delete(job.job_id);
    render();
    if (state.open === job.job_id) showFields(job);
  }

  async function follow() {
    if (state.abort) state.abort.abort();
    const ctl = new AbortController();
    state.abort = ctl;
    const headers = { Authorization: state.token, Accept: "text/event-stream" };
    if (state.lastId) headers["Last-Event-ID"] = state.lastId;
    try {
      const r = await fetch("/events", { headers: headers, signal: ctl.signal, cache: "no-store", credentials: "omit" });
      if (r.status === 401) { signOut("Your token is no longer valid."); return; }
      if (!r.ok || !r.body) throw new Error("HTTP " + r.status);
      setLive(true);
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      let buf = "", ev = {};
      for (;;) {
        const chunk = await reader.read();
        if (chunk.done) break;
        buf += decoder.decode(chunk.value, { stream: true });
        let i;
        while ((i = buf.indexOf("\n")) >= 0) {
          let line = buf.slice(0, i);
          buf = buf.slice(i + 1);
          if (line.endsWith("\r")) line = line.slice(0, -1);
          if (line === "") { if (ev.data !== undefined) onEvent(ev); ev = {}; continue; }
          if (line[0] === ":") continue;
          const c = line.indexOf(":");
          const k = c < 0 ? line : line.slice(0, c);
          let v = c < 0 ? "" : line.slice(c + 1);
          if (v[0] === " ") v = v.slice(1);
          if (k === "data") ev.data = ev.data === undefined ? v : ev.data + "\n" + v;
          else ev[k] = v;
        }
      }
    } catch (e) {
      if (ctl.signal.aborted) return;
    }
    if (ctl.signal.aborted || state.abort !== ctl) return;
    setLive(false);
    setTimeout(() => { if (state.abort === ctl) follow(); }, 2000);
  }

  // -- detail and cancel -----------------------------------------------------------

  const ORDER = ["job_id", "status", "detailed_status", "reason", "target_user", "subdirectory", "path",
    "submitter", "kind", "files_done", "files_total", "bytes_done", "bytes_total"];

  function showFields(job) {
    $("detail-title").textContent = "Job " + job.job_id;
    const dl = $("detail-fields");
    dl.replaceChildren();
    const keys = Object.keys(job).filter((k) => !k.startsWith("__"));
    const times = keys.filter((k) => k.startsWith("time_")).sort((a, b) => Date.parse(job[a]) - Date.parse(job[b]));
    const first = ORDER.filter((k) => k in job);
    const rest = keys.filter((k) => !first.includes(k) && !times.includes(k)).sort();
    for (const k of first.concat(rest, times)) {
      const dt = document.createElement("dt");
      dt.textContent = k;
      const dd = document.createElement("dd");
      dd.dataset.field = k;
      let v = job[k];
      if (k.startsWith("bytes_")) v = v + " (" + bytes(v) + ")";
      else if (k.startsWith("time_")) v = v + "  (" + when(v) + " local)";
      else if (typeof v === "object") v = JSON.stringify(v);
      dd.textContent = String(v);
      dl.append(dt, dd);
    }
    $("detail-cancel").hidden = !state.admin || FINAL.has(job.status);
  }

  async function openDetail(id) {
    state.open = id;
    $("detail-msg").textContent = "";
    const known = state.jobs.get(id);
    if (known) showFields(known);
    const dlg = $("detail");
    if (!dlg.open) dlg.showModal();
    const res = await api("/transferStatus?job_id=" + encodeURIComponent(id));
    if (state.open !== id) return;
    if (res.status === 200) showFields(res.body);
    else $("detail-msg").textContent = message(res);
  }

  function askCancel(id, button) {
    if (button.dataset.armed === "1") {
      button.dataset.armed = "";
      button.textContent = button.dataset.label;
      return doCancel(id, button);
    }
    button.dataset.label = button.textContent;
    button.dataset.armed = "1";
    button.textContent = "Confirm cancel";
    setTimeout(() => {
      if (button.dataset.armed === "1") { button.dataset.armed = ""; button.textContent = button.dataset.label; }
    }, 4000);
  }

  async function doCancel(id, button) {
    button.disabled = true;
    const res = await api("/cancelTransfer", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ job_id: id }),
    });
    button.disabled = false;
    if (res.status === 200) {
      const job = res.body;
      job.__event = true;
      if (matches(job)) state.jobs.set(id, job); else state.jobs.delete(id);
      render();
      if (state.open === id) showFields(job);
    } else {
      const msg = "Cannot cancel: " + message(res);
      if (state.open === id) $("detail-msg").textContent = msg; else $("jobs-error").textContent = msg;
    }
  }

  // -- signing in and out ------------------------------------------------------------

  async function signIn(token) {
    state.token = token;
    const probe = await api("/jobs?limit=1");
    if (probe.status === 401) throw new Error("This token is not valid.");
    if (probe.status !== 200) throw new Error(message(probe));
    // A transfer_role token may list any user's jobs; any other token only its own (403).
    const role = await api("/jobs?limit=1&user=" + encodeURIComponent("-"));
    state.admin = role.status === 200;
    sessionStorage.setItem(KEY, token);
    $("token").value = "";  // before the stream goes live: the token stays only in sessionStorage
    $("login").hidden = true;
    $("jobs").hidden = false;
    $("who").hidden = false;
    $("who-name").textContent = state.admin ? "transfer service: every job" : "your jobs";
    $("user-filter-label").hidden = !state.admin;
    setLive(false, "○ connecting");
    follow();
    await load();
  }

  function signOut(why) {
    sessionStorage.removeItem(KEY);
    if (state.abort) state.abort.abort();
    state.abort = null;
    state.token = null;
    state.jobs = new Map();
    state.lastId = null;
    state.samples = new Map();
    $("rows").replaceChildren();
    $("jobs").hidden = true;
    $("who").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = why || "";
    if ($("detail").open) $("detail").close();
    $("token").focus();
  }

  function init() {
    $("login-form").addEventListener("submit", async (e) => {
      e.preventDefault();
      const input = $("token");
      const token = input.value.trim();
      if (!token) return;
      $("login-error").textContent = "";
      try {
        await signIn(token);
      } catch (err) {
        state.token = null;
        $("login-error").textContent = err.message || String(err);
      }
    });
    $("logout").addEventListener("click", () => signOut(""));
    $("filters").addEventListener("submit", (e) => {
      e.preventDefault();
      state.filters = { user: state.admin ? $("f-user").value.trim() : "", status: $("f-status").value };
      load();
    });
    $("f-status").addEventListener("change", () => $("filters").requestSubmit());
    $("f-clear").addEventListener("click", () => {
      $("f-user").value = "";
      $("f-status").value = "";
      $("filters").requestSubmit();
    });
    $("detail-close").addEventListener("click", () => $("detail").close());
    $("detail").addEventListener("close", () => { state.open = null; });
    $("detail-cancel").addEventListener("click", (e) => { if (state.open) askCancel(state.open, e.currentTarget); });
    const saved = sessionStorage.getItem(KEY);
    if (saved) {
      signIn(saved).catch((err) => signOut(err.message));
    } else {
      $("login").hidden = false;
      $("token").focus();
    }
  }

  init();
})();
