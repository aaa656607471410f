"use strict";
// The tokenwarden dashboard: reads GET /admin/overview with the admin token every few
// seconds and draws it; the buttons call the admin API. Text from the server is only ever
// set as text, never parsed as markup.
(function () {
  const POLL_MS = 3000;
  const PALETTE = ["#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#999999"];
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);
  let timer = null;
  // Each refresh draws only if no later one has been asked for since.
  let generation = 0;

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") node.textContent = v;
      else if (k === "onclick") node.addEventListener("click", v);
      else node.setAttribute(k, v);
    }
    for (const c of children) if (c != null) node.append(c);
    return node;
  }
  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    for (const c of children) if (c != null) node.append(c);
    return node;
  }
  const usd = (v) => "$" + (Math.abs(v) >= 1 ? v.toFixed(2) : v.toFixed(6));
  const int = (v) => Math.round(v).toLocaleString("en-US");
  const pct = (v) => (v * 100).toFixed(1) + "%";
  const td = (text, cls, field) => {
    const attrs = { text: String(text) };
    if (cls) attrs.class = cls;
    if (field) attrs["data-field"] = field;
    return el("td", attrs);
  };
  const pairs = (map, fmt) => {
    const keys = Object.keys(map || {}).sort();
    return keys.length ? keys.map((k) => k + " " + fmt(map[k])).join(", ") : "–";
  };
  function fill(tbody, rows, empty, columns) {
    tbody.replaceChildren(...rows);
    if (!rows.length) tbody.append(el("tr", {}, el("td", { colspan: columns, class: "empty", text: empty })));
  }

  // === the token ===
  function token() { return sessionStorage.getItem("tokenwarden-admin-token"); }
  function takeTokenFromFragment() {
    const m = /(?:^|[#&])token=([^&]*)/.exec(location.hash);
    if (!m) return;
    history.replaceState(null, "", location.pathname + location.search);
    try {
      sessionStorage.setItem("tokenwarden-admin-token", decodeURIComponent(m[1]));
    } catch (e) {
      sessionStorage.removeItem("tokenwarden-admin-token");
    }
  }
  function showLogin(message) {
    clearTimeout(timer);
    $("main").hidden = true;
    $("pause-all").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("status").textContent = "signed out";
  }
  $("login").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem("tokenwarden-admin-token", $("token").value.trim());
    $("token").value = "";
    refresh();
  });

  // === talking to the admin API ===
  async function call(method, path) {
    const res = await fetch(path, { method, headers: { authorization: "Bearer " + token() }, cache: "no-store" });
    if (res.status === 401) {
      sessionStorage.removeItem("tokenwarden-admin-token");
      showLogin("The token was refused.");
      throw new Error("unauthorized");
    }
    const body = await res.json().catch(() => ({}));
    if (!res.ok) throw new Error((body.error && body.error.message) || res.status + " " + res.statusText);
    return body;
  }
  async function act(method, path) {
    try { await call(method, path); } catch (e) { if (e.message !== "unauthorized") alert(e.message); }
    refresh();
  }
  const enc = encodeURIComponent;
  // A button that sends the admin request its `data-action` names ("POST /admin/…").
  function actionButton(label, danger, action) {
    return el("button", { class: danger ? "danger" : "", text: label, "data-action": action,
      onclick: (e) => { const [method, path] = e.currentTarget.dataset.action.split(" "); act(method, path); } });
  }

  async function refresh() {
    clearTimeout(timer);
    const mine = ++generation;
    if (!token()) return showLogin("");
    // A hidden tab asks for nothing; it refreshes when shown again.
    if (document.hidden) return;
    let data;
    try {
      data = await call("GET", "/admin/overview");
    } catch (e) {
      if (e.message === "unauthorized") return;
      if (mine === generation) {
        $("status").textContent = "cannot reach the proxy: " + e.message;
        timer = setTimeout(refresh, POLL_MS);
      }
      return;
    }
    if (mine !== generation) return;
    try {
      $("login").hidden = true;
      $("main").hidden = false;
      draw(data);
    } catch (e) {
      $("status").textContent = "cannot draw the overview: " + e.message;
    } finally {
      timer = setTimeout(refresh, POLL_MS);
    }
  }

  // === drawing ===
  function draw(data) {
    const report = data.insights;
    $("status").textContent = "updated " + data.generated_at.replace("T", " ").replace(/\.\d+Z$/, " UTC") +
      (data.pause_all ? " · ALL AGENTS PAUSED" : "");
    const all = $("pause-all");
    all.hidden = false;
    all.textContent = data.pause_all ? "Resume all agents" : "Pause all agents";
    all.className = data.pause_all ? "" : "danger";
    all.onclick = () => {
      if (data.pause_all || confirm("Pause every agent?")) act("POST", data.pause_all ? "/admin/resume-all" : "/admin/pause-all");
    };
    const chain = $("chain");
    const budgetsError = data.budgets_error ? el("p", { class: "broken", text: data.budgets_error + " (budgets are not shown until it can)" }) : null;
    if (data.insights_error) chain.replaceChildren(el("p", { class: "broken", text: "Cannot read the audit log: " + data.insights_error }));
    else if (report && !report.chain.ok) chain.replaceChildren(el("p", { class: "broken", text: "Audit chain broken: " + report.chain.error + " (" + report.chain.errors + " breaks). The figures come from a log that was altered." }));
    else if (report) chain.replaceChildren(el("p", { class: "ok", text: "Audit chain verified: " + int(report.chain.records) + " records." }));
    else chain.replaceChildren();
    if (budgetsError) chain.prepend(budgetsError);
    const figures = (report && report.agents) || {};
    drawAgents(data.agents, figures, !!data.budgets_error);
    drawRuns(data.runs, data.runs_total);
    drawSpend(report);
    drawGrowth(report ? report.context_growth : []);
    drawTeams(report ? report.teams : {});
    $("period").textContent = report
      ? "Figures from the audit log, " + (report.period.from || "(empty)") + " to " + report.period.to +
        "; a request is redundant when its agent sent the same body within " + report.redundancy_window + "."
      : "";
  }

  function budgetCell(budgets) {
    const cell = el("td", { "data-field": "budgets" });
    if (budgets === null) cell.append(el("span", { class: "empty", text: "unknown" }));
    else if (!budgets.length) cell.append(el("span", { class: "empty", text: "no budget" }));
    for (const b of budgets || []) {
      for (const [unit, f, fmt] of [["usd", b.usd, usd], ["tokens", b.tokens, int]]) {
        if (!f) continue;
        const spentShare = f.limit > 0 ? Math.min(1, f.spent / f.limit) : 1;
        const reservedShare = f.limit > 0 ? Math.min(1 - spentShare, f.reserved / f.limit) : 0;
        const bar = el("div", { class: "bar" + (spentShare >= 0.8 ? " hot" : "") });
        const spent = el("div", { class: "spent" });
        spent.style.width = (spentShare * 100).toFixed(1) + "%";
        const reserved = el("div", { class: "reserved" });
        reserved.style.left = spent.style.width;
        reserved.style.width = (reservedShare * 100).toFixed(1) + "%";
        bar.append(spent, reserved);
        cell.append(el("div", { class: "budget", "data-budget": b.scope + ":" + b.period + ":" + unit,
          text: (b.scope === "team" ? "team " + b.id + " · " : "") + b.period + " · " + fmt(f.spent) + " of " + fmt(f.limit) +
            (f.reserved > 0 ? " (+" + fmt(f.reserved) + " in flight)" : "") }), bar);
      }
    }
    return cell;
  }

  function drawAgents(agents, figures, budgetsUnknown) {
    const rows = agents.map((a) => {
      const f = figures[a.id] || {};
      const paused = a.state === "paused";
      const button = actionButton(paused ? "Resume" : "Pause", !paused,
        "POST /admin/agents/" + enc(a.id) + (paused ? "/resume" : "/pause"));
      const state = el("td", { "data-field": "state" }, el("span", { class: "state-" + a.state, text: a.state }), " ", button);
      return el("tr", { "data-agent": a.id },
        td(a.id, null, "id"), td(a.team || "–", null, "team"), state, budgetCell(budgetsUnknown ? null : a.budgets),
        td(int(f.requests || 0), "n", "requests"), td(usd(f.cost_usd || 0), "n", "cost"),
        td(pairs(f.outcomes, int), null, "outcomes"), td(pairs(f.cost_per_outcome_usd, usd), null, "cost_per_outcome"),
        td(pct(f.redundant_share || 0) + " · " + usd(f.redundant_cost_usd || 0), "n", "redundant"),
        td(pairs(f.runs_stopped, int), null, "runs_stopped"),
        td(f.anomalies ? int(f.anomalies) + " (" + pairs(f.anomalies_by_signal, int) + ")" : "–", null, "anomalies"));
    });
    fill($("agents").tBodies[0], rows, "No agents configured.", 11);
  }

  function drawRuns(runs, total) {
    const order = { stopped: 0, running: 1, idle: 2 };
    runs.sort((a, b) => (order[a.state] ?? 3) - (order[b.state] ?? 3) || a.idle_seconds - b.idle_seconds);
    $("runs-note").textContent = total > runs.length
      ? "The " + runs.length + " of " + int(total) + " runs that need a look first (stopped, running, most recent); GET /admin/runs lists them all."
      : "";
    const rows = runs.map((r) => {
      const stopped = !!r.stopped;
      const button = actionButton(stopped ? "Resume" : "Stop", !stopped,
        "POST /admin/runs/" + enc(r.id) + (stopped ? "/resume" : "/stop") + "?agent=" + enc(r.agent));
      return el("tr", { "data-run": r.id, "data-agent": r.agent },
        td(r.agent, null, "agent"), td(r.id, null, "id"),
        el("td", { "data-field": "state" }, el("span", { class: "state-" + (stopped ? "stopped" : r.state), text: stopped ? "stopped" : r.state })),
        td(int(r.requests), "n", "requests"), td(int(r.tokens), "n", "tokens"), td(usd(r.cost_usd), "n", "cost"),
        td(int(r.in_flight), "n", "in_flight"),
        td(stopped ? r.stopped.condition + ": " + r.stopped.message : "–", null, "why"),
        td(r.started_at.replace("T", " ").replace(/\.\d+Z$/, ""), null, "started"), el("td", {}, button));
    });
    fill($("runs").tBodies[0], rows, "No runs yet.", 10);
  }

  function drawSpend(report) {
    const box = $("spend");
    const points = report ? report.spend_over_time.points : [];
    if (!points.length) return box.replaceChildren(el("p", { class: "empty", text: "No spend yet." }));
    const agents = [...new Set(points.flatMap((p) => Object.keys(p.by_agent)))].sort();
    const colour = (a) => PALETTE[Math.min(agents.indexOf(a), PALETTE.length - 1)];
    const shown = points.slice(-48);
    const W = 860, H = 180, left = 60, bottom = 20;
    const max = Math.max(...shown.map((p) => p.cost_usd)) || 1;
    const step = Math.min(48, (W - left) / shown.length);
    const chart = svg("svg", { width: W, height: H + bottom, viewBox: "0 0 " + W + " " + (H + bottom), role: "img", "aria-label": "spend over time" });
    chart.append(svg("text", { x: 0, y: 12 }, usd(max)), svg("text", { x: 0, y: H }, "$0"));
    shown.forEach((p, i) => {
      let y = H;
      for (const a of agents) {
        const v = p.by_agent[a] || 0;
        if (!v) continue;
        const h = (v / max) * (H - 10);
        y -= h;
        chart.append(svg("rect", { x: left + i * step + 1, y: y, width: Math.max(1, step - 2), height: h, fill: colour(a) },
          svg("title", {}, p.start + " " + a + " " + usd(v))));
      }
    });
    const label = (p) => p.start.replace("T", " ").replace(/:00(\.000)?Z$/, "").replace(/ 00:00$/, "");
    chart.append(svg("text", { x: left, y: H + 15 }, label(shown[0])));
    if (shown.length > 1) chart.append(svg("text", { x: W - 110, y: H + 15 }, label(shown[shown.length - 1])));
    const legend = el("div", { class: "legend" }, ...agents.map((a) => {
      const sw = el("span", { class: "swatch" });
      sw.style.background = colour(a);
      return el("span", {}, sw, a);
    }));
    box.replaceChildren(chart, legend, el("p", { class: "note", text: "per " + report.spend_over_time.bucket + " (UTC)" }));
  }

  function drawGrowth(runs) {
    const rows = runs.map((r) => el("tr", { "data-run": r.run, "data-agent": r.agent },
      td(r.agent), td(r.run), td(int(r.calls), "n"), td(int(r.first_input_tokens), "n"),
      td(int(r.last_input_tokens), "n"), td(int(r.growth_per_call), "n", "growth")));
    fill($("growth").tBodies[0], rows, "No run with two calls yet.", 6);
  }

  function drawTeams(teams) {
    const rows = Object.keys(teams).sort().map((id) => {
      const f = teams[id];
      return el("tr", { "data-team": id }, td(id), td(int(f.requests), "n"), td(usd(f.cost_usd), "n", "cost"),
        td(pairs(f.outcomes, int)), td(pairs(f.cost_per_outcome_usd, usd)),
        td(pct(f.redundant_share) + " · " + usd(f.redundant_cost_usd), "n"), td(f.anomalies ? int(f.anomalies) : "–"));
    });
    fill($("teams").tBodies[0], rows, "No team figures yet.", 7);
  }

  document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
  takeTokenFromFragment();
  refresh();
})();
