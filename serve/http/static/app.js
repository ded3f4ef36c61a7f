// The editmem page: an edit manager over /v1/edits and a playground over /v1/completions. Plain JS, no build.
"use strict";

const $ = (id) => document.getElementById(id);
const PAGE = 20;
let offset = 0;
let model = null;

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "muted";
}

async function api(method, path, body) {
  const headers = {};
  const key = $("key").value.trim();
  if (key) headers["Authorization"] = "Bearer " + key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((data.error && data.error.message) || r.status + " " + r.statusText);
  return data;
}

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  return td;
}

function button(label, cls, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.className = cls;
  b.addEventListener("click", onClick);
  return b;
}

function showEdits(rows) {
  const body = $("edits").querySelector("tbody");
  body.replaceChildren();
  for (const { edit, score } of rows) {
    const tr = document.createElement("tr");
    tr.dataset.id = edit.id;
    tr.append(cell(edit.id), cell(edit.version), cell(edit.prompt), cell(edit.target_new),
              cell(score === undefined ? "" : score.toFixed(3)));
    const actions = document.createElement("td");
    actions.className = "actions";
    actions.append(
      button("correct", "correct", () => correct(edit)),
      button("history", "show-history", () => showHistory(edit.id)),
      button("delete", "delete", () => remove(edit.id)));
    tr.append(actions);
    body.append(tr);
  }
}

async function listEdits() {
  const data = await api("GET", `/v1/edits?limit=${PAGE}&offset=${offset}`);
  showEdits(data.data.map((edit) => ({ edit })));
  const last = Math.min(offset + PAGE, data.total);
  $("page-info").textContent = data.total ? ` ${offset + 1}-${last} of ${data.total} (change ${data.change}) ` : " no edits ";
  $("prev").disabled = offset === 0;
  $("next").disabled = last >= data.total;
}

async function search(q) {
  const data = await api("GET", `/v1/edits/search?k=10&q=${encodeURIComponent(q)}`);
  showEdits(data.data);
  $("page-info").textContent = ` ${data.data.length} nearest `;
}

async function correct(edit) {
  const target = window.prompt(`New target for "${edit.prompt}"`, edit.target_new);
  if (target === null || target === edit.target_new) return;
  const v = await api("PATCH", `/v1/edits/${edit.id}`, { target_new: target });
  await refresh(edit.id);
  setStatus(`edit ${v.id} is now version ${v.version}`);
}

async function remove(id) {
  const t = await api("DELETE", `/v1/edits/${id}`);
  await refresh(id);
  setStatus(`edit ${id} deleted (version ${t.version})`);
}

async function showHistory(id) {
  const data = await api("GET", `/v1/edits/${id}/history`);
  $("history-id").textContent = id;
  const list = $("history-list");
  list.replaceChildren();
  for (const v of data.data) {
    const li = document.createElement("li");
    li.dataset.version = v.version;
    const text = document.createElement("span");
    text.textContent = `v${v.version}: ${v.prompt} → ${v.target_new}`;
    if (v.deleted) { text.className = "deleted"; text.textContent += " (deleted)"; }
    li.append(text, " ");
    if (!v.deleted && v.valid_to) {
      li.append(button("roll back to this", "rollback", async () => {
        const r = await api("POST", `/v1/edits/${id}/rollback`, { version: v.version });
        await refresh(id);
        setStatus(`edit ${id} rolled back to v${v.version} (now version ${r.version})`);
      }));
    }
    list.append(li);
  }
  $("history").hidden = false;
}

async function refresh(historyId) {
  await listEdits();
  if (historyId !== undefined && !$("history").hidden) await showHistory(historyId);
}

function describe(shaped) {
  if (shaped.route === "base") return `no edit in scope: the base model answered (change ${shaped.change ?? "-"})`;
  return `shaped by edit ${shaped.edit_id} v${shaped.version} via ${shaped.route} ` +
    `(score ${shaped.score.toFixed(3)} ≥ ${shaped.threshold.toFixed(3)}; change ${shaped.change}): ` +
    `${shaped.edit_prompt} → ${shaped.target_new}`;
}

async function ask(question) {
  if (!model) throw new Error("this server has no model loaded");
  const max_tokens = Number($("ask-tokens").value) || 12;
  $("answer-memory").textContent = "…";
  $("answer-base").textContent = "…";
  const withMemory = await api("POST", "/v1/completions", { model, prompt: question, max_tokens });
  $("answer-memory").textContent = withMemory.choices[0].text;
  $("answer-shaped").textContent = describe(withMemory.editmem);
  $("answer-shaped").dataset.editId = withMemory.editmem.edit_id ?? "";
  $("answer-shaped").dataset.version = withMemory.editmem.version ?? "";
  const base = await api("POST", "/v1/completions",
                         { model, prompt: question, max_tokens, editmem: { disable: true } });
  $("answer-base").textContent = base.choices[0].text;
}

function guarded(fn) {
  return async (event) => {
    if (event) event.preventDefault();
    try { await fn(); } catch (err) { setStatus(err.message, true); }
  };
}

$("add-form").addEventListener("submit", guarded(async () => {
  const body = { prompt: $("add-prompt").value, target_new: $("add-target").value };
  if ($("add-subject").value.trim()) body.subject = $("add-subject").value.trim();
  const e = await api("POST", "/v1/edits", body);
  $("add-form").reset();
  await listEdits();
  setStatus(`added edit ${e.id}`);
}));
$("search-form").addEventListener("submit", guarded(async () => {
  const q = $("search").value.trim();
  if (q) await search(q); else await listEdits();
}));
$("list-btn").addEventListener("click", guarded(async () => { offset = 0; await listEdits(); }));
$("prev").addEventListener("click", guarded(async () => { offset = Math.max(0, offset - PAGE); await listEdits(); }));
$("next").addEventListener("click", guarded(async () => { offset += PAGE; await listEdits(); }));
$("ask-form").addEventListener("submit", guarded(async () => ask($("ask-input").value)));
$("key").value = sessionStorage.getItem("editmem-key") || "";
$("key").addEventListener("change", guarded(async () => {
  sessionStorage.setItem("editmem-key", $("key").value.trim());
  await start();
}));

async function start() {
  const models = await api("GET", "/v1/models");
  model = models.data.length ? models.data[0].id : null;
  $("server-info").textContent = model ? `model ${model}` : "no model loaded (edit store only)";
  await listEdits();
  setStatus("ready");
}
guarded(start)();
