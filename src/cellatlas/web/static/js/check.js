// Step 2: dataset facts, atlas/model choice, QC flags and the run with its progress.
import { call } from "./api.js";
import { escapeHtml as esc } from "./plots.js";
import { loadResults } from "./results.js";
import { $, bytes, fmt, pct, setProgress, show, showError, state } from "./ui.js";

// ------------------------------------------------------------------ facts and options
function fact(label, value, sub = "") {
  return `<div class="fact"><div class="fact-label">${esc(label)}</div><div class="fact-value">${esc(value)}</div><div class="fact-sub">${esc(sub)}</div></div>`;
}

const VALUE_WORDS = { lognorm: "log-normalised", nonint: "normalised (non-integer, e.g. TPM/CPM)", scaled: "scaled (negative values)" };
const ID_TYPES = { symbol_human: "Symbols", ensembl_human: "Ensembl IDs", symbol_mouse: "Mouse symbols", ensembl_mouse: "Mouse Ensembl", mixed: "Mixed", unknown: "Unrecognised" };

export function renderFacts() {
  const s = state.session, f = s.facts;
  $("#file-name").textContent = s.filename;
  $("#file-meta").textContent = `${s.format} · ${bytes(s.size)} · counts from ${f.source}`;
  $("#facts").innerHTML = [
    fact("Cells", fmt(f.n_cells)),
    fact("Genes", fmt(f.n_genes), `median ${fmt(f.median_genes_per_cell)} detected per cell`),
    fact("Gene IDs", ID_TYPES[f.id_type] || f.id_type.replaceAll("_", " "), `e.g. ${f.example_genes.slice(0, 3).join(", ")}`),
    fact("Species", f.species),
    fact("Values", f.value_type === "counts" ? "raw counts" : f.value_type, f.value_type === "counts" ? `from ${f.source}` : "detected and handled"),
    fact("Genes mapped", pct(f.fraction_genes_mapped), `${fmt(f.n_genes_mapped)} to HGNC symbols`),
  ].join("");
  const notes = [];
  if (f.value_type !== "counts") notes.push(["warn", `The values look ${VALUE_WORDS[f.value_type] || f.value_type}, not raw counts. The engine detects this and handles it, but raw counts give the best calls.`]);
  for (const n of f.read_notes || []) notes.push(["warn", `While reading the file: ${n}.`]);
  if (f.fraction_genes_mapped < 0.5) notes.push(["warn", `Only ${pct(f.fraction_genes_mapped)} of the genes map to known human gene symbols. Check that the gene names are symbols or Ensembl ids (not row numbers) and the species.`]);
  $("#facts-notes").innerHTML = notes.map(([k, t]) => `<div class="alert alert-${k}">${esc(t)}</div>`).join("");
  renderGeneCheck(f.gene_check);
  fillChoices();
  showError($("#run-error"), null);
  $("#run-progress").hidden = true;
  $("#run-btn").disabled = false;
}

// The engine's gene-list check: an error here means the run is refused unless the check is skipped.
function renderGeneCheck(gc) {
  const box = $("#gene-check");
  $("#skip-gene-check").checked = false;
  if (!gc || gc.verdict === "ok" || gc.verdict === "unchecked") {
    box.innerHTML = gc && gc.verdict === "ok"
      ? `<p class="help gene-check-ok">Gene list matches the matrix columns (${esc(gc.message)}).</p>` : "";
    return;
  }
  const error = gc.verdict === "error";
  box.innerHTML = `<div class="alert alert-${error ? "error" : "warn"} gene-check-${esc(gc.verdict)}" role="${error ? "alert" : "status"}">`
    + `<strong>${error ? "The gene names do not fit this matrix: the run would be refused." : "The gene names fit this matrix only weakly."}</strong> `
    + `${esc(gc.message)}${gc.fix ? `<span class="fix"><b>How to fix:</b> ${esc(gc.fix)}</span>` : ""}</div>`;
}

function fillChoices() {
  const c = state.config;
  const atlases = c.atlases.filter((a) => a.usable !== false);
  $("#atlas-select").innerHTML = atlases.map((a) => `<option value="${esc(a.name)}"${a.name === c.default_atlas ? " selected" : ""}>${esc(a.name)} (v${esc(a.version)}, ${a.n_labels} labels)</option>`).join("")
    || '<option value="">No atlas installed</option>';
  updateAtlas();
}

