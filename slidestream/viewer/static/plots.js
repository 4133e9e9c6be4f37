// Small SVG plots (bar, box + strip, scatter) without a plotting library. Text is set with
// textContent only, so names from the data never become markup.
(function () {
  "use strict";
  const NS = "http://www.w3.org/2000/svg";
  const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1",
    "#ff9da7", "#9c755f", "#bab0ac"];

  function el(name, attrs, parent) {
    const node = document.createElementNS(NS, name);
    Object.entries(attrs || {}).forEach(([k, v]) => node.setAttribute(k, String(v)));
    if (parent) parent.appendChild(node);
    return node;
  }
  function text(parent, x, y, content, attrs) {
    const t = el("text", Object.assign({ x: x, y: y }, attrs || {}), parent);
    t.textContent = content;
    return t;
  }
  function nice(max) {
    if (!(max > 0)) return 1;
    const e = Math.pow(10, Math.floor(Math.log10(max)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * e >= max) return m * e;
    return 10 * e;
  }
  function fmt(v) {
    if (v === null || v === undefined || !Number.isFinite(v)) return "–";
    const a = Math.abs(v);
    if (Number.isInteger(v)) return v.toLocaleString("en");
    if (a >= 1000) return Math.round(v).toLocaleString("en");
    if (a >= 10) return v.toFixed(1);
    if (a >= 1) return v.toFixed(2);
    return v.toPrecision(3);
  }
  function ticks(lo, hi, n) {
    const span = hi - lo || 1;
    const step = nice(span / n);
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(v);
    return out;
  }
  function svg(container, width, height) {
    container.replaceChildren();
    return el("svg", { viewBox: `0 0 ${width} ${height}`, width: width, height: height, role: "img" }, container);
  }

  // items: [{label, value, colour}] -> horizontal bars
  function bar(container, items, opts) {
    opts = opts || {};
    const rowH = 18, left = opts.left || 90, width = opts.width || 330;
    const height = items.length * rowH + 24;
    const s = svg(container, width, height);
    const max = opts.max || nice(Math.max(0, ...items.map((d) => d.value || 0)));
    const plotW = width - left - 50;
    items.forEach((d, i) => {
      const y = 4 + i * rowH;
      text(s, left - 4, y + 12, d.label, { "text-anchor": "end" });
      const w = Math.max(0, ((d.value || 0) / max) * plotW);
      el("rect", { x: left, y: y + 2, width: w, height: rowH - 6, fill: d.colour || PALETTE[i % 10] }, s);
      text(s, left + w + 4, y + 12, d.valueLabel || fmt(d.value));
    });
    if (opts.unit) text(s, left, height - 4, opts.unit, { fill: "#777" });
    return s;
  }

  // groups: [{label, values: [{v, name}]}] -> box (quartiles of the points) and jittered strip
  function box(container, groups, opts) {
    opts = opts || {};
    const width = opts.width || 460, height = opts.height || 280;
    const m = { l: 56, r: 10, t: 10, b: 46 };
    const s = svg(container, width, height);
    const all = groups.flatMap((g) => g.values.map((p) => p.v)).filter(Number.isFinite);
    if (!all.length) { text(s, 10, 20, "no values"); return s; }
    let lo = Math.min(...all), hi = Math.max(...all);
    if (lo === hi) { lo -= 1; hi += 1; }
    const pad = (hi - lo) * 0.05; lo -= pad; hi += pad;
    const y = (v) => m.t + (height - m.t - m.b) * (1 - (v - lo) / (hi - lo));
    const bandW = (width - m.l - m.r) / groups.length;
    ticks(lo, hi, 5).forEach((v) => {
      el("line", { x1: m.l, x2: width - m.r, y1: y(v), y2: y(v), stroke: "#eee" }, s);
      text(s, m.l - 4, y(v) + 3, fmt(v), { "text-anchor": "end" });
    });
    groups.forEach((g, i) => {
      const cx = m.l + bandW * (i + 0.5);
      const vals = g.values.map((p) => p.v).filter(Number.isFinite).sort((a, b) => a - b);
      const colour = PALETTE[i % 10];
      if (vals.length) {
        const q = (p) => { const k = (vals.length - 1) * p, f = Math.floor(k), c = Math.ceil(k);
          return vals[f] + (vals[c] - vals[f]) * (k - f); };
        const q1 = q(0.25), med = q(0.5), q3 = q(0.75);
        const bw = Math.min(60, bandW * 0.5);
        el("line", { x1: cx, x2: cx, y1: y(vals[0]), y2: y(vals[vals.length - 1]), stroke: "#999" }, s);
        el("rect", { x: cx - bw / 2, y: y(q3), width: bw, height: Math.max(1, y(q1) - y(q3)),
          fill: colour, "fill-opacity": 0.18, stroke: colour }, s);
        el("line", { x1: cx - bw / 2, x2: cx + bw / 2, y1: y(med), y2: y(med), stroke: colour, "stroke-width": 2 }, s);
      }
      g.values.forEach((p, j) => {
        if (!Number.isFinite(p.v)) return;
        const jitter = ((j * 0.6180339887) % 1 - 0.5) * Math.min(40, bandW * 0.6);
        const dot = el("circle", { cx: cx + jitter, cy: y(p.v), r: 3, fill: colour, "fill-opacity": 0.75,
          class: "point" }, s);
        el("title", {}, dot).textContent = `${p.name}: ${fmt(p.v)}`;
      });
      text(s, cx, height - m.b + 14, g.label, { "text-anchor": "middle" });
      text(s, cx, height - m.b + 26, `n = ${g.values.filter((p) => Number.isFinite(p.v)).length}`,
        { "text-anchor": "middle", fill: "#777" });
    });
    if (opts.yLabel) text(s, 4, m.t + 2, opts.yLabel, { fill: "#555", "dominant-baseline": "hanging" });
    return s;
  }

  // points: [{x, y, name, group}] -> scatter coloured by group
  function scatter(container, points, opts) {
    opts = opts || {};
    const width = opts.width || 460, height = opts.height || 300;
    const m = { l: 56, r: 10, t: 10, b: 40 };
    const s = svg(container, width, height);
    const pts = points.filter((p) => Number.isFinite(p.x) && Number.isFinite(p.y));
    if (!pts.length) { text(s, 10, 20, "no values"); return s; }
    const range = (vals) => { let lo = Math.min(...vals), hi = Math.max(...vals);
      if (lo === hi) { lo -= 1; hi += 1; } const p = (hi - lo) * 0.05; return [lo - p, hi + p]; };
    const [x0, x1] = range(pts.map((p) => p.x)), [y0, y1] = range(pts.map((p) => p.y));
    const X = (v) => m.l + (width - m.l - m.r) * (v - x0) / (x1 - x0);
    const Y = (v) => m.t + (height - m.t - m.b) * (1 - (v - y0) / (y1 - y0));
    ticks(y0, y1, 5).forEach((v) => {
      el("line", { x1: m.l, x2: width - m.r, y1: Y(v), y2: Y(v), stroke: "#eee" }, s);
      text(s, m.l - 4, Y(v) + 3, fmt(v), { "text-anchor": "end" });
    });
    ticks(x0, x1, 5).forEach((v) => text(s, X(v), height - m.b + 14, fmt(v), { "text-anchor": "middle" }));
    const groups = Array.from(new Set(pts.map((p) => p.group)));
    pts.forEach((p) => {
      const dot = el("circle", { cx: X(p.x), cy: Y(p.y), r: 3.5, class: "point",
        fill: PALETTE[groups.indexOf(p.group) % 10], "fill-opacity": 0.8 }, s);
      el("title", {}, dot).textContent = `${p.name} (${p.group}): ${fmt(p.x)}, ${fmt(p.y)}`;
    });
    if (opts.xLabel) text(s, width - m.r, height - 6, opts.xLabel, { "text-anchor": "end", fill: "#555" });
    if (opts.yLabel) text(s, 4, m.t + 2, opts.yLabel, { fill: "#555", "dominant-baseline": "hanging" });
    if (groups.length > 1) groups.forEach((g, i) => {
      el("circle", { cx: m.l + 10, cy: m.t + 20 + i * 13, r: 4, fill: PALETTE[i % 10] }, s);
      text(s, m.l + 18, m.t + 24 + i * 13, g);
    });
    return s;
  }

  window.ssPlots = { bar: bar, box: box, scatter: scatter, fmt: fmt, palette: PALETTE };
})();
