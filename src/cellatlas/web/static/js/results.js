// Step 3: plots, label table, review queue, cell inspector, relabels and downloads.
import { call, download } from "./api.js";
import { drawCompare, drawDotplot, drawHistogram, drawMap, escapeHtml as esc, labelColor, loadPlotly } from "./plots.js";
import { bindCellActions, renderInspector, renderReview } from "./review.js";
import { $, bytes, fmt, pct, showError, state } from "./ui.js";

// ------------------------------------------------------------------ results
export async function loadResults({ relabelOnly = false } = {}) {
  const [results] = await Promise.all([call(`/sessions/${state.session.id}/results`), loadPlotly(state.config.plotly_url)]);
  state.results = results;
  renderResults(relabelOnly);
  if (results.user_map?.state === "computing") pollUserMap(state.session.id);
  await loadReview();
}

// ------------------------------------------------------------------ comparison with the upload's own labels
function renderCompare() {
  const cmps = state.results.comparisons || [];
  $("#compare").hidden = !cmps.length;
  if (!cmps.length) return;
  const sel = $("#compare-column");
  if (!cmps.some((c) => c.column === state.compareColumn)) state.compareColumn = cmps[0].column;
  sel.innerHTML = cmps.map((c) => `<option value="${esc(c.column)}"${c.column === state.compareColumn ? " selected" : ""}>${esc(c.column)} (${c.kind}, ${c.rows.length})</option>`).join("");
  const cmp = cmps.find((c) => c.column === state.compareColumn);
  $("#compare-title").textContent = cmp.kind === "clusters" ? "Your clusters and the calls" : "Compared with your labels";
  $("#compare-sub").textContent = `Rows: the groups of your file's obs['${cmp.column}']; columns: cellatlas calls (your relabels included). Each row sums to 100% of its cells.`;
  drawCompare($("#plot-compare"), cmp);
  $("#compare-table tbody").innerHTML = cmp.summary.map((r) => `<tr>
      <th scope="row">${esc(r.group)}</th><td class="num">${fmt(r.n)}</td><td>${esc(r.majority)}</td>
      <td class="num">${pct(r.share)}</td><td class="muted">${r.second ? `${esc(r.second)} ${pct(r.second_share)}` : "—"}</td>
      <td class="num">${r.mean_confidence.toFixed(2)}</td></tr>`).join("");
}

function tile(label, value, sub, cls = "") {
  return `<div class="tile ${cls}"><div class="tile-label">${esc(label)}</div><div class="tile-value">${esc(value)}</div><div class="tile-sub">${esc(sub)}</div></div>`;
}

