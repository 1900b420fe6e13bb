/* The live pool page: polls the document of `manage.py poolstats --json`
 * (the page's JSON view) and draws it: one bar per pool, the waiters, the
 * counters, and charts of utilisation and wait p95 over the last minutes.
 *
 * Plain JavaScript, nothing loaded from elsewhere.  The charts' history is
 * kept here, in the page, from one poll to the next: the processes publish
 * only their present state.  Every text from the server goes through
 * textContent, never innerHTML.
 */
(function () {
  "use strict";

  const SVG_NS = "http://www.w3.org/2000/svg";
  const COLORS = [
    "#417690", "#e07a1f", "#5b9b3a", "#9b4dca",
    "#c2453d", "#2a9d8f", "#b08d1a", "#7a6f66",
  ];
  const TOTAL_COLOR = "var(--body-loud-color, #000)";
  const TEXT_COLUMNS = ["Process", "Connections", "Oldest holder"];
  const MIN_SPAN = 60000;
  const TICKS = [10000, 15000, 30000, 60000, 120000, 300000, 600000];
  // The text view's "Requests" and "Connections" tables: [header, field].
  const REQUESTS = [
    ["Served", "requests_served"], ["Waited", "requests_waited"],
    ["Wait mean (ms)", "mean_ms"], ["p95 (ms)", "p95_ms"], ["p99 (ms)", "p99_ms"],
    ["Timeouts", "timeouts"], ["Rejected", "rejected"],
  ];
  const CONNECTIONS = [
    ["Opened", "connections_opened"], ["Closed", "connections_closed"],
    ["Lost", "connections_lost"], ["Errors", "connection_errors"], ["Resets", "resets"],
    ["Reset failed", "resets_failed"], ["Leaks", "leaks"], ["Reclaims", "reclaims"],
  ];

  const root = document.getElementById("pools");
  if (!root) {
    return;
  }
  // The page's message for when this script never runs (static files not
  // served, JavaScript off): it has run.
  const scriptMissing = document.getElementById("pools-script-missing");
  if (scriptMissing) {
    scriptMissing.remove();
  }
  const dataUrl = root.dataset.url;
  const refreshMs = Number(root.dataset.refreshMs) || 1000;
  const historyMs = (Number(root.dataset.historySeconds) || 300) * 1000;
  const statusBox = document.getElementById("pools-status");
  const problemsBox = document.getElementById("pools-problems");
  const aliasesBox = document.getElementById("pools-aliases");
  const staleBox = document.getElementById("pools-stale");

  // alias -> Map(series key -> {label, color, total, points: [{t, util, p95}]})
  const history = new Map();
  const pidColors = new Map();
  let shownOnce = false;

  // -- small DOM helpers ------------------------------------------------------

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "text") {
        node.textContent = value;
      } else if (key === "className") {
        node.className = value;
      } else {
        node.setAttribute(key, value);
      }
    }
    for (const child of children || []) {
      node.append(child);
    }
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "text") {
        node.textContent = value;
      } else {
        node.setAttribute(key, String(value));
      }
    }
    return node;
  }

  function ms(value) {
    return value === null || value === undefined ? "-" : value.toFixed(1);
  }

  function plural(n, one, many) {
    return n + " " + (n === 1 ? one : many);
  }

  function clock(seconds) {
    return new Date(seconds * 1000).toLocaleTimeString();
  }

  function colorOf(pid) {
    if (!pidColors.has(pid)) {
      pidColors.set(pid, COLORS[pidColors.size % COLORS.length]);
    }
    return pidColors.get(pid);
  }

  // -- figures ------------------------------------------------------------------

  // The parts of a bar: lent, idle, being opened (size counts them), free.
  function parts(pool) {
    const opening = Math.max(pool.size - pool.lent - pool.idle, 0);
    const used = pool.lent + pool.idle + opening;
    return {
      lent: pool.lent,
      idle: pool.idle,
      opening: opening,
      free: Math.max(pool.max_size - used, 0),
    };
  }

  function utilisation(pool) {
    return pool.max_size > 0 ? (100 * pool.lent) / pool.max_size : 0;
  }

  // Live processes' pools, grouped by alias, in the document's order.
  function byAlias(data) {
    const groups = new Map();
    for (const process of data.processes) {
      if (process.stale) {
        continue;
      }
      for (const pool of process.pools) {
        if (!groups.has(pool.alias)) {
          groups.set(pool.alias, []);
        }
        groups.get(pool.alias).push({ process: process, pool: pool });
      }
    }
    return groups;
  }

  // -- history ------------------------------------------------------------------

  function remember(aliasName, key, label, color, isTotal, point) {
    if (!history.has(aliasName)) {
      history.set(aliasName, new Map());
    }
    const series = history.get(aliasName);
    if (!series.has(key)) {
      series.set(key, { label: label, color: color, total: isTotal, points: [] });
    }
    series.get(key).points.push(point);
  }

  function record(data) {
    const t = data.time * 1000;
    for (const [aliasName, rows] of byAlias(data)) {
      for (const { process, pool } of rows) {
        const label = "pid " + process.pid;
        remember(aliasName, label, label, colorOf(process.pid), false, {
          t: t,
          util: utilisation(pool),
          p95: pool.wait.p95_ms,
        });
      }
    }
    for (const total of data.totals) {
      if (total.processes > 1) {
        remember(total.alias, "total", "all processes", TOTAL_COLOR, true, {
          t: t,
          util: utilisation(total),
          p95: total.wait.p95_ms,
        });
      }
    }
    // Forget what fell out of the window, and the series left empty.
    for (const series of history.values()) {
      for (const [key, s] of series) {
        s.points = s.points.filter((p) => p.t >= t - historyMs);
        if (!s.points.length) {
          series.delete(key);
        }
      }
    }
  }

  // -- tables ---------------------------------------------------------------------

  function bar(pool) {
    const p = parts(pool);
    const whole = Math.max(p.lent + p.idle + p.opening + p.free, 1);
    const label =
      p.lent + " lent out, " + p.idle + " idle, " + p.opening + " being opened, " +
      p.free + " free, of max " + pool.max_size;
    const box = el("div", { className: "pools-bar", role: "img", "aria-label": label, title: label });
    for (const name of ["lent", "idle", "opening", "free"]) {
      if (p[name] > 0) {
        const segment = el("span", { className: "pools-bar-" + name });
        segment.style.width = (100 * p[name]) / whole + "%";
        box.append(segment);
      }
    }
    return box;
  }

  function cell(field, value, extra) {
    return el("td", {
      className: "pools-num" + (extra ? " " + extra : ""),
      "data-field": field,
      text: String(value),
    });
  }

  function poolRow(pid, label, detail, pool, isTotal) {
    const p = parts(pool);
    const swatch = el("span", { className: "pools-swatch" });
    swatch.style.background = isTotal ? TOTAL_COLOR : colorOf(pid);
    const who = el("th", { scope: "row" }, [swatch, el("span", { className: "pools-who", text: label })]);
    if (detail) {
      who.append(el("div", { className: "pools-detail", text: detail }));
    }
    const holder = el("td", { className: "pools-holder", "data-field": "oldest_holder", text: "-" });
    if (pool.oldest_holder) {
      const h = pool.oldest_holder;
      holder.replaceChildren(
        el("div", { text: h.held_s.toFixed(1) + "s " + h.thread + " at" }),
        el("div", { className: "pools-where", text: h.where }),
      );
    } else if (isTotal && pool.oldest_holder_s !== null) {
      holder.textContent = pool.oldest_holder_s.toFixed(1) + "s";
    }
    return el("tr", { "data-pid": String(pid), className: isTotal ? "pools-total" : "" }, [
      who,
      el("td", { className: "pools-bar-cell" }, [bar(pool)]),
      cell("lent", pool.lent),
      cell("idle", pool.idle),
      cell("free", p.free),
      cell("size", pool.size),
      cell("min_size", pool.min_size),
      cell("max_size", pool.max_size),
      cell("waiting", pool.waiting, pool.waiting > 0 ? "pools-alert" : ""),
      cell("p95_ms", ms(pool.wait.p95_ms)),
      holder,
    ]);
  }

  function counterRow(pid, label, pool, fields) {
    const row = el("tr", { "data-pid": String(pid), className: pid === "total" ? "pools-total" : "" }, [
      el("th", { scope: "row", className: "pools-who", text: label }),
    ]);
    for (const field of fields) {
      if (field.endsWith("_ms")) {
        row.append(cell(field, ms(pool.wait[field])));
      } else {
        row.append(cell(field, pool[field]));
      }
    }
    return row;
  }

  function table(headers, rows, className) {
    const head = el("tr", {}, headers.map((h) =>
      el("th", { scope: "col", className: TEXT_COLUMNS.includes(h) ? "" : "pools-num", text: h })));
    return el("table", { className: className }, [el("thead", {}, [head]), el("tbody", {}, rows)]);
  }

  // -- charts ---------------------------------------------------------------------

  function niceMax(value) {
    if (!(value > 0)) {
      return 1;
    }
    const power = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 5, 10]) {
      if (value <= step * power) {
        return step * power;
      }
    }
    return 10 * power;
  }

  // The time a chart spans: what the page has seen, from one minute up to
  // `historyMs`, so that it fills from the first polls on.
  function span(seriesList, now) {
    let oldest = now;
    for (const s of seriesList) {
      if (s.points.length && s.points[0].t < oldest) {
        oldest = s.points[0].t;
      }
    }
    return Math.min(Math.max(now - oldest, MIN_SPAN), historyMs);
  }

  function ago(stepMs) {
    return stepMs % 60000 === 0 ? "-" + stepMs / 60000 + " min" : "-" + stepMs / 1000 + " s";
  }

  // One chart: a line per series over the last `width` ms up to `now`.
  function chart(title, seriesList, key, now, width, fixedMax, unit) {
    const W = 560, H = 190, left = 50, right = 12, top = 10, bottom = 24;
    const plotW = W - left - right, plotH = H - top - bottom;
    let yMax = fixedMax;
    if (yMax === null) {
      let highest = 0;
      for (const s of seriesList) {
        for (const p of s.points) {
          if (p[key] !== null && p[key] > highest) {
            highest = p[key];
          }
        }
      }
      yMax = niceMax(highest);
    }
    const x = (t) => left + ((t - (now - width)) / width) * plotW;
    const y = (v) => top + plotH - (Math.min(v, yMax) / yMax) * plotH;
    const box = svg("svg", {
      viewBox: "0 0 " + W + " " + H,
      class: "pools-chart",
      role: "img",
      "aria-label": title,
      "data-chart": key,
    });
    for (let i = 0; i <= 4; i++) {
      const v = (yMax * i) / 4;
      box.append(svg("line", { x1: left, x2: W - right, y1: y(v), y2: y(v), class: "pools-grid" }));
      const text = unit === "%" ? Math.round(v) + "%" : +v.toPrecision(3) + " " + unit;
      box.append(svg("text", { x: left - 5, y: y(v) + 4, class: "pools-axis", "text-anchor": "end", text: text }));
    }
    const step = TICKS.find((ms) => width / ms <= 6) || TICKS[TICKS.length - 1];
    for (let back = 0; back <= width + 1; back += step) {
      const anchor = back === 0 ? "end" : "middle";
      const label = back === 0 ? "now" : ago(back);
      box.append(svg("text", { x: x(now - back), y: H - 6, class: "pools-axis", "text-anchor": anchor, text: label }));
      box.append(svg("line", { x1: x(now - back), x2: x(now - back), y1: top, y2: top + plotH, class: "pools-grid" }));
    }
    // The total last, on top; a gap of several polls breaks a line.
    const ordered = seriesList.filter((s) => !s.total).concat(seriesList.filter((s) => s.total));
    for (const s of ordered) {
      let run = [];
      let previous = null;
      const flush = () => {
        let mark = null;
        if (run.length === 1) {
          mark = svg("circle", { cx: run[0][0], cy: run[0][1], r: 2.5, class: "pools-dot" });
          mark.style.fill = s.color;
        } else if (run.length > 1) {
          mark = svg("polyline", {
            points: run.map((pt) => pt[0].toFixed(1) + "," + pt[1].toFixed(1)).join(" "),
            class: "pools-line" + (s.total ? " pools-line-total" : ""),
          });
          mark.style.stroke = s.color;
        }
        if (mark) {
          mark.setAttribute("data-series", s.label);
          box.append(mark);
        }
        run = [];
      };
      for (const p of s.points) {
        if (p[key] === null || (previous !== null && p.t - previous > 4 * refreshMs + 2000)) {
          flush();
        }
        if (p[key] !== null) {
          run.push([x(p.t), y(p[key])]);
        }
        previous = p.t;
      }
      flush();
    }
    return el("figure", { className: "pools-figure" }, [el("figcaption", { text: title }), box]);
  }

  function legend(seriesList) {
    return el("ul", { className: "pools-legend" }, seriesList.map((s) => {
      const swatch = el("span", { className: "pools-swatch" });
      swatch.style.background = s.color;
      return el("li", {}, [swatch, s.label]);
    }));
  }

  // -- the page -------------------------------------------------------------------

  // Which servers the connections of an alias are on, over every process:
  // "127.0.0.1:5432 primary 8".
  function servers(rows) {
    const counts = new Map();
    rows.forEach(({ pool }) => {
      (pool.servers || []).forEach((server) => {
        const address = server.port === null ? server.host : server.host + ":" + server.port;
        const key = address + " " + server.role;
        counts.set(key, (counts.get(key) || 0) + server.connections);
      });
    });
    return Array.from(counts.entries()).map(([key, n]) => key + " " + n).join(", ");
  }

  function aliasSection(aliasName, rows, total, now, waitWindow) {
    const heading = el("h2", {}, [
      "Alias " + aliasName,
      el("span", { className: "pools-target", text: rows[0].pool.target }),
      el("span", { className: "pools-servers", text: servers(rows) }),
    ]);
    const poolRows = rows.map(({ process, pool }) =>
      poolRow(process.pid, "pid " + process.pid,
        process.program + " on " + process.host + ", " + process.age_s.toFixed(1) + "s ago", pool, false));
    const counterTable = (columns) => {
      const fields = columns.map((c) => c[1]);
      const body = rows.map(({ process, pool }) => counterRow(process.pid, "pid " + process.pid, pool, fields));
      if (total && rows.length > 1) {
        body.push(counterRow("total", "total", total, fields));
      }
      return table(["Process"].concat(columns.map((c) => c[0])), body, "pools-table pools-counters");
    };
    if (total && rows.length > 1) {
      poolRows.push(poolRow("total", "total", plural(total.processes, "process", "processes"), total, true));
    }
    const pools = table(
      ["Process", "Connections", "Lent", "Idle", "Free", "Size", "Min", "Max", "Waiting",
        "Wait p95 (ms)", "Oldest holder"],
      poolRows,
      "pools-table",
    );
    const series = Array.from((history.get(aliasName) || new Map()).values());
    const width = span(series, now);
    const charts = el("div", { className: "pools-charts" }, [
      chart("Utilisation: lent out / max_size", series, "util", now, width, 100, "%"),
      chart("Wait p95: time to get a connection", series, "p95", now, width, null, "ms"),
    ]);
    return el("section", { className: "module pools-alias", "data-alias": aliasName }, [
      heading,
      pools,
      charts,
      legend(series),
      el("div", { className: "pools-counters-pair" }, [
        el("div", {}, [
          el("h3", { text: "Requests since each process started (wait: last " + waitWindow + " borrows)" }),
          counterTable(REQUESTS),
        ]),
        el("div", {}, [el("h3", { text: "Connections since each process started" }), counterTable(CONNECTIONS)]),
      ]),
    ]);
  }

  function render(data) {
    const live = data.processes.filter((p) => !p.stale);
    const hosts = Array.from(new Set(live.map((p) => p.host))).sort();
    statusBox.textContent =
      plural(live.length, "process", "processes") + " on " + (hosts.join(", ") || data.host) +
      ", figures of " + clock(data.time) + ", refreshed every " + refreshMs / 1000 + " s";
    statusBox.dataset.time = String(data.time);
    statusBox.classList.remove("pools-outdated-status");
    root.classList.remove("pools-outdated");

    problemsBox.replaceChildren(...data.problems.map((text) => el("li", { text: text })));
    problemsBox.hidden = data.problems.length === 0;

    const now = data.time * 1000;
    const totals = new Map(data.totals.map((t) => [t.alias, t]));
    const sections = [];
    for (const [aliasName, rows] of byAlias(data)) {
      sections.push(aliasSection(aliasName, rows, totals.get(aliasName), now, data.wait_window));
    }
    if (!sections.length) {
      sections.push(el("p", {
        className: "pools-empty",
        text: "No running process on " + data.host + " publishes pool statistics (looked in " +
          data.directory + "). Start the server processes, or make sure they use the same " +
          "settings (POOLED_BACKEND_STATS_DIR).",
      }));
    }
    aliasesBox.replaceChildren(...sections);

    const stale = data.processes.filter((p) => p.stale);
    staleBox.replaceChildren(...stale.map((p) => el("li", {
      text: p.suspicious
        ? "Suspicious: pid " + p.pid + " on " + p.host + " (" + p.program + "): " +
          p.suspicious + "; its figures are not shown. No process of this project writes " +
          "such a snapshot: check who can write " + data.directory + "."
        : "Stale: pid " + p.pid + " on " + p.host + " (" + p.program + ") has published " +
          "nothing for " + p.age_s.toFixed(1) + "s; its figures are not shown.",
    })));
    staleBox.hidden = stale.length === 0;
    shownOnce = true;
  }

  // Keep the last figures, greyed out, and say why they are not fresh.
  function trouble(message) {
    statusBox.textContent = message + " (trying again every " + refreshMs / 1000 + " s)";
    statusBox.classList.add("pools-outdated-status");
    if (shownOnce) {
      root.classList.add("pools-outdated");
    }
  }

  async function poll() {
    try {
      const response = await fetch(dataUrl, {
        credentials: "same-origin",
        cache: "no-store",
        headers: { Accept: "application/json" },
      });
      let data = null;
      try {
        data = await response.json();
      } catch (err) {
        data = null;
      }
      if (response.ok && data) {
        record(data);
        render(data);
      } else {
        trouble(data && data.error ? data.error : "The server answered HTTP " + response.status + ".");
      }
    } catch (err) {
      trouble("Could not reach the server: " + err + ".");
    } finally {
      window.setTimeout(poll, refreshMs);
    }
  }

  poll();
})();
