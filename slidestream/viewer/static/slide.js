// Slide page: OpenSeadragon deep zoom of the slide, the server's nucleus tiles as a second
// image, tissue classes and (zoomed in) nucleus outlines as vectors on a canvas above it, a
// scale bar, a nucleus pop-up on click, and the summary's statistics in the side panel.
// window.slidestreamViewer exposes the loading state (used by the browser test).
(function () {
  "use strict";
  const name = document.body.dataset.slide;
  const base = "/api/slides/" + encodeURIComponent(name);
  const VECTOR_MAX_UM_PER_PX = 0.8;   // outlines once a 7 µm nucleus is >= ~9 screen px
  const VECTOR_LIMIT = 6000;
  const state = (window.slidestreamViewer = {
    slideOpen: false, slideLoaded: false, nucleiLoaded: false, tissueDrawn: false,
    statsDrawn: false, vectorNuclei: 0, vectorMode: false, errors: [],
  });
  const statusEl = document.getElementById("viewer-status");
  const canvas = document.getElementById("vector-layer");
  const ctx = canvas.getContext("2d");
  let viewer = null, slideImage = null, nucleiImage = null, info = null;
  let tissue = [];          // [{name, colour, rings: [Float64Array], area_mm2}]
  let vectors = null;       // {box, features: [{rings, colour, props, cx, cy}]}
  let fetchTimer = null, fetchSeq = 0;

  function json(url) {
    return fetch(url).then((r) => r.ok ? r.json() :
      r.json().catch(() => ({ error: r.statusText })).then((e) => { throw new Error(e.error || r.statusText); }));
  }
  function rgba(c, a) { return `rgba(${c[0]},${c[1]},${c[2]},${a})`; }
  function fail(err) {
    state.errors.push(String(err && err.message || err));
    statusEl.textContent = String(err && err.message || err);
  }

  // ---------------------------------------------------------------- set-up
  json(base).then(start).catch(fail);

  // Hooks for scripts and tests: centre level-0 (x, y) at `scale` screen px per level-0 px,
  // and select the nucleus at level-0 (x, y) as a click there would.
  state.zoomTo = (x, y, scale) => {
    viewer.viewport.zoomTo(slideImage.imageToViewportZoom(scale), null, true);
    viewer.viewport.panTo(slideImage.imageToViewportCoordinates(x, y), true);
  };
  state.clickAt = (x, y) => selectAt(new OpenSeadragon.Point(x, y));

  function start(slideInfo) {
    info = slideInfo;
    viewer = OpenSeadragon({
      id: "viewer",
      prefixUrl: "/static/openseadragon/images/",
      tileSources: base + "/slide.dzi",
      drawer: "canvas",
      showNavigator: true,
      navigatorPosition: "BOTTOM_RIGHT",
      showRotationControl: false,
      maxZoomPixelRatio: 2,
      visibilityRatio: 0.5,
      timeout: 120000,
      gestureSettingsMouse: { clickToZoom: false },
    });
    viewer.addHandler("open-failed", (e) => fail("cannot open the slide: " + (e.message || "")));
    viewer.addOnceHandler("open", () => {
      slideImage = viewer.world.getItemAt(0);
      state.slideOpen = true;
      watchLoaded(slideImage, "slideLoaded");
      if (info.layers.nuclei) addNucleiLayer();
      else state.nucleiLoaded = true;
      resize();
      redraw();
    });
    viewer.addHandler("update-viewport", redraw);
    viewer.addHandler("animation-finish", scheduleVectors);
    viewer.addHandler("resize", () => { resize(); redraw(); });
    viewer.addHandler("canvas-click", onClick);
    if (info.layers.tissue) json(base + "/tissue").then(loadTissue).catch(fail);
    else state.tissueDrawn = true;
    json(base + "/summary").then(drawStats).catch(fail);
    bindControls();
    drawLegends();
  }

  function watchLoaded(image, flag) {
    const check = () => { if (image.getFullyLoaded()) state[flag] = true; };
    image.addHandler("fully-loaded-change", (e) => { if (e.fullyLoaded) state[flag] = true; });
    check();
  }

  function addNucleiLayer() {
    viewer.addTiledImage({
      tileSource: base + "/nuclei.dzi",
      opacity: layerOpacity("nuclei"),
      success: (e) => { nucleiImage = e.item; watchLoaded(nucleiImage, "nucleiLoaded"); applyNucleiOpacity(); },
      error: (e) => fail("nucleus overlay: " + (e.message || "failed")),
    });
  }

  // ---------------------------------------------------------------- controls and legends
  function layerOpacity(layer) {
    const on = document.getElementById("show-" + layer).checked;
    return on ? Number(document.getElementById("opacity-" + layer).value) / 100 : 0;
  }
  function applyNucleiOpacity() {
    if (!nucleiImage) return;
    // zoomed in, the vector outlines replace the dots
    const hide = state.vectorMode && vectors && !vectors.truncated;
    nucleiImage.setOpacity(hide ? 0 : layerOpacity("nuclei"));
  }
  function bindControls() {
    ["tissue", "nuclei"].forEach((layer) => {
      document.getElementById("show-" + layer).addEventListener("change", () => { applyNucleiOpacity(); redraw(); });
      document.getElementById("opacity-" + layer).addEventListener("input", () => { applyNucleiOpacity(); redraw(); });
    });
  }
  function swatch(parent, colour, label) {
    const item = document.createElement("span");
    const box = document.createElement("span");
    box.className = "swatch";
    box.style.background = rgba(colour, 1);
    item.appendChild(box);
    item.appendChild(document.createTextNode(label));
    parent.appendChild(item);
  }
  function drawLegends() {
    const t = document.getElementById("tissue-legend");
    Object.entries(info.tissue_colours || {}).forEach(([cls, c]) => swatch(t, c, cls));
    const n = document.getElementById("nuclei-legend");
    if (info.nuclei) {
      Object.entries(info.nuclei.colours).forEach(([cls, c]) => swatch(n, c, cls));
      const ramp = document.createElement("span");
      ramp.innerHTML = '<span class="ramp"></span> ';
      ramp.appendChild(document.createTextNode(
        `density 0–${ssPlots.fmt(info.nuclei.density_scale_per_mm2)} nuclei/mm² (zoomed out)`));
      n.appendChild(ramp);
      const key = info.nuclei.colour_key === "type" ? "nucleus type" : "tissue class";
      document.getElementById("nuclei-mode").textContent =
        `${info.nuclei.count.toLocaleString("en")} nuclei, coloured by ${key}; click one for its measurements.`;
    }
  }

  // ---------------------------------------------------------------- vector canvas
  function resize() {
    const r = window.devicePixelRatio || 1;
    const w = canvas.clientWidth, h = canvas.clientHeight;
    canvas.width = Math.round(w * r);
    canvas.height = Math.round(h * r);
  }
  // image (level-0 px) -> canvas px: x' = a * x + bx, y' = a * y + by (no rotation)
  function transform() {
    const P = OpenSeadragon.Point;
    const p0 = slideImage.imageToViewerElementCoordinates(new P(0, 0));
    const p1 = slideImage.imageToViewerElementCoordinates(new P(10000, 0));
    const r = window.devicePixelRatio || 1;
    const a = ((p1.x - p0.x) / 10000) * r;
    return { a: a, bx: p0.x * r, by: p0.y * r };
  }
  function umPerScreenPx() {
    const zoom = slideImage.viewportToImageZoom(viewer.viewport.getZoom(true));
    return info.mpp / zoom;
  }
  function tracePath(rings, t) {
    ctx.beginPath();
    for (const ring of rings) {
      ctx.moveTo(ring[0] * t.a + t.bx, ring[1] * t.a + t.by);
      for (let i = 2; i < ring.length; i += 2) ctx.lineTo(ring[i] * t.a + t.bx, ring[i + 1] * t.a + t.by);
      ctx.closePath();
    }
  }
  function redraw() {
    if (!slideImage) return;
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    const t = transform();
    const tissueAlpha = layerOpacity("tissue");
    if (tissueAlpha > 0) {
      for (const region of tissue) {
        tracePath(region.rings, t);
        ctx.fillStyle = rgba(region.colour, tissueAlpha * 0.6);
        ctx.fill("evenodd");
        ctx.lineWidth = 2;
        ctx.strokeStyle = rgba(region.colour, Math.min(1, tissueAlpha * 2));
        ctx.stroke();
      }
    }
    const nucleiAlpha = layerOpacity("nuclei");
    if (state.vectorMode && vectors && !vectors.truncated && nucleiAlpha > 0) {
      ctx.lineWidth = Math.max(1, (window.devicePixelRatio || 1) * 1.5);
      for (const f of vectors.features) {
        if (f.rings) {
          tracePath(f.rings, t);
          ctx.fillStyle = rgba(f.colour, nucleiAlpha * 0.25);
          ctx.fill("evenodd");
          ctx.strokeStyle = rgba(f.colour, nucleiAlpha);
          ctx.stroke();
        } else {
          ctx.beginPath();
          ctx.arc(f.cx * t.a + t.bx, f.cy * t.a + t.by, Math.max(3, f.r * t.a), 0, 2 * Math.PI);
          ctx.fillStyle = rgba(f.colour, nucleiAlpha * 0.6);
          ctx.fill();
        }
      }
    }
    drawScaleBar();
  }
  function drawScaleBar() {
    const um = umPerScreenPx();
    const target = 120 * um;
    const e = Math.pow(10, Math.floor(Math.log10(target)));
    let len = e;
    for (const m of [1, 2, 5, 10]) if (m * e <= target) len = m * e;
    const bar = document.querySelector("#scalebar .bar");
    bar.style.width = `${len / um}px`;
    document.querySelector("#scalebar .label").textContent =
      len >= 1000 ? `${len / 1000} mm` : `${len} µm`;
    const mode = um <= VECTOR_MAX_UM_PER_PX;
    if (mode !== state.vectorMode) { state.vectorMode = mode; applyNucleiOpacity(); if (mode) scheduleVectors(); }
  }

  // ---------------------------------------------------------------- tissue
  function ringsOf(geometry) {
    const polys = geometry.type === "Polygon" ? [geometry.coordinates] :
      geometry.type === "MultiPolygon" ? geometry.coordinates : [];
    const rings = [];
    for (const poly of polys) for (const ring of poly) rings.push(Float64Array.from(ring.flat()));
    return rings;
  }
  function loadTissue(fc) {
    tissue = (fc.features || []).map((f) => {
      const cls = (f.properties || {}).classification || {};
      return { name: cls.name || "tissue", colour: cls.color || [120, 120, 120], rings: ringsOf(f.geometry || {}) };
    });
    state.tissueDrawn = true;
    redraw();
  }

  // ---------------------------------------------------------------- nuclei as vectors
  function viewportBox() {
    const b = viewer.viewport.getBounds(true);
    const r = slideImage.viewportToImageRectangle(b);
    const padX = r.width * 0.25, padY = r.height * 0.25;
    return [r.x - padX, r.y - padY, r.x + r.width + padX, r.y + r.height + padY];
  }
  function scheduleVectors() {
    if (!info || !info.layers.nuclei || !slideImage) return;
    clearTimeout(fetchTimer);
    fetchTimer = setTimeout(fetchVectors, 120);
  }
  function fetchVectors() {
    if (!state.vectorMode) return;
    const box = viewportBox();
    if (vectors && vectors.box[0] <= box[0] && vectors.box[1] <= box[1] &&
        vectors.box[2] >= box[2] && vectors.box[3] >= box[3] && !vectors.truncated) return;
    const seq = ++fetchSeq;
    const q = box.map((v) => v.toFixed(1)).join(",");
    json(`${base}/nuclei?bbox=${q}&limit=${VECTOR_LIMIT}`).then((fc) => {
      if (seq !== fetchSeq) return;
      vectors = { box: box, truncated: fc.truncated, features: fc.features.map(toVector) };
      state.vectorNuclei = vectors.features.length;
      applyNucleiOpacity();
      redraw();
    }).catch(fail);
  }
  function toVector(f) {
    const g = f.geometry || {};
    const p = f.properties || {};
    const out = { props: p, colour: p.colour || [200, 200, 200], rings: null, cx: 0, cy: 0, r: 4 };
    if (g.type === "Point") {
      out.cx = g.coordinates[0]; out.cy = g.coordinates[1];
      const d = (p.measurements || {})["Equivalent diameter µm"];
      out.r = d ? d / 2 / info.mpp : 4;
    } else {
      out.rings = ringsOf(g);
      const ring = out.rings[0] || [];
      let sx = 0, sy = 0;
      for (let i = 0; i < ring.length; i += 2) { sx += ring[i]; sy += ring[i + 1]; }
      out.cx = sx / Math.max(1, ring.length / 2); out.cy = sy / Math.max(1, ring.length / 2);
    }
    return out;
  }
  function inside(ring, x, y) {
    let c = false;
    for (let i = 0, j = ring.length - 2; i < ring.length; j = i, i += 2) {
      const xi = ring[i], yi = ring[i + 1], xj = ring[j], yj = ring[j + 1];
      if ((yi > y) !== (yj > y) && x < ((xj - xi) * (y - yi)) / (yj - yi) + xi) c = !c;
    }
    return c;
  }

  // ---------------------------------------------------------------- click: one nucleus
  function onClick(e) {
    if (!e.quick || !slideImage || !info.layers.nuclei) return;
    selectAt(slideImage.viewerElementToImageCoordinates(e.position));
  }
  function selectAt(p) {
    const radius = 12 * umPerScreenPx() / info.mpp;   // 12 screen px in level-0 px
    const pick = (features) => {
      let best = null, bestD = Infinity;
      for (const f of features) {
        if (f.rings && f.rings.length && inside(f.rings[0], p.x, p.y)) return f;
        const d = Math.hypot(f.cx - p.x, f.cy - p.y);
        if (d < bestD && d <= radius) { best = f; bestD = d; }
      }
      return best;
    };
    if (state.vectorMode && vectors && !vectors.truncated) { showNucleus(pick(vectors.features)); return; }
    const q = [p.x - radius, p.y - radius, p.x + radius, p.y + radius].map((v) => v.toFixed(1)).join(",");
    json(`${base}/nuclei?bbox=${q}&limit=50`).then((fc) => showNucleus(pick(fc.features.map(toVector)))).catch(fail);
  }
  function showNucleus(f) {
    const box = document.getElementById("nucleus-popup");
    box.replaceChildren();
    if (!f) { box.hidden = true; return; }
    const close = document.createElement("button");
    close.className = "close"; close.textContent = "×"; close.title = "close";
    close.addEventListener("click", () => { box.hidden = true; });
    box.appendChild(close);
    const title = document.createElement("strong");
    title.textContent = `Nucleus ${f.props.index} · ${f.props.class}`;
    box.appendChild(title);
    const table = document.createElement("table");
    const rows = Object.entries(f.props.measurements || {});
    if (f.props.tissue_class) rows.unshift(["Tissue class", f.props.tissue_class]);
    for (const [k, v] of rows) {
      const tr = table.insertRow();
      tr.insertCell().textContent = k;
      tr.insertCell().textContent = typeof v === "number" ? ssPlots.fmt(v) : String(v);
    }
    box.appendChild(table);
    box.hidden = false;
  }

  // ---------------------------------------------------------------- statistics panel
  function addTable(parent, head, rows) {
    const table = document.createElement("table");
    const tr = table.createTHead().insertRow();
    head.forEach((h) => { const th = document.createElement("th"); th.textContent = h; tr.appendChild(th); });
    const body = table.createTBody();
    rows.forEach((r) => {
      const row = body.insertRow();
      r.forEach((v, i) => {
        const td = row.insertCell();
        td.textContent = typeof v === "number" ? ssPlots.fmt(v) : (v === null || v === undefined ? "–" : String(v));
        if (i > 0) td.className = "num";
      });
    });
    parent.appendChild(table);
  }
  function drawStats(summary) {
    const el = document.getElementById("stats");
    el.replaceChildren();
    const h = document.createElement("h2"); h.textContent = "Statistics"; el.appendChild(h);
    const s = summary.statistics || {};
    const area = s.nucleus_area_um2 || {};
    addTable(el, ["Slide", "value"], [
      ["Tissue area (mm²)", s.tissue_area_mm2],
      ["Nuclei", s.nucleus_count],
      ["Nuclei per mm²", s.nuclei_per_mm2],
      ["Nucleus area mean (µm²)", area.mean],
      ["Nucleus area median [q1, q3] (µm²)",
        area.median === null || area.median === undefined ? null :
          `${ssPlots.fmt(area.median)} [${ssPlots.fmt(area.q1)}, ${ssPlots.fmt(area.q3)}]`],
      ["Mean haematoxylin OD", s.mean_hematoxylin_od],
    ]);
    const classes = Object.entries(s.classes || {});
    if (classes.length) {
      const h2 = document.createElement("h2"); h2.textContent = "Tissue classes"; el.appendChild(h2);
      addTable(el, ["Class", "mm²", "%", "nuclei", "per mm²"], classes.map(([c, v]) => [
        c, v.area_mm2, v.fraction === null || v.fraction === undefined ? null : v.fraction * 100,
        v.nucleus_count, v.nuclei_per_mm2]));
      const colours = info.tissue_colours || {};
      const h3 = document.createElement("h2"); h3.textContent = "Share of tissue"; el.appendChild(h3);
      const p1 = document.createElement("div"); p1.className = "plot"; el.appendChild(p1);
      ssPlots.bar(p1, classes.map(([c, v]) => ({ label: c, value: (v.fraction || 0) * 100,
        colour: colours[c] ? rgba(colours[c], 1) : null, valueLabel: `${ssPlots.fmt((v.fraction || 0) * 100)} %` })),
        { max: 100, unit: "% of tissue area" });
      const h4 = document.createElement("h2"); h4.textContent = "Nucleus density"; el.appendChild(h4);
      const p2 = document.createElement("div"); p2.className = "plot"; el.appendChild(p2);
      ssPlots.bar(p2, classes.map(([c, v]) => ({ label: c, value: v.nuclei_per_mm2 || 0,
        colour: colours[c] ? rgba(colours[c], 1) : null })), { unit: "nuclei per mm² of the class" });
    }
    const prov = document.getElementById("provenance");
    const details = document.createElement("details");
    const sum = document.createElement("summary"); sum.textContent = "Provenance"; details.appendChild(sum);
    const pre = document.createElement("pre"); pre.className = "json";
    const p = summary.provenance || {};
    pre.textContent = JSON.stringify({ slide: summary.slide, models: p.models, parameters: p.parameters,
      timings_s: p.timings_s, finished_at: p.finished_at, software_version: p.software_version }, null, 1);
    details.appendChild(pre);
    prov.replaceChildren(details);
    if (info.layers.overlay_png) {
      const a = document.createElement("a");
      a.href = base + "/overlay.png"; a.textContent = "overlay.png of the run";
      prov.appendChild(a);
    }
    state.statsDrawn = true;
  }
})();
