// HTTP calls of the workspace: JSON endpoints, the streamed upload and downloads.
// The API key (when the server needs one) lives in sessionStorage and goes out as a Bearer token.

const KEY = "cellatlas.apiKey";
const BASE = "/workspace/api";

export class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    const detail = body && body.detail;
    let message = err.message || (typeof detail === "string" ? detail : null);
    if (!message && Array.isArray(detail)) {
      message = detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
    }
    super(message || `The server answered ${status}.`);
    this.status = status;
    this.code = err.code || null;
    this.fix = err.fix || null;
    this.field = err.field || null;
  }
}

export const auth = {
  get key() { return sessionStorage.getItem(KEY); },
  set key(v) { v ? sessionStorage.setItem(KEY, v) : sessionStorage.removeItem(KEY); },
  headers() { return this.key ? { Authorization: `Bearer ${this.key}` } : {}; },
};

async function parse(res) {
  const text = await res.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = { detail: text.slice(0, 300) }; }
  if (!res.ok) throw new ApiError(res.status, body);
  return body;
}

/** GET/POST JSON under /workspace/api. */
export async function call(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json", ...auth.headers() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(BASE + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  return parse(res);
}

/** Upload a File as the raw request body, reporting progress (0..1) while it is sent. */
export function upload(file, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `${BASE}/sessions?filename=${encodeURIComponent(file.name)}`);
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    for (const [k, v] of Object.entries(auth.headers())) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) onProgress(e.loaded / e.total); };
    xhr.upload.onload = () => onProgress(1, true);
    xhr.onerror = () => reject(new ApiError(0, { detail: "The connection to the server failed during the upload." }));
    xhr.onload = () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch { body = { detail: xhr.responseText.slice(0, 300) }; }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else reject(new ApiError(xhr.status, body));
    };
    xhr.send(file);
  });
}

/** Fetch a download (with the key) and hand it to the browser as a file. */
export async function download(sessionId, kind) {
  const res = await fetch(`${BASE}/sessions/${sessionId}/download/${kind}`, { headers: auth.headers() });
  if (!res.ok) await parse(res);
  const blob = await res.blob();
  const disposition = res.headers.get("Content-Disposition") || "";
  const match = /filename\*?=(?:UTF-8'')?"?([^";]+)"?/i.exec(disposition);
  const name = match ? decodeURIComponent(match[1]) : `cellatlas.${kind}`;
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 30000);
  return { name, size: blob.size };
}