const MODEL_NOTES = {
  default: "Built-in model: no weights to download, fast on a CPU.",
  geneformer: "Geneformer foundation model (rank-value tokens).",
  scgpt: "scGPT foundation model (binned expression tokens).",
};

export function updateAtlas() {
  const c = state.config, f = state.session.facts;
  const atlas = c.atlases.find((a) => a.name === $("#atlas-select").value);
  $("#atlas-help").textContent = atlas ? `${atlas.description || "Reference atlas"} · ${fmt(atlas.n_reference_cells)} reference cells · ${atlas.species}` : "";
  const prev = $("#model-select").value || c.default_model;
  $("#model-select").innerHTML = c.models.map((m) => {
    const inAtlas = atlas && atlas.models.includes(m.name);
    const why = !m.usable ? " — not installed on this server" : !inAtlas ? " — not in this atlas" : "";
    return `<option value="${esc(m.name)}"${m.usable && inAtlas ? "" : " disabled"}${m.name === prev && m.usable && inAtlas ? " selected" : ""}>${esc(m.name)}${esc(why)}</option>`;
  }).join("");
  const sel = c.models.find((m) => m.name === $("#model-select").value);
  const missing = c.models.filter((m) => !m.usable).map((m) => m.name);
  $("#model-help").textContent = (sel ? MODEL_NOTES[sel.name] || `${sel.name} (${sel.kind})` : "No usable model for this atlas.")
    + (missing.length ? ` ${missing.join(" and ")} need model weights that are not installed here.` : "");
  const cov = atlas ? f.coverage[atlas.name] : null;
  $("#coverage-atlas").textContent = atlas ? atlas.name : "atlas";
  const meter = $("#coverage-meter");
  const frac = cov ? cov.fraction : 0;
  meter.querySelector(".meter-bar").style.width = `${Math.round(100 * frac)}%`;
  meter.setAttribute("aria-valuenow", String(Math.round(100 * frac)));
  meter.classList.toggle("bad", Boolean(cov && !cov.ok));
  meter.classList.toggle("warn", Boolean(cov && cov.ok && frac < 0.6));
  const text = $("#coverage-text");
  text.innerHTML = cov ? `${fmt(cov.n_present)} of the atlas's ${fmt(cov.panel_size)} panel genes are in your data (${pct(frac)}).` : "";
  if (cov && !cov.ok) {
    text.innerHTML += `<span class="alert alert-warn coverage-problem"><strong>Too few shared genes: this atlas would refuse the run.</strong> ${esc(cov.problem.message)}`
      + (cov.problem.fix ? `<span class="fix"><b>How to fix:</b> ${esc(cov.problem.fix)}</span>` : "") + "</span>";
  } else if (cov && cov.n_missing && frac < 0.9) {
    text.innerHTML += ` Missing panel genes include ${esc(cov.missing.slice(0, 5).join(", "))}.`;
  }
}

// ------------------------------------------------------------------ run
export async function runAnnotation(e) {
  e.preventDefault();
  showError($("#run-error"), null);
  const num = (on, el, scale = 1) => ($(on).checked && $(el).value !== "" ? Number($(el).value) / scale : null);
  const body = {
    atlas: $("#atlas-select").value || null, model: $("#model-select").value || null,
    min_counts: num("#qc-min-on", "#qc-min"), max_mito_fraction: num("#qc-mito-on", "#qc-mito", 100),
    skip_gene_check: $("#skip-gene-check").checked,
  };
  $("#run-btn").disabled = true;
  setProgress($("#run-progress"), 0, "Starting…");
  try {
    await call(`/sessions/${state.session.id}/run`, { method: "POST", body });
    await waitForRun();
    show("results");
    await loadResults();
  } catch (err) {
    showError($("#run-error"), err);
    $("#run-progress").hidden = true;
  } finally {
    $("#run-btn").disabled = false;
  }
}

async function waitForRun() {
  for (;;) {
    const st = await call(`/sessions/${state.session.id}/status`);
    setProgress($("#run-progress"), st.progress || 0, st.stage || st.state);
    if (st.state === "done") return st;
    if (st.state === "error") throw Object.assign(new Error(st.error?.message || "The annotation failed."), { fix: st.error?.fix });
    await new Promise((r) => setTimeout(r, 250));
  }
}
