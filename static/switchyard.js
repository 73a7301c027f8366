/* Switchyard pages: copy buttons, charts (Chart.js, served locally), the pricing editor and
 * live figures (WebSockets).
 * Everything here enhances server-rendered pages; they work without it. */
(function () {
  "use strict";

  var COLORS = { accent: "#3454d1", orange: "#d9731a", red: "#b3261e", grid: "#e6e9f0" };

  /* --- copy to clipboard ------------------------------------------------------------- */

  function announce(statusId, text) {
    var status = statusId && document.getElementById(statusId);
    if (status) status.textContent = text;
  }

  function copyWithSelection(field) {
    // Fallback for browsers (or insecure origins) without the asynchronous clipboard API.
    try {
      field.focus();
      field.select();
      field.setSelectionRange(0, field.value.length);
      return document.execCommand("copy");
    } catch (err) {
      return false;
    }
  }

  function onCopyClick(event) {
    var button = event.target.closest("[data-copy-target]");
    if (!button) return;
    var field = document.getElementById(button.getAttribute("data-copy-target"));
    if (!field) return;
    var statusId = button.getAttribute("data-copy-status");
    var value = field.value !== undefined ? field.value : field.textContent;
    var done = function () { announce(statusId, "Copied to the clipboard."); };
    var fallback = function () {
      if (copyWithSelection(field)) done();
      else announce(statusId, "Select the text and copy it with Ctrl+C (⌘C on a Mac).");
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(value).then(done, fallback);
    } else {
      fallback();
    }
  }

  /* --- charts ------------------------------------------------------------------------- */

  function readJson(id) {
    var node = document.getElementById(id);
    if (!node) return null;
    try {
      return JSON.parse(node.textContent);
    } catch (err) {
      return null;
    }
  }

  function chartUnavailable(canvas) {
    var note = document.createElement("p");
    note.className = "muted small";
    note.textContent = "The chart cannot be drawn here; the table below has the same figures.";
    canvas.replaceWith(note);
  }

  function dollars(value) {
    // Small spends stay readable: $0.000009 rather than 9.000000E-6.
    return "$" + Number(value).toLocaleString("en-US", { maximumSignificantDigits: 3, maximumFractionDigits: 9 });
  }

  function usageChart(canvas, data) {
    return new window.Chart(canvas, {
      data: {
        labels: data.labels,
        datasets: [
          {
            type: "bar",
            label: "Spend (USD)",
            data: data.spend_usd,
            backgroundColor: COLORS.accent,
            yAxisID: "spend",
            order: 2,
          },
          {
            type: "line",
            label: "Requests",
            data: data.requests,
            borderColor: COLORS.orange,
            backgroundColor: COLORS.orange,
            cubicInterpolationMode: "monotone",
            yAxisID: "requests",
            order: 1,
          },
          {
            type: "line",
            label: "Errors",
            data: data.errors,
            borderColor: COLORS.red,
            backgroundColor: COLORS.red,
            borderDash: [4, 4],
            cubicInterpolationMode: "monotone",
            yAxisID: "requests",
            order: 0,
          },
        ],
      },
      options: {
        animation: false,
        responsive: true,
        maintainAspectRatio: false,
        interaction: { mode: "index", intersect: false },
        plugins: {
          legend: { position: "bottom" },
          tooltip: {
            callbacks: {
              label: function (item) {
                var value = item.dataset.yAxisID === "spend" ? dollars(item.parsed.y) : item.parsed.y;
                return item.dataset.label + ": " + value;
              },
            },
          },
        },
        scales: {
          x: {
            grid: { display: false },
            ticks: {
              maxRotation: 0,
              autoSkip: true,
              callback: function (value) { return String(this.getLabelForValue(value)).slice(5); },
            },
          },
          spend: {
            type: "linear",
            position: "left",
            beginAtZero: true,
            ticks: { callback: dollars, maxTicksLimit: 6 },
            title: { display: true, text: "Spend (USD)" },
            grid: { color: COLORS.grid },
          },
          requests: {
            type: "linear",
            position: "right",
            beginAtZero: true,
            ticks: { precision: 0 },
            title: { display: true, text: "Requests" },
            grid: { drawOnChartArea: false },
          },
        },
      },
    });
  }

  function initCharts(root) {
    var canvases = (root || document).querySelectorAll("canvas[data-chart='usage']");
    canvases.forEach(function (canvas) {
      if (!window.Chart) return chartUnavailable(canvas);
      var existing = window.Chart.getChart(canvas);
      if (existing) existing.destroy();
      var data = readJson(canvas.getAttribute("data-source"));
      if (data) usageChart(canvas, data);
    });
  }

  /* --- the pricing editor ----------------------------------------------------------- */

  // The same rule as vendors.pricing.surge_multiplier: linear interpolation between the
  // points, flat after the last one, never below 1 and never above the cap.
  function surgeMultiplier(curve, utilisation, cap) {
    var u = Math.min(Math.max(utilisation, 0), 1);
    var multiplier = curve[0][1];
    for (var i = 0; i + 1 < curve.length; i++) {
      var u0 = curve[i][0], m0 = curve[i][1], u1 = curve[i + 1][0], m1 = curve[i + 1][1];
      if (u <= u0) break;
      if (u >= u1) { multiplier = m1; continue; }
      multiplier = m0 + (m1 - m0) * (u - u0) / (u1 - u0);
      break;
    }
    return Math.max(1, Math.min(multiplier, cap));
  }

  // The same rules as vendors.pricing.validate_surge_curve (utilisation here in 0..1).
  function curveProblem(curve) {
    if (!curve.length) return "Add at least one point.";
    var previousU = -1, previousM = 1;
    for (var i = 0; i < curve.length; i++) {
      var u = curve[i][0], m = curve[i][1];
      if (u < 0 || u > 1) return "Utilisation must lie between 0 and 100 %.";
      if (u <= previousU) return "Utilisation must increase from one point to the next.";
      if (m < 1 || m < previousM) return "Multipliers start at 1 or more and never decrease.";
      if (m > 100) return "A multiplier above 100 is not accepted.";
      previousU = u;
      previousM = m;
    }
    return null;
  }

  function numberOf(form, name) {
    var field = form.elements.namedItem(name);
    if (!field || field.value.trim() === "") return null;
    var value = Number(field.value);
    return Number.isFinite(value) ? value : NaN;
  }

  function readPricing(form) {
    var curve = [];
    var incomplete = false;
    form.querySelectorAll("input[data-axis='u']").forEach(function (field) {
      var i = field.getAttribute("data-point");
      var u = numberOf(form, "u_" + i), m = numberOf(form, "m_" + i);
      if (u === null && m === null) return;
      if (u === null || m === null || Number.isNaN(u) || Number.isNaN(m)) { incomplete = true; return; }
      curve.push([u / 100, m]);
    });
    return {
      input: numberOf(form, "price_input_usd"),
      output: numberOf(form, "price_output_usd"),
      cap: numberOf(form, "surge_cap"),
      curve: curve,
      incomplete: incomplete,
    };
  }

  function money(value) {
    return "$" + value.toFixed(4);
  }

  function updatePricing(form) {
    var pricing = readPricing(form);
    var status = form.querySelector("[data-curve-status]");
    var problem = pricing.incomplete ? "Fill in both values of each point, or clear it." : curveProblem(pricing.curve);
    if (!problem && (pricing.cap === null || Number.isNaN(pricing.cap) || pricing.cap < 1)) problem = "The surge cap is at least 1.";
    if (!problem && [pricing.input, pricing.output].some(function (v) { return v === null || Number.isNaN(v) || v < 0; })) problem = "Enter both base prices (0 or more).";
    if (status) status.textContent = problem || "The curve is valid.";
    if (status) status.className = problem ? "result result-fail" : "result result-pass";
    if (problem) return;

    var xs = [], inputs = [], outputs = [];
    for (var step = 0; step <= 100; step++) {
      var multiplier = surgeMultiplier(pricing.curve, step / 100, pricing.cap);
      xs.push(step);
      inputs.push({ x: step, y: pricing.input * multiplier });
      outputs.push({ x: step, y: pricing.output * multiplier });
    }
    form.querySelectorAll("output[data-preview]").forEach(function (out) {
      var parts = out.getAttribute("data-preview").split(":");
      var multiplier = surgeMultiplier(pricing.curve, Number(parts[1]) / 100, pricing.cap);
      var base = parts[0] === "input" ? pricing.input : pricing.output;
      out.textContent = parts[0] === "multiplier" ? multiplier.toFixed(2) + "×" : money(base * multiplier);
    });

    var canvas = form.querySelector("canvas[data-chart='pricing']");
    if (!canvas) return;
    if (!window.Chart) return chartUnavailable(canvas);
    var chart = window.Chart.getChart(canvas);
    if (chart) {
      chart.data.datasets[0].data = inputs;
      chart.data.datasets[1].data = outputs;
      chart.update();
      return;
    }
    new window.Chart(canvas, {
      type: "line",
      data: {
        datasets: [
          { label: "Input $/1M tokens", data: inputs, borderColor: COLORS.accent, backgroundColor: COLORS.accent, pointRadius: 0, borderWidth: 2 },
          { label: "Output $/1M tokens", data: outputs, borderColor: COLORS.orange, backgroundColor: COLORS.orange, pointRadius: 0, borderWidth: 2 },
        ],
      },
      options: {
        animation: false,
        responsive: true,
        maintainAspectRatio: false,
        interaction: { mode: "index", intersect: false },
        plugins: { legend: { position: "bottom" } },
        scales: {
          x: { type: "linear", min: 0, max: 100, title: { display: true, text: "Utilisation (%)" }, grid: { color: COLORS.grid } },
          y: { beginAtZero: true, title: { display: true, text: "USD per million tokens" }, grid: { color: COLORS.grid } },
        },
      },
    });
  }

  function initPricing(root) {
    (root || document).querySelectorAll("form[data-pricing-editor]").forEach(function (form) {
      if (form.dataset.ready) return;
      form.dataset.ready = "1";
      form.addEventListener("input", function () { updatePricing(form); });
      updatePricing(form);
    });
  }

  /* --- live figures (Channels) ------------------------------------------------------- */

  // Messages are {kind: "figures", mode: "add" | "set", values: {key: value}}; every element
  // with data-live-key="key" shows the value in its data-live-format, formatted like the
  // server's template filters (marketplace/templatetags/switchyard.py).
  var DASH = "—";

  function usd(nanos, places) {
    // Integer arithmetic on nano-dollars (exact below 2^53), rounded half up like format_usd.
    var unit = Math.pow(10, 9 - places);
    var n = Math.abs(nanos);
    var scaled = Math.floor(n / unit) + ((n % unit) * 2 >= unit ? 1 : 0);
    var base = Math.pow(10, places);
    var fraction = String(scaled % base);
    while (fraction.length < places) fraction = "0" + fraction;
    return (nanos < 0 ? "-$" : "$") + Math.floor(scaled / base) + "." + fraction;
  }

  var LIVE_FORMATS = {
    usd: function (v) { return usd(Number(v), 6); },
    price: function (v) { return usd(Number(v), 4); },
    int: function (v) { return Math.round(Number(v)).toLocaleString("en-US"); },
    percent: function (v) { return (Number(v) * 100).toFixed(1) + " %"; },
    ms: function (v) { return Math.round(Number(v)).toLocaleString("en-US") + " ms"; },
    rate: function (v) { return Number(v).toFixed(1) + "/s"; },
    text: function (v) { return String(v); },
  };

  function showFigure(node, value) {
    var format = LIVE_FORMATS[node.getAttribute("data-live-format")] || LIVE_FORMATS.text;
    var text = value === null || value === undefined ? DASH : format(value);
    node.setAttribute("data-live-value", value === null || value === undefined ? "" : String(value));
    if (node.textContent === text) return;
    node.textContent = text;
    node.classList.remove("live-changed");
    void node.offsetWidth; // restart the highlight
    node.classList.add("live-changed");
  }

  function applyFigures(message) {
    if (!message || message.kind !== "figures" || !message.values) return;
    Object.keys(message.values).forEach(function (key) {
      var nodes = document.querySelectorAll('[data-live-key="' + key.replace(/"/g, "") + '"]');
      nodes.forEach(function (node) {
        var value = message.values[key];
        if (message.mode === "add") {
          var current = Number(node.getAttribute("data-live-value") || 0);
          value = (Number.isFinite(current) ? current : 0) + Number(value);
        }
        showFigure(node, value);
      });
    });
  }

  var liveSockets = {};

  function liveStatus(path, state, text) {
    document.querySelectorAll("[data-live-socket]").forEach(function (root) {
      if (root.getAttribute("data-live-socket") !== path) return;
      root.querySelectorAll("[data-live-status]").forEach(function (status) {
        status.setAttribute("data-state", state);
        status.textContent = text;
      });
    });
  }

  function openLive(path) {
    var entry = liveSockets[path] || (liveSockets[path] = { attempts: 0, socket: null });
    if (!("WebSocket" in window)) return;
    var scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    var socket = new WebSocket(scheme + window.location.host + path);
    entry.socket = socket;
    socket.addEventListener("open", function () {
      entry.attempts = 0;
      liveStatus(path, "live", "Live");
    });
    socket.addEventListener("message", function (event) {
      try {
        applyFigures(JSON.parse(event.data));
      } catch (err) {
        /* a malformed message is ignored; the next one brings the figures */
      }
    });
    socket.addEventListener("close", function () {
      entry.socket = null;
      // Back off (1 s, 2 s, 4 s ... 30 s, with jitter); the page keeps its last figures.
      var delay = Math.min(30000, 1000 * Math.pow(2, entry.attempts)) * (0.75 + Math.random() / 2);
      entry.attempts += 1;
      liveStatus(path, "waiting", "Reconnecting…");
      window.setTimeout(function () { openLive(path); }, delay);
    });
  }

  function initLive(root) {
    (root || document).querySelectorAll("[data-live-socket]").forEach(function (node) {
      var path = node.getAttribute("data-live-socket");
      if (!liveSockets[path]) openLive(path);
      else if (liveSockets[path].socket && liveSockets[path].socket.readyState === 1) liveStatus(path, "live", "Live");
    });
  }

  /* --- playground: stream an answer through the console, then show its route trace ----- */

  var ROUTE_FIELDS = {
    auto: [], endpoint: ["endpoint"], tag: ["tag"], cheapest: ["tag"], fastest: ["tag"],
    cascade: ["tag", "cascade_threshold"], orchestrate: ["generalist"],
  };

  function fieldBox(form, name) {
    var control = form.querySelector("[name='" + name + "']");
    return control ? control.closest(".field") : null;
  }

  function showRouteFields(form) {
    var checked = form.querySelector("input[name='route']:checked");
    var wanted = ROUTE_FIELDS[checked ? checked.value : "auto"] || [];
    ["tag", "endpoint", "cascade_threshold", "generalist"].forEach(function (name) {
      var box = fieldBox(form, name);
      if (box) box.hidden = wanted.indexOf(name) < 0;
    });
  }

  function clearErrors(form) {
    form.querySelectorAll("ul.errorlist[data-client]").forEach(function (node) { node.remove(); });
    form.querySelectorAll("[aria-invalid]").forEach(function (node) { node.removeAttribute("aria-invalid"); });
    var banner = form.querySelector("[data-playground-error]");
    banner.hidden = true;
    banner.textContent = "";
  }

  function showErrors(form, message, errors) {
    var banner = form.querySelector("[data-playground-error]");
    banner.textContent = message;
    banner.hidden = false;
    Object.keys(errors || {}).forEach(function (name) {
      var box = fieldBox(form, name);
      if (!box) { banner.textContent += " " + errors[name].join(" "); return; }
      box.hidden = false;
      var list = document.createElement("ul");
      list.className = "errorlist";
      list.setAttribute("data-client", "1");
      list.id = "id_" + name + "_client_error";
      errors[name].forEach(function (text) {
        var item = document.createElement("li");
        item.textContent = text;
        list.appendChild(item);
      });
      box.appendChild(list);
      var control = box.querySelector("[name='" + name + "']");
      if (control) {
        control.setAttribute("aria-invalid", "true");
        control.setAttribute("aria-describedby", list.id);
      }
    });
  }

  function setFact(root, name, text) {
    var node = root.querySelector("[data-fact='" + name + "']");
    if (node) node.textContent = text;
  }

  function loadTrace(form, requestId) {
    var box = document.querySelector("[data-playground-trace]");
    document.querySelector("[data-playground-trace-box]").hidden = false;
    box.innerHTML = '<p class="muted">Loading the route trace…</p>';
    return fetch(form.dataset.traceUrl + "?id=" + encodeURIComponent(requestId), { credentials: "same-origin" })
      .then(function (response) { return response.text(); })
      .then(function (html) { box.innerHTML = html; })
      .catch(function () { box.innerHTML = '<p class="alert alert-warning">The route trace could not be loaded.</p>'; });
  }

  function runPlayground(form, event) {
    event.preventDefault();
    clearErrors(form);
    var status = form.querySelector("[data-playground-status]");
    var button = form.querySelector("[data-playground-send]");
    var result = document.querySelector("[data-playground-result]");
    var answer = result.querySelector("[data-playground-answer]");
    var requestId = null;
    var failed = false;
    button.disabled = true;
    status.textContent = "Sending…";
    fetch(form.action, {
      method: "POST",
      body: new FormData(form),
      credentials: "same-origin",
      headers: { "X-CSRFToken": form.querySelector("[name='csrfmiddlewaretoken']").value },
    }).then(function (response) {
      var type = response.headers.get("content-type") || "";
      if (!response.ok || type.indexOf("text/event-stream") < 0) {
        return response.json().catch(function () { return { error: "The request failed (" + response.status + ")." }; })
          .then(function (body) { failed = true; showErrors(form, body.error || "The request failed.", body.errors); });
      }
      requestId = response.headers.get("x-switchyard-request-id");
      // An orchestrated run streams its generalist's last turn: the plan's id is the one
      // to trace, and its total cost is in the trace, not in that turn's usage.
      var orchestrated = !!response.headers.get("x-switchyard-orchestration");
      result.hidden = false;
      answer.textContent = "";
      ["endpoint", "vendor", "cost", "tokens"].forEach(function (name) { setFact(result, name, "…"); });
      status.textContent = "Streaming…";
      var reader = response.body.getReader();
      var decoder = new TextDecoder();
      var buffer = "";
      function handle(data) {
        if (data === "[DONE]") return;
        var chunk;
        try { chunk = JSON.parse(data); } catch (err) { return; }
        if (chunk.error) {
          failed = true;
          showErrors(form, chunk.error.message || "The answer broke off.");
          return;
        }
        (chunk.choices || []).forEach(function (choice) {
          if (choice.delta && choice.delta.content) answer.textContent += choice.delta.content;
        });
        if (chunk.switchyard) {
          setFact(result, "endpoint", chunk.switchyard.endpoint || "—");
          setFact(result, "vendor", chunk.switchyard.vendor || "—");
          if (!orchestrated) requestId = chunk.switchyard.request_id || requestId;
        }
        if (orchestrated && chunk.usage) {
          setFact(result, "cost", "every leg: see the plan below");
          setFact(result, "tokens", "every leg: see the plan below");
        } else if (chunk.usage && chunk.usage.cost_nanos !== undefined) {
          setFact(result, "cost", "$" + (chunk.usage.cost_nanos / 1e9).toFixed(9).replace(/0+$/, "").replace(/\.$/, ""));
          setFact(result, "tokens", chunk.usage.prompt_tokens + " in, " + chunk.usage.completion_tokens + " out");
        }
      }
      function pump() {
        return reader.read().then(function (step) {
          if (step.done) return;
          buffer += decoder.decode(step.value, { stream: true });
          var events = buffer.split("\n\n");
          buffer = events.pop();
          events.forEach(function (event) {
            event.split("\n").forEach(function (line) {
              if (line.indexOf("data: ") === 0) handle(line.slice(6));
            });
          });
          return pump();
        });
      }
      return pump().then(function () {
        if (requestId) return loadTrace(form, requestId);
      });
    }).catch(function () {
      failed = true;
      showErrors(form, "The connection broke; try again.");
    }).then(function () {
      button.disabled = false;
      status.textContent = failed ? "" : "Done.";
    });
  }

  function initPlayground(root) {
    (root || document).querySelectorAll("form[data-playground]").forEach(function (form) {
      if (form.dataset.ready) return;
      form.dataset.ready = "1";
      form.addEventListener("change", function () { showRouteFields(form); });
      form.addEventListener("submit", function (event) { runPlayground(form, event); });
      showRouteFields(form);
    });
  }

  /* --- start ------------------------------------------------------------------------- */

  window.Switchyard = { surgeMultiplier: surgeMultiplier, curveProblem: curveProblem, usd: usd };

  document.addEventListener("click", onCopyClick);
  function revealCurrentTab() {
    // On a phone the section tabs scroll sideways: bring the current one into view.
    document.querySelectorAll(".subnav").forEach(function (nav) {
      var current = nav.querySelector("[aria-current='page']");
      if (current) nav.scrollLeft = current.offsetLeft - (nav.clientWidth - current.offsetWidth) / 2;
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    revealCurrentTab();
    initCharts(document);
    initPricing(document);
    initLive(document);
    initPlayground(document);
  });
  document.addEventListener("htmx:afterSettle", function (event) {
    initCharts(event.target);
    initPricing(event.target);
    initLive(event.target);
  });
})();
