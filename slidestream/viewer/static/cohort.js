// Cohort page: the `slidestream query` statistics per group as a table, a box/strip plot of
// the first metric per group and a scatter of two metrics, with CSV downloads.
(function () {
  "use strict";
  const form = document.getElementById("cohort-form");
  const by = document.getElementById("by"), cls = document.getElementById("class");
  const metric = document.getElementById("metric"), metric2 = document.getElementById("metric2");
  const where = document.getElementById("where"), flagged = document.getElementById("include_flagged");
  const errorEl = document.getElementById("cohort-error");
  const state = (window.slidestreamCohort = { loaded: false, errors: [] });
  let options = null;

  function option(select, value, label) {
    const o = document.createElement("option");
    o.value = value; o.textContent = label || value;
    select.appendChild(o);
  }
  function json(url) {
    return fetch(url).then((r) => r.ok ? r.json() :
      r.json().catch(() => ({ error: r.statusText })).then((e) => { throw new Error(e.error || r.statusText); }));
  }
  function showError(err) {
    errorEl.textContent = String(err && err.message || err);
    errorEl.hidden = false;
    state.errors.push(errorEl.textContent);
  }
  function fillMetrics() {
    const list = cls.value ? options.class_metrics : options.slide_metrics;
    const keep1 = metric.value, keep2 = metric2.value;
    metric.replaceChildren(); metric2.replaceChildren();
    option(metric2, "", "(none)");
    list.forEach((m) => { option(metric, m); option(metric2, m); });
    metric.value = list.includes(keep1) ? keep1 : (list.includes("nuclei_per_mm2") ? "nuclei_per_mm2" : list[0]);
    const second = cls.value ? "area_mm2" : "tissue_area_mm2";
    if (list.includes(keep2)) metric2.value = keep2;
    else if (list.includes(second) && metric.value !== second) metric2.value = second;
  }
  function params() {
    const q = new URLSearchParams();
    if (by.value) q.append("by", by.value);
    if (cls.value) q.append("class", cls.value);
    q.append("metric", metric.value);
    if (metric2.value && metric2.value !== metric.value) q.append("metric", metric2.value);
    where.value.split(/[;,]/).map((w) => w.trim()).filter(Boolean).forEach((w) => q.append("where", w));
    if (flagged.checked) q.append("include_flagged", "1");
    return q;
  }
  function run(event) {
    if (event) event.preventDefault();
    errorEl.hidden = true;
    const q = params();
    document.getElementById("csv-summary").href = "/api/cohort.csv?" + q.toString();
    document.getElementById("csv-slides").href = "/api/cohort.csv?" + q.toString() + "&per=slide";
    json("/api/cohort?" + q.toString()).then(draw).catch(showError);
  }
  function draw(result) {
    const fmt = ssPlots.fmt;
    const tableEl = document.getElementById("cohort-table");
    tableEl.replaceChildren();
    const table = document.createElement("table");
    const columns = [...result.by, "metric", "n", "mean", "median", "std", "q1", "q3"];
    const head = table.createTHead().insertRow();
    columns.forEach((c) => { const th = document.createElement("th"); th.textContent = c; head.appendChild(th); });
    const body = table.createTBody();
    result.summary.forEach((row) => {
      const tr = body.insertRow();
      columns.forEach((c) => {
        const td = tr.insertCell();
        const v = row[c];
        td.textContent = typeof v === "number" ? fmt(v) : (v === null || v === undefined ? "(none)" : String(v));
        if (typeof v === "number") td.className = "num";
      });
    });
    tableEl.appendChild(table);
    const m1 = result.metrics[0], m2 = result.metrics[1];
    const groups = new Map();
    result.slides.forEach((s) => {
      const key = s.group.length ? s.group.map((g) => g === null ? "(none)" : g).join(" / ") : "all slides";
      if (!groups.has(key)) groups.set(key, []);
      groups.get(key).push({ v: s.values[m1], name: s.name });
    });
    const suffix = result.tissue_class ? ` (${result.tissue_class})` : "";
    document.getElementById("box-title").textContent = `${m1}${suffix} per ${result.by[0] || "cohort"}`;
    ssPlots.box(document.getElementById("box-plot"),
      Array.from(groups, ([label, values]) => ({ label: label, values: values })), { yLabel: m1 });
    const scatterEl = document.getElementById("scatter-plot");
    if (m2) {
      document.getElementById("scatter-title").textContent = `${m2} against ${m1}${suffix}`;
      ssPlots.scatter(scatterEl, result.slides.map((s) => ({
        x: s.values[m1], y: s.values[m2], name: s.name,
        group: s.group.length ? s.group.map((g) => g === null ? "(none)" : g).join(" / ") : "all slides",
      })), { xLabel: m1, yLabel: m2 });
    } else {
      scatterEl.replaceChildren();
      document.getElementById("scatter-title").textContent = "Scatter (choose a second metric)";
    }
    state.loaded = true;
    state.result = result;
  }

  json("/api/cohort/options").then((opts) => {
    options = opts;
    opts.by.forEach((k) => option(by, k));
    opts.classes.forEach((c) => option(cls, c));
    fillMetrics();
    cls.addEventListener("change", fillMetrics);
    form.addEventListener("submit", run);
    run();
  }).catch(showError);
})();
