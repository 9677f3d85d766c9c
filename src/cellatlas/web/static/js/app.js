// Cell Atlas workspace: upload -> check & run -> results (plots, review, relabel, download).
import { auth, call, upload } from "./api.js";
import { renderFacts, runAnnotation, updateAtlas } from "./check.js";
import { loadPlotly } from "./plots.js";
import { bindResults, loadResults } from "./results.js";
import { $, bytes, fmt, SESSION_KEY, setProgress, show, showError, state } from "./ui.js";

// ------------------------------------------------------------------ sign-in
function updateAccount() {
  const badge = $("#mode-badge");
  badge.hidden = false;
  if (!state.config.require_api_key) {
    badge.textContent = "Local mode · no key needed";
    badge.className = "badge badge-muted";
  } else {
    badge.textContent = auth.key ? "Signed in" : "API key required";
    badge.className = auth.key ? "badge badge-ok" : "badge badge-muted";
  }
  $("#signout").hidden = !(state.config.require_api_key && auth.key);
}

function signOut(message) {
  auth.key = null;
  sessionStorage.removeItem(SESSION_KEY);
  updateAccount();
  $("#signin-error").textContent = message || "";
  show("signin");
}

async function signIn(e) {
  e.preventDefault();
  const key = $("#api-key").value.trim();
  if (!key) { $("#signin-error").textContent = "Enter your API key."; return; }
  auth.key = key;
  try {
    const who = await call("/whoami");
    $("#api-key").value = "";
    $("#signin-error").textContent = "";
    updateAccount();
    if (who.credits != null) $("#mode-badge").textContent = `Signed in · ${fmt(who.credits)} credits`;
    show("upload");
  } catch (err) {
    auth.key = null;
    updateAccount();
    $("#signin-error").textContent = err.status === 401 ? `That key was not accepted: ${err.message}` : err.message;
  }
}

// ------------------------------------------------------------------ upload
const ACCEPT = /\.(h5ad|h5|zip|csv|tsv|csv\.gz|tsv\.gz)$/i;

async function handleFile(file) {
  showError($("#upload-error"), null);
  if (!file) return;
  if (!ACCEPT.test(file.name)) {
    showError($("#upload-error"), {
      message: `“${file.name}” is not a file type the workspace reads.`,
      fix: "Upload an AnnData .h5ad, a 10x Genomics .h5, a .zip of a Matrix Market folder (matrix.mtx, features.tsv, barcodes.tsv) or a cells × genes .csv.",
    });
    return;
  }
  if (file.size > state.config.max_upload_bytes) {
    showError($("#upload-error"), { message: `“${file.name}” (${bytes(file.size)}) is larger than this server's limit of ${bytes(state.config.max_upload_bytes)}.`, fix: "Subset the cells or use the Python client (annotate_large) for large datasets." });
    return;
  }
  const dz = $("#dropzone"), block = $("#upload-progress");
  dz.classList.add("busy");
  setProgress(block, 0, `Uploading ${file.name}…`);
  try {
    const out = await upload(file, (f, done) => setProgress(block, done ? 1 : f, done ? "Reading and checking the file…" : `Uploading ${file.name}…`));
    state.session = { id: out.session, filename: out.filename, format: out.format, size: out.size_bytes, facts: out.facts };
    sessionStorage.setItem(SESSION_KEY, out.session);
    renderFacts();
    show("check");
    loadPlotly(state.config.plotly_url).catch(() => {}); // fetch the plotting library while the user decides
  } catch (err) {
    showError($("#upload-error"), err);
  } finally {
    dz.classList.remove("busy");
    block.hidden = true;
    $("#file-input").value = "";
  }
}

function bindDropzone() {
  const dz = $("#dropzone");
  $("#file-input").addEventListener("change", (e) => handleFile(e.target.files[0]));
  ["dragenter", "dragover"].forEach((t) => dz.addEventListener(t, (e) => { e.preventDefault(); dz.classList.add("dragover"); }));
  ["dragleave", "drop"].forEach((t) => dz.addEventListener(t, (e) => { e.preventDefault(); dz.classList.remove("dragover"); }));
  dz.addEventListener("drop", (e) => handleFile(e.dataTransfer.files[0]));
}

function newUpload() {
  sessionStorage.removeItem(SESSION_KEY);
  state.session = null; state.results = null; state.inspected = null;
  $("#inspector").innerHTML = '<p class="muted">Click a cell on the map or in the review queue to see its call, alternates, marker evidence and QC.</p>';
  show("upload");
}

async function resume() {
  const sid = sessionStorage.getItem(SESSION_KEY);
  if (!sid) return false;
  try {
    const s = await call(`/sessions/${sid}`);
    if (!s.facts) return false;
    state.session = { id: s.id, filename: s.filename, format: s.format, size: s.size_bytes, facts: s.facts };
    renderFacts();
    if (s.status?.state === "done") { show("results"); await loadResults(); } else show("check");
    return true;
  } catch { sessionStorage.removeItem(SESSION_KEY); return false; }
}

async function init() {
  bindDropzone();
  bindResults();
  $("#signin-form").addEventListener("submit", signIn);
  $("#signout").addEventListener("click", () => signOut());
  window.addEventListener("cellatlas:unauthorized", (e) => signOut(e.detail));
  $("#run-form").addEventListener("submit", runAnnotation);
  $("#atlas-select").addEventListener("change", updateAtlas);
  $("#model-select").addEventListener("change", updateAtlas);
  for (const [on, el] of [["#qc-min-on", "#qc-min"], ["#qc-mito-on", "#qc-mito"]]) $(on).addEventListener("change", (e) => { $(el).disabled = !e.target.checked; });
  $("#new-upload-1").addEventListener("click", newUpload);
  $("#new-upload-2").addEventListener("click", newUpload);
  try {
    state.config = await call("/config");
  } catch (err) {
    showError($("#global-error"), err);
    return;
  }
  $("#version").textContent = `v${state.config.version}`;
  updateAccount();
  if (state.config.require_api_key && !auth.key) { show("signin"); return; }
  if (!(await resume())) show("upload");
  document.body.dataset.ready = "true";
}

init().finally(() => { document.body.dataset.ready = "true"; });