function renderResults(relabelOnly = false) {
  const r = state.results, s = r.summary, n = r.n_cells, o = s.options;
  $("#results-file").textContent = state.session.filename;
  const secs = s.timings ? Object.values(s.timings).reduce((a, b) => a + b, 0) : null;
  $("#results-meta").textContent = `${o.model} model · ${o.atlas} atlas · ${fmt(n)} cells${secs ? ` · annotated in ${secs.toFixed(1)} s` : ""}`;
  $("#summary-tiles").innerHTML = [
    tile("Cells", fmt(n), `${s.n_labels} labels`),
    tile("Confident", pct(s.bands.confident / n), `${fmt(s.bands.confident)} cells ≥ 0.7`, "tile-confident"),
    tile("Review", pct(s.bands.review / n), `${fmt(s.bands.review)} cells 0.4–0.7`, "tile-review"),
    tile("Low", pct(s.bands.low / n), `${fmt(s.bands.low)} cells < 0.4`, "tile-low"),
    tile("QC flagged", fmt(s.qc.n_flagged), s.qc.min_counts == null && s.qc.max_mito_fraction == null ? "no filters set" : "kept; qc_pass = false"),
    tile("Unassigned", fmt(s.unassigned.n_cells), "too little information to call", "tile-unassigned"),
    tile("Relabelled", fmt(s.n_relabelled), "by you, kept in downloads"),
  ].join("");
  const notes = [...(s.qc.notes || []).map((t) => ["warn", t])];
  if (s.n_novel) notes.push([s.n_novel / n >= 0.05 ? "warn" : "info", `${fmt(s.n_novel)} cells (${pct(s.n_novel / n)}) are more likely none of the atlas's types than any of them (marked novel, never in the confident band); their labels are the nearest match.`]);
  for (const w of r.gene_report?.warnings || []) notes.push(["warn", typeof w === "string" ? w : w.message]);
  const gc = r.gene_report?.gene_check;
  if (gc && (gc.verdict === "warning" || gc.verdict === "skipped")) notes.push(["warn", `Gene list: ${gc.message}`]);
  const un = s.unassigned;
  if (un.n_cells) notes.push(["warn", `${fmt(un.n_cells)} cells are Unassigned: ${Object.entries(un.reasons).map(([why, k]) => `${fmt(k)} ${why}`).join("; ")}.`]);
  $("#results-notes").innerHTML = notes.map(([k, t]) => `<div class="alert alert-${k}">${esc(t)}</div>`).join("");
  drawMapNow();
  renderCompare();
  if (!relabelOnly) drawHistogram($("#plot-hist"), r.histogram); // relabels never change confidence
  drawDotplot($("#plot-dots"), r.dotplot);
  $("#dots-sub").textContent = `Each label's own markers, curated first, then derived from the reference: dot size = fraction of cells expressing, colour = mean ${r.dotplot.scale || "expression"}.`;
  renderLabelTable();
  const labels = new Set([...r.atlas_labels, ...r.labels]);
  $("#atlas-labels").innerHTML = [...labels].sort().map((l) => `<option value="${esc(l)}"></option>`).join("");
  const cur = state.review.label;
  $("#review-label").innerHTML = '<option value="">All labels</option>' + r.labels.map((l) => `<option${l === cur ? " selected" : ""}>${esc(l)}</option>`).join("");
  if (cur && !r.labels.includes(cur)) state.review.label = "";
}

const MAP_ACTIONS = "Click a cell to inspect it; use lasso select to relabel a group of cells.";
const MAP_HELP = {
  user: "Your cells laid out by their own similarity.",
  atlas: "Your cells placed on the atlas's 2-D reference layout (reference cells in grey): where each cell lands among the atlas's own cells, not a map of your data. Labels without reference cells sit on fixed anchors.",
};

/** Status line over the user's map while it is computed (or why there is none). */
function mapStatus() {
  const um = state.results.user_map || {}, el = $("#map-status");
  const msg = state.mapView !== "user" || um.state === "done" ? ""
    : um.state === "computing" ? "Computing a UMAP of your cells (scanpy, on the cellatlas embedding)…"
    : `${um.message || "No map of your cells is available."} The atlas projection is one click away.`;
  el.hidden = !msg;
  el.textContent = msg;
  const what = state.mapView === "user" && um.state === "done" ? `${um.title}.` : MAP_HELP[state.mapView];
  $("#map-sub").textContent = `${what} ${MAP_ACTIONS}`;
}

/** Poll the user's map until it is computed, then draw it. */
async function pollUserMap(sid) {
  if (state.pollingMap === sid) return; // one poller per session
  state.pollingMap = sid;
  try {
    while (state.session?.id === sid && state.results?.user_map?.state === "computing") {
      await new Promise((r) => setTimeout(r, 1000));
      if (state.session?.id !== sid) return;
      state.results.user_map = await call(`/sessions/${sid}/user-map`);
    }
    if (state.session?.id === sid) drawMapNow();
  } catch (err) { showError($("#global-error"), err); } finally { state.pollingMap = null; }
}

