// Plotly (served offline from the installed plotly package) renderers for the results page.

export const BAND_NAMES = ["confident", "review", "low"];
export const BAND_COLORS = { confident: "#009e73", review: "#e69f00", low: "#d55e00" };
const PALETTE = [
  "#4f46e5", "#0f9d8a", "#e8590c", "#c2255c", "#1c7ed6", "#66a80f", "#ae3ec9", "#f59f00",
  "#087f5b", "#d6336c", "#3b5bdb", "#a9720a", "#5f3dc4", "#2b8a3e", "#e03131", "#1098ad",
  "#862e9c", "#74b816", "#364fc7", "#c92a2a",
];
const FONT = { family: 'system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif', size: 12, color: "#161b2e" };
let loading = null;

/** Load plotly.js once (it is large: fetched when first needed, then cached by the browser). */
export function loadPlotly(url) {
  if (window.Plotly) return Promise.resolve(window.Plotly);
  if (!loading) {
    loading = new Promise((resolve, reject) => {
      const s = document.createElement("script");
      s.src = url;
      s.async = true;
      s.onload = () => resolve(window.Plotly);
      s.onerror = () => {
        loading = null;
        reject(Object.assign(new Error("The plotting library could not be loaded."), { fix: "Reload the page; if it persists, check that the server has the plotly package installed." }));
      };
      document.head.appendChild(s);
    });
  }
  return loading;
}

const CONFIG = { responsive: true, displaylogo: false, scrollZoom: true, modeBarButtonsToRemove: ["autoScale2d", "toggleSpikelines"] };

const CONF_SCALE = [[0, [213, 94, 0]], [0.4, [242, 177, 52]], [0.7, [124, 203, 162]], [1, [0, 105, 92]]];

/** Colour of a confidence value on the map's confidence scale. */
export function confidenceColor(c) {
  for (let k = 1; k < CONF_SCALE.length; k++) {
    const [x1, c1] = CONF_SCALE[k], [x0, c0] = CONF_SCALE[k - 1];
    if (c <= x1 || k === CONF_SCALE.length - 1) {
      const f = Math.max(0, Math.min(1, (c - x0) / (x1 - x0)));
      return `rgb(${c0.map((v, j) => Math.round(v + f * (c1[j] - v))).join(",")})`;
    }
  }
  return "rgb(0,0,0)";
}

export const UNASSIGNED = "Unassigned";
const UNASSIGNED_COLOR = "#b8bcc6";

/** Colour of the i-th label (palette first, then evenly spaced hues); "Unassigned" is grey
 * (it is always listed last, so the other labels keep their colours). */
export function labelColor(i, name) {
  if (name === UNASSIGNED) return UNASSIGNED_COLOR;
  if (i < PALETTE.length) return PALETTE[i];
  const hue = (i * 137.508) % 360;
  return `hsl(${hue.toFixed(0)}, 55%, ${i % 2 ? 42 : 55}%)`;
}

function pointSize(n) { return n > 50000 ? 2.5 : n > 10000 ? 3.5 : n > 2000 ? 5 : 6.5; }

function baseLayout(extra = {}) {
  return {
    font: FONT, paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)",
    margin: { l: 10, r: 10, t: 10, b: 10 }, hoverlabel: { font: FONT }, ...extra,
  };
}

/**
 * Draw the cells on a map: the user's own (view "user": their UMAP or one of the cellatlas
 * embedding) or the atlas projection (view "atlas", over the grey reference cells).
 * Without coordinates (the user's map is still being computed) the plot is left empty.
 * @param {HTMLElement} el  plot container
 * @param {object} res      /results payload
 * @param {{colorBy: string, showRef: boolean, view: string}} opts
 */
