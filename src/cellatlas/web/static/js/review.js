// Cell inspector and review queue: one cell's call, alternates, markers, QC and relabel actions.
import { BAND_COLORS, escapeHtml as esc } from "./plots.js";

function confBar(c, band) {
  const pct = Math.round(c * 100);
  return `<span class="conf-bar"><span class="conf-track"><span class="conf-fill" style="width:${pct}%;background:${BAND_COLORS[band]}"></span></span>`
    + `${c.toFixed(2)} <span class="band band-${band}">${band}</span></span>`;
}

function altButtons(cell) {
  const alts = cell.alternates.filter((a) => a.label !== cell.label);
  const orig = cell.relabelled ? `<button type="button" class="alt-btn" data-action="revert" data-index="${cell.index}">↺ Revert to ${esc(cell.original_label)}</button>` : "";
  if (!alts.length && !orig) return '<span class="muted small">No alternates</span>';
  return orig + alts.map((a) => `<button type="button" class="alt-btn" data-action="set" data-index="${cell.index}" data-label="${esc(a.label)}"`
    + ` aria-label="Relabel cell ${cell.index} as ${esc(a.label)} (score ${a.score.toFixed(2)})">→ ${esc(a.label)}<span class="score">${a.score.toFixed(2)}</span></button>`).join("");
}

function customForm(cell) {
  const id = `custom-${cell.index}`;
  return `<form class="custom-label" data-index="${cell.index}">`
    + `<label class="sr-only" for="${id}">Custom label for cell ${cell.index}</label>`
    + `<input id="${id}" list="atlas-labels" placeholder="Other label…" maxlength="120" autocomplete="off">`
    + `<button class="btn btn-secondary btn-small" type="submit">Set</button></form>`;
}

function markerChips(cell) {
  return cell.markers.length ? `<span class="chips">${cell.markers.map((m) => `<span class="chip">${esc(m)}</span>`).join("")}</span>` : '<span class="muted small">none expressed</span>';
}

function qcText(qc) {
  return qc.pass ? "pass" : `<span class="qc-flag">flagged: ${esc(qc.reasons.replaceAll(";", ", ").replaceAll("_", " "))}</span>`;
}

/** The inspector card for one cell. */
export function renderInspector(el, cell) {
  const ev = cell.evidence;
  el.innerHTML = `<div class="cell-card" data-index="${cell.index}">
    <div class="cell-title"><span class="cell-label">${esc(cell.label)}</span>${confBar(cell.confidence, cell.band)}</div>
    ${cell.relabelled ? `<span class="cell-orig">Relabelled by you · engine called it <b>${esc(cell.original_label)}</b></span>` : ""}
    ${cell.reason ? `<span class="cell-orig cell-unassigned">Not called: ${esc(cell.reason)}</span>` : ""}
    <dl class="kv">
      <dt>Cell</dt><dd><code>${esc(cell.cell_id)}</code> (#${cell.index})</dd>
      <dt>Neighbours say</dt><dd>${ev.knn_label ? `${esc(ev.knn_label)} (${(ev.knn_prob * 100).toFixed(0)}% of vote)` : "— (markers only: too few atlas panel genes for neighbours)"}</dd>
      <dt>Markers say</dt><dd>${esc(ev.marker_label)} (score ${ev.marker_score.toFixed(2)})</dd>
      <dt>Signals agree</dt><dd>${ev.agreement ? "yes" : "no"}${cell.novel ? " · <b>unlike the atlas (novel?)</b>" : ""}</dd>
      <dt>Ontology</dt><dd>${esc(cell.ontology_id || "—")} · ${esc(cell.level)}</dd>
      ${cell.parent.label ? `<dt>One level up</dt><dd>${esc(cell.parent.label)}${cell.parent.confidence == null ? "" : ` (confidence ${cell.parent.confidence.toFixed(2)})`}</dd>` : ""}
      <dt>QC</dt><dd>${qcText(cell.qc)} · ${Math.round(cell.qc.total_counts).toLocaleString()} counts${cell.qc.mito_fraction == null ? "" : ` · ${(cell.qc.mito_fraction * 100).toFixed(1)}% MT`}</dd>
    </dl>
    <div><div class="label">Markers expressed</div>${markerChips(cell)}</div>
    <div><div class="label">Relabel</div><div class="alt-buttons">${altButtons(cell)}</div></div>
    ${customForm(cell)}
  </div>`;
}

/** One page of the review queue. */
export function renderReview(el, page) {
  if (!page.cells.length) {
    el.innerHTML = '<p class="review-empty">No cells match this filter.</p>';
    return;
  }
  const head = '<div class="review-item review-head" aria-hidden="true"><span>Cell</span><span>Confidence</span><span>Relabel as</span><span>Markers expressed</span><span>Your label</span></div>';
  el.innerHTML = head + page.cells.map((c) => `<div class="review-item${c.relabelled ? " is-relabelled" : ""}" data-index="${c.index}">
      <div class="who"><button type="button" class="link-btn" data-action="inspect" data-index="${c.index}" title="Inspect this cell">${esc(c.label)}</button>
        <span class="cell-id">${esc(c.cell_id)}</span>
        ${c.relabelled ? `<span class="relabelled-tag">was ${esc(c.original_label)}</span>` : ""}${c.qc.pass ? "" : ` ${qcText(c.qc)}`}</div>
      <div>${confBar(c.confidence, c.band)}</div>
      <div class="alt-buttons">${altButtons(c)}</div>
      <div>${markerChips(c)}</div>
      ${customForm(c)}
    </div>`).join("");
}

/**
 * Wire relabel/inspect actions inside `root` (event delegation).
 * @param {HTMLElement} root
 * @param {{relabel: (cells:number[], label:string|null) => Promise<void>, inspect: (i:number) => void}} handlers
 */
export function bindCellActions(root, handlers) {
  root.addEventListener("click", (e) => {
    const b = e.target.closest("button[data-action]");
    if (!b || !root.contains(b)) return;
    const i = Number(b.dataset.index);
    if (b.dataset.action === "set") handlers.relabel([i], b.dataset.label);
    else if (b.dataset.action === "revert") handlers.relabel([i], null);
    else if (b.dataset.action === "inspect") handlers.inspect(i);
  });
  root.addEventListener("submit", (e) => {
    const f = e.target.closest("form.custom-label");
    if (!f) return;
    e.preventDefault();
    const v = f.querySelector("input").value.trim();
    if (v) handlers.relabel([Number(f.dataset.index)], v);
  });
}
