// Shared page state and small DOM helpers of the workspace.
import { ApiError } from "./api.js";
import { escapeHtml as esc } from "./plots.js";

export const $ = (sel) => document.querySelector(sel);
export const SESSION_KEY = "cellatlas.session";
export const state = {
  config: null, session: null, results: null, inspected: null, selection: [],
  colorBy: "label", showRef: true, mapView: "user", compareColumn: null, review: { band: "uncertain", label: "", offset: 0, limit: 10, total: 0 },
};
export const fmt = (n) => Number(n).toLocaleString("en-US");
export const pct = (x) => `${(100 * x).toFixed(x > 0 && x < 0.01 ? 1 : 0)}%`;
export const bytes = (n) => (n > 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MB` : `${Math.max(1, Math.round(n / 1024))} KB`);

// ------------------------------------------------------------------ views and messages
export function show(view) {
  for (const v of ["signin", "upload", "check", "results"]) $(`#view-${v}`).hidden = v !== view;
  const order = ["upload", "check", "results"];
  document.querySelectorAll(".steps li").forEach((li) => {
    const cur = li.dataset.step === (view === "signin" ? "upload" : view);
    li.toggleAttribute("aria-current", cur);
    if (cur) li.setAttribute("aria-current", "step");
    li.classList.toggle("done", order.indexOf(li.dataset.step) < order.indexOf(view));
  });
  document.body.dataset.view = view;
  const h = $(`#view-${view} h1`);
  if (h) { h.setAttribute("tabindex", "-1"); h.focus({ preventScroll: true }); }
  window.scrollTo({ top: 0 });
}

export function showError(el, err) {
  if (!err) { el.hidden = true; el.innerHTML = ""; return; }
  const fix = err.fix ? `<p class="fix"><b>How to fix:</b> ${esc(err.fix)}</p>` : "";
  el.innerHTML = `<strong>${esc(err.message || String(err))}</strong>${fix}`;
  el.hidden = false;
  if (err instanceof ApiError && err.status === 401 && state.config?.require_api_key) {
    window.dispatchEvent(new CustomEvent("cellatlas:unauthorized", { detail: err.message }));
  }
}

export function setProgress(block, frac, stage) {
  block.hidden = false;
  const p = Math.round(100 * Math.max(0, Math.min(1, frac)));
  block.querySelector(".progress-bar").style.width = `${p}%`;
  block.querySelector("[role=progressbar]").setAttribute("aria-valuenow", String(p));
  block.querySelector(".progress-label span:first-child").textContent = stage;
  block.querySelector(".progress-label span:last-child").textContent = `${p}%`;
}