export function drawMap(el, res, opts) {
  const user = opts.view !== "atlas";
  const um = res.user_map || {};
  const p = { ...res.points, ...(user ? { x: um.x || [], y: um.y || [] } : {}) };
  const n = p.x.length;
  const size = pointSize(n);
  const traces = [];
  if (!user && opts.showRef && res.reference) {
    traces.push({
      type: "scattergl", mode: "markers", name: "Reference cells", x: res.reference.x, y: res.reference.y,
      marker: { size: Math.max(2, size - 1.5), color: "#d5d9e3" }, hoverinfo: "skip", showlegend: true,
    });
  }
  const groups = (keyOf, count) => {
    const idx = Array.from({ length: count }, () => []);
    for (let i = 0; i < n; i++) idx[keyOf(i)].push(i);
    return idx;
  };
  const trace = (ids, name, color, extra = {}) => ({
    type: "scattergl", mode: "markers", name,
    x: ids.map((i) => p.x[i]), y: ids.map((i) => p.y[i]),
    customdata: ids.map((i) => [i, p.confidence[i]]),
    marker: { size, color, opacity: 0.9 },
    hovertemplate: `<b>${escapeHtml(name)}</b><br>confidence %{customdata[1]:.2f}<br>cell #%{customdata[0]}<extra></extra>`,
    ...extra,
  });
  const byLabel = () => groups((i) => p.label[i], res.labels.length);
  if (opts.colorBy === "label") {
    byLabel().forEach((ids, k) => { if (ids.length) traces.push(trace(ids, res.labels[k], labelColor(k, res.labels[k]))); });
  } else if (opts.colorBy === "band") {
    groups((i) => p.band[i], 3).forEach((ids, k) => {
      if (ids.length) traces.push(trace(ids, BAND_NAMES[k], BAND_COLORS[BAND_NAMES[k]]));
    });
  } else {
    // confidence in 20 steps of 0.05, one solid-colour trace each (per-point colour scales are slow
    // in WebGL at 100k points); a one-point trace carries the colour bar
    const steps = 20;
    groups((i) => Math.min(steps - 1, Math.floor(p.confidence[i] * steps + 1e-9)), steps).forEach((ids, k) => {
      if (!ids.length) return;
      const t = trace(ids, "", confidenceColor((k + 0.5) / steps), { showlegend: false });
      t.customdata = ids.map((i) => [i, p.confidence[i], res.labels[p.label[i]]]);
      t.hovertemplate = "<b>%{customdata[2]}</b><br>confidence %{customdata[1]:.2f}<br>cell #%{customdata[0]}<extra></extra>";
      traces.push(t);
    });
    traces.push({ type: "scatter", mode: "markers", x: [null], y: [null], showlegend: false, hoverinfo: "skip",
      marker: { color: [0], coloraxis: "coloraxis", size: 0.1 } });
  }
  const layout = baseLayout({
    xaxis: { visible: false, zeroline: false }, yaxis: { visible: false, zeroline: false },
    legend: el.clientWidth < 640
      ? { itemsizing: "constant", font: { size: 11 }, orientation: "h", x: 0, y: -0.02, yanchor: "top" }
      : { itemsizing: "constant", font: { size: 11 }, x: 1, xanchor: "left", y: 1, yanchor: "top" },
    margin: { l: 10, r: 10, t: 36, b: 10 },
    dragmode: opts.dragmode || "zoom", uirevision: `map-${user ? "user" : "atlas"}`, hovermode: "closest",
    coloraxis: {
      cmin: 0, cmax: 1, colorscale: CONF_SCALE.map(([x, c]) => [x, `rgb(${c.join(",")})`]),
      colorbar: { title: { text: "confidence" }, tickvals: [0, 0.4, 0.7, 1], thickness: 12, len: 0.6 },
      showscale: opts.colorBy === "confidence",
    },
  });
  return Plotly.react(el, traces, layout, CONFIG);
}

/** Histogram of confidence, bars coloured by band, thresholds marked. */
export function drawHistogram(el, hist) {
  const { edges, counts, thresholds } = hist;
  const centers = counts.map((_, i) => (edges[i] + edges[i + 1]) / 2);
  const color = centers.map((c) => (c >= thresholds.confident ? BAND_COLORS.confident : c >= thresholds.review ? BAND_COLORS.review : BAND_COLORS.low));
  const maxY = Math.max(1, ...counts);
  const line = (x, label) => [
    { type: "line", x0: x, x1: x, y0: 0, y1: 1, yref: "paper", line: { color: "#161b2e", width: 1.5, dash: "dash" } },
    { x, y: 1, yref: "paper", text: label, showarrow: false, xanchor: "left", yanchor: "top", xshift: 4, font: { size: 11, color: "#5a6275" } },
  ];
  const [s1, a1] = line(thresholds.review, `${thresholds.review} review`);
  const [s2, a2] = line(thresholds.confident, `${thresholds.confident} confident`);
  return Plotly.react(el, [{
    type: "bar", x: centers, y: counts, width: (edges[1] - edges[0]) * 0.92, marker: { color },
    customdata: counts.map((_, i) => [edges[i], edges[i + 1]]),
    hovertemplate: "confidence %{customdata[0]:.2f}–%{customdata[1]:.2f}<br>%{y:,} cells<extra></extra>",
  }], baseLayout({
    margin: { l: 56, r: 16, t: 16, b: 44 }, bargap: 0,
    xaxis: { title: { text: "confidence" }, range: [0, 1], dtick: 0.1, gridcolor: "#eef0f5" },
    yaxis: { title: { text: "cells" }, range: [0, maxY * 1.15], gridcolor: "#eef0f5", rangemode: "tozero" },
    shapes: [s1, s2], annotations: [a1, a2],
  }), { ...CONFIG, scrollZoom: false });
}