function drawMapNow() {
  const map = $("#plot-map");
  $("#map-title").textContent = state.mapView === "user" ? "Your cells" : "Atlas projection";
  $("#show-ref-wrap").hidden = state.mapView === "user";
  mapStatus();
  return drawMap(map, state.results, { colorBy: state.colorBy, showRef: state.showRef, view: state.mapView }).then(() => {
    if (map.dataset.bound) return;
    map.dataset.bound = "true";
    // the map card grows with the inspector/labels column: keep the plot filling it
    new ResizeObserver(() => { if (map.data) Plotly.Plots.resize(map); }).observe(map);
    map.on("plotly_click", (ev) => { const pt = ev.points.find((p) => p.customdata); if (pt) inspect(pt.customdata[0]); });
    map.on("plotly_selected", (ev) => {
      state.selection = ev ? [...new Set(ev.points.filter((p) => p.customdata).map((p) => p.customdata[0]))] : [];
      $("#selection-bar").hidden = !state.selection.length;
      $("#selection-text").textContent = `${fmt(state.selection.length)} cells selected`;
    });
  });
}

const EDIT_ICON = '<svg viewBox="0 0 20 20" aria-hidden="true"><path d="M4 14.5V16h1.5l8.8-8.8-1.5-1.5L4 14.5Zm11.7-8.2a1 1 0 0 0 0-1.4l-.6-.6a1 1 0 0 0-1.4 0l-.9.9 1.5 1.5.9-.9Z" fill="currentColor"/></svg>';

function renderLabelTable() {
  const r = state.results;
  $("#labels-sub").textContent = `${r.labels.length} labels`;
  $("#label-table tbody").innerHTML = r.label_table.map((row, k) => {
    const w = (x) => `${(100 * x / row.n).toFixed(1)}%`;
    const bands = `${fmt(row.confident)} confident, ${fmt(row.review)} review, ${fmt(row.low)} low`;
    return `<tr>
      <th scope="row"><span class="label-name"><span class="swatch" style="background:${labelColor(k, row.label)}"></span>${esc(row.label)}</span>
        <div class="stackbar" title="${bands}" role="img" aria-label="${bands}">
          <span style="width:${w(row.confident)};background:var(--confident)"></span><span style="width:${w(row.review)};background:var(--review)"></span><span style="width:${w(row.low)};background:var(--low)"></span></div>
        ${row.relabelled ? `<span class="relabelled-tag">${fmt(row.relabelled)} relabelled</span>` : ""}</th>
      <td class="num">${fmt(row.n)}</td>
      <td class="num">${row.mean_confidence.toFixed(2)}</td>
      <td><button type="button" class="icon-btn" data-group="${esc(row.label)}" title="Relabel all ${esc(row.label)} cells" aria-label="Relabel all ${fmt(row.n)} ${esc(row.label)} cells">${EDIT_ICON}</button></td>
    </tr>`;
  }).join("");
}

async function loadReview() {
  const q = state.review;
  const params = new URLSearchParams({ band: q.band, offset: q.offset, limit: q.limit });
  if (q.label) params.set("label", q.label);
  const page = await call(`/sessions/${state.session.id}/review?${params}`);
  q.total = page.total;
  renderReview($("#review-list"), page);
  const last = Math.min(q.offset + q.limit, page.total);
  $("#review-page").textContent = page.total ? `${fmt(q.offset + 1)}–${fmt(last)} of ${fmt(page.total)} cells` : "0 cells";
  $("#review-prev").disabled = q.offset === 0;
  $("#review-next").disabled = last >= page.total;
}

async function inspect(i) {
  try {
    const cell = await call(`/sessions/${state.session.id}/cells/${i}`);
    state.inspected = i;
    renderInspector($("#inspector"), cell);
  } catch (err) { showError($("#global-error"), err); }
}

async function relabel(body, message) {
  try {
    const out = await call(`/sessions/${state.session.id}/relabel`, { method: "POST", body });
    $("#download-status").textContent = `${message}: ${out.changed} cells. ${out.n_relabelled} relabelled in total.`;
    showError($("#global-error"), null);
    await loadResults({ relabelOnly: true });
    if (state.inspected != null) await inspect(state.inspected);
  } catch (err) { showError($("#global-error"), err); }
}