/** Marker dot plot: rows = labels, columns = markers; size = fraction expressing, colour = mean expression. */
export function drawDotplot(el, dp) {
  if (!dp.genes.length) {
    Plotly.purge(el);
    el.innerHTML = '<p class="review-empty">None of the atlas\'s marker genes are in this dataset.</p>';
    return Promise.resolve();
  }
  if (!el.data) el.innerHTML = ""; // drop the "no markers" message, never Plotly's own nodes
  const x = [], y = [], size = [], color = [], custom = [];
  let maxMean = 0;
  dp.labels.forEach((lab, r) => dp.genes.forEach((g, c) => {
    x.push(g); y.push(lab);
    const f = dp.fraction[r][c], m = dp.mean[r][c];
    maxMean = Math.max(maxMean, m);
    size.push(3 + 19 * Math.sqrt(f)); color.push(m); custom.push([f * 100, m, dp.gene_label[c]]);
  }));
  const height = Math.max(300, 110 + 24 * dp.labels.length);
  el.style.height = `${height}px`;
  return Plotly.react(el, [{
    type: "scatter", mode: "markers", x, y, customdata: custom,
    marker: {
      size, color, cmin: 0, cmax: maxMean || 1, line: { width: 0.5, color: "#8a91a5" },
      colorscale: [[0, "#f1f3fa"], [0.35, "#a5b4fc"], [0.7, "#4f46e5"], [1, "#1e1b4b"]],
      colorbar: { title: { text: dp.scale || "mean", side: "right" }, thickness: 10, len: 0.7 },
    },
    hovertemplate: "<b>%{y}</b> · %{x}<br>%{customdata[0]:.0f}% of cells express<br>mean %{customdata[1]:.2f}<br>marker of %{customdata[2]}<extra></extra>",
  }], baseLayout({
    height, margin: { l: 150, r: 20, t: 10, b: 90 },
    xaxis: { tickangle: -45, type: "category", gridcolor: "#f0f2f7", automargin: true },
    yaxis: { type: "category", autorange: "reversed", gridcolor: "#f0f2f7", automargin: true },
  }), { ...CONFIG, scrollZoom: false });
}

/** Heatmap of the user's labels or clusters (rows) against the calls (columns), rows summing to 1. */
export function drawCompare(el, cmp) {
  const rows = cmp.rows.map((r, i) => `${r} (${cmp.n[i].toLocaleString("en-US")})`);
  const height = Math.max(260, 120 + 26 * rows.length);
  el.style.height = `${height}px`;
  return Plotly.react(el, [{
    type: "heatmap", z: cmp.share, x: cmp.cols, y: rows, zmin: 0, zmax: 1, xgap: 1, ygap: 1,
    colorscale: [[0, "#f7f9fd"], [0.3, "#a5b4fc"], [0.7, "#4f46e5"], [1, "#1e1b4b"]],
    text: cmp.share.map((row) => row.map((v) => (v >= 0.05 ? `${Math.round(100 * v)}%` : ""))),
    texttemplate: "%{text}", textfont: { size: 10 },
    colorbar: { title: { text: "share of row" }, tickformat: ".0%", thickness: 10, len: 0.8 },
    hovertemplate: `<b>%{y}</b> → %{x}<br>%{z:.1%} of the row's cells<extra></extra>`,
  }], baseLayout({
    height, margin: { l: 10, r: 10, t: 10, b: 10 },
    xaxis: { type: "category", tickangle: -40, automargin: true, title: { text: "cellatlas call" } },
    yaxis: { type: "category", autorange: "reversed", automargin: true, title: { text: cmp.column } },
  }), { ...CONFIG, scrollZoom: false });
}

export function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