function openRelabelDialog({ title, desc, initial, onApply, onRevert }) {
  const dlg = $("#relabel-dialog");
  $("#relabel-title").textContent = title;
  $("#relabel-desc").textContent = desc;
  $("#relabel-input").value = initial || "";
  $("#relabel-revert").hidden = !onRevert;
  dlg.onclose = () => {
    const v = $("#relabel-input").value.trim();
    if (dlg.returnValue === "apply" && v) onApply(v);
    else if (dlg.returnValue === "revert" && onRevert) onRevert();
  };
  dlg.returnValue = "";
  dlg.showModal();
  $("#relabel-input").focus();
}

async function doDownload(kind, btn) {
  btn.disabled = true;
  $("#download-status").textContent = `Preparing ${kind}…`;
  try {
    const out = await download(state.session.id, kind);
    $("#download-status").textContent = `Downloaded ${out.name} (${bytes(out.size)}).`;
  } catch (err) { showError($("#global-error"), err); } finally { btn.disabled = false; }
}

// ------------------------------------------------------------------ wiring
function bindSegmented(root, onPick) {
  const bs = [...root.querySelectorAll("button")];
  bs.forEach((b) => b.addEventListener("click", () => {
    bs.forEach((x) => x.setAttribute("aria-checked", String(x === b)));
    onPick(b);
    drawMapNow();
  }));
  root.addEventListener("keydown", (e) => {
    if (!["ArrowLeft", "ArrowRight"].includes(e.key)) return;
    const i = bs.findIndex((x) => x.getAttribute("aria-checked") === "true");
    const next = bs[(i + (e.key === "ArrowRight" ? 1 : bs.length - 1)) % bs.length];
    next.click(); next.focus();
  });
}

export function bindResults() {
  bindSegmented($("#color-by"), (b) => { state.colorBy = b.dataset.color; });
  bindSegmented($("#map-view"), (b) => { state.mapView = b.dataset.view; });
  $("#compare-column").addEventListener("change", (e) => { state.compareColumn = e.target.value; renderCompare(); });
  $("#show-ref").addEventListener("change", (e) => { state.showRef = e.target.checked; drawMapNow(); });
  const map = $("#plot-map");
  $("#relabel-selection").addEventListener("click", () => openRelabelDialog({
    title: "Relabel selected cells", desc: `${fmt(state.selection.length)} cells selected on the map.`,
    onApply: (v) => relabel({ cells: state.selection, label: v }, `Relabelled selection as ${v}`),
    onRevert: () => relabel({ cells: state.selection, label: null }, "Reverted selection"),
  }));
  $("#clear-selection").addEventListener("click", () => { state.selection = []; $("#selection-bar").hidden = true; Plotly.restyle(map, { selectedpoints: [null] }); });
  $("#label-table").addEventListener("click", (e) => {
    const b = e.target.closest("button[data-group]");
    if (!b) return;
    const g = b.dataset.group, row = state.results.label_table.find((r) => r.label === g);
    openRelabelDialog({
      title: `Relabel “${g}”`, desc: `All ${fmt(row.n)} cells now labelled ${g} get the new label.`, initial: g,
      onApply: (v) => relabel({ group: g, label: v }, `Relabelled ${g} as ${v}`),
      onRevert: () => relabel({ group: g, label: null }, `Reverted ${g}`),
    });
  });
  bindCellActions($("#review-list"), { relabel: (cells, label) => relabel({ cells, label }, label ? `Relabelled as ${label}` : "Reverted"), inspect });
  bindCellActions($("#inspector"), { relabel: (cells, label) => relabel({ cells, label }, label ? `Relabelled as ${label}` : "Reverted"), inspect });
  $("#review-band").addEventListener("change", (e) => { state.review.band = e.target.value; state.review.offset = 0; loadReview(); });
  $("#review-label").addEventListener("change", (e) => { state.review.label = e.target.value; state.review.offset = 0; loadReview(); });
  $("#review-prev").addEventListener("click", () => { state.review.offset = Math.max(0, state.review.offset - state.review.limit); loadReview(); });
  $("#review-next").addEventListener("click", () => { state.review.offset += state.review.limit; loadReview(); });
  $("#dl-h5ad").addEventListener("click", (e) => doDownload("h5ad", e.currentTarget));
  $("#dl-csv").addEventListener("click", (e) => doDownload("csv", e.currentTarget));
}
