// retrac serve: the page. Plain JavaScript, no build step, no external resources.
// It calls the same JSON API any client uses: GET /indexes, GET /examples, POST /attribute,
// POST /audit, GET /samples/{id}.
"use strict";

const state = { info: null, methods: [], query: null, pickedExample: null, busy: false, shown: {} };
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "text") node.textContent = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of [].concat(children)) if (child) node.append(child);
  return node;
}

function setStatus(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

function fmt(score) {
  if (score === null || Number.isNaN(score)) return "n/a";
  const a = Math.abs(score);
  return a !== 0 && (a < 1e-3 || a >= 1e4) ? score.toExponential(3) : score.toPrecision(4);
}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  if (!response.ok) {
    const detail = body && body.detail ? body.detail : response.statusText;
    const retry = response.headers.get("Retry-After");
    throw new Error(`${response.status}: ${detail}${retry ? ` (retry after ${retry} s)` : ""}`);
  }
  return body;
}

// ------------------------------------------------------------------------------------ set-up
async function init() {
  try {
    state.info = await api("/indexes");
  } catch (error) {
    setStatus(`Cannot read /indexes: ${error.message}`, true);
    return;
  }
  const info = state.info;
  state.methods = info.indexes.map((x) => x.method);
  const parts = info.indexes.map((x) => {
    const recall = x.recall && x.recall.recall_at_10 !== undefined ? `, recall@10 ${x.recall.recall_at_10.toFixed(3)}` : ", exact";
    return `${x.method} (${x.num_vectors} samples x ${x.dim} dims, ${x.factory}${recall})`;
  });
  const ev = info.query_events;
  $("loaded").textContent = `Loaded: ${parts.join("; ")}. Query events ${ev.num_timesteps} x ${ev.num_noise}. ` +
    `Images ${info.image_shape.join(" x ")}` + (info.latent_shape ? ` (latents ${info.latent_shape.join(" x ")})` : "") +
    "." + (info.text_conditional ? " Text-conditioned: give a prompt." : "") + (info.audit ? " Memorization audit loaded." : "");
  $("prompt-box").hidden = !info.text_conditional;  // the prompt box only for a model that needs one
  $("score-note").textContent = `Score: ${info.score_meaning}. Scores compare across queries of one method, not across methods.`;
  const k = $("k");
  k.max = info.limits.max_k;
  k.value = Math.min(6, info.limits.max_k);
  const box = $("methods");
  for (const method of state.methods) {
    box.append(el("label", {}, [
      el("input", { type: "checkbox", checked: true, value: method, onchange: applyMethodToggles }),
      ` ${method}`,
    ]));
  }
  try {
    const examples = await api("/examples");
    renderExamples(examples);
  } catch (error) {
    setStatus(`Cannot read /examples: ${error.message}`, true);
  }
  document.body.dataset.state = "ready";
  setStatus("Ready: drop or choose an image, or pick an example.");
}

function renderExamples(examples) {
  if (!examples.length) return;
  $("examples-box").hidden = false;
  const list = $("examples");
  examples.forEach((example, i) => {
    const label = example.label === null ? example.id : `${example.id} (label ${example.label})`;
    list.append(el("li", {}, el("button", {
      type: "button", "aria-pressed": "false", title: label, "aria-label": `example ${label}`,
      tabindex: i === 0 ? "0" : "-1", dataset: { example: example.id },
      onclick: (event) => pickExample(example, event.currentTarget),
    }, el("img", { src: example.image_url, alt: "", width: 32, height: 32 }))));
  });
  // One Tab stop for the whole gallery; arrow keys, Home and End move within it (roving tabindex).
  list.addEventListener("keydown", (event) => {
    const buttons = [...list.querySelectorAll("button")];
    const at = buttons.indexOf(document.activeElement);
    if (at < 0) return;
    const perRow = Math.max(1, Math.round(list.clientWidth / buttons[0].offsetWidth));
    const step = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: perRow, ArrowUp: -perRow }[event.key];
    let next = step === undefined ? null : Math.min(buttons.length - 1, Math.max(0, at + step));
    if (event.key === "Home") next = 0;
    if (event.key === "End") next = buttons.length - 1;
    if (next === null) return;
    event.preventDefault();
    buttons[at].tabIndex = -1;
    buttons[next].tabIndex = 0;
    buttons[next].focus();
  });
}

function applyMethodToggles() {
  const shown = new Set([...$("methods").querySelectorAll("input:checked")].map((x) => x.value));
  for (const column of document.querySelectorAll("#results .method")) column.hidden = !shown.has(column.dataset.method);
}

// ------------------------------------------------------------------------------------ queries
function pickExample(example, button) {
  for (const other of $("examples").querySelectorAll("button")) other.setAttribute("aria-pressed", "false");
  button.setAttribute("aria-pressed", "true");
  state.pickedExample = example.id;
  runQuery({ example: example.id, name: example.id });
}

function pickFile(file) {
  if (!file) return;
  for (const other of $("examples").querySelectorAll("button")) other.setAttribute("aria-pressed", "false");
  runQuery({ file, name: file.name });
}

function formFor(query, extra) {
  const form = new FormData();
  if (query.file) form.append("files", query.file, query.file.name);
  else form.append("examples", query.example);
  for (const [key, value] of Object.entries(extra)) form.append(key, String(value));
  if (state.info.text_conditional) form.append("prompt", $("prompt").value);
  return form;
}

function byMethod(payload) {
  return payload.results ? payload.results : { [payload.method]: payload };
}

async function runQuery(query) {
  if (state.busy) { setStatus("Still computing the previous query; wait a moment.", true); return; }
  state.busy = true;
  state.query = query;
  document.body.dataset.state = "busy";
  setStatus(`Computing the query gradients of ${query.name}\u2026`);
  const k = Math.max(1, Math.min(Number($("k").value) || 6, state.info.limits.max_k));
  const wantOpponents = $("show-opponents").checked;
  state.shown = { k: String($("k").value), opponents: wantOpponents };
  try {
    const calls = [api("/attribute", { method: "POST", body: formFor(query, { k, opponents: false }) })];
    if (wantOpponents) calls.push(api("/attribute", { method: "POST", body: formFor(query, { k, opponents: true }) }));
    if (state.info.audit) calls.push(api("/audit", { method: "POST", body: formFor(query, { k }) }));
    const answers = await Promise.all(calls);
    const proponents = byMethod(answers[0]);
    const opponents = wantOpponents ? byMethod(answers[1]) : null;
    const audit = state.info.audit ? answers[answers.length - 1] : null;
    renderQuery(query, answers[0].query_image_urls[0]);
    renderResults(proponents, opponents);
    renderAudit(audit ? audit.records[0] : null);
    document.body.dataset.state = "done";
    setStatus(`Top ${k} for ${query.name} under ${Object.keys(proponents).join(", ")}. Select a training sample to see the queries it influences most.`);
  } catch (error) {
    document.body.dataset.state = "error";
    setStatus(`The server refused the query: ${error.message}`, true);
  } finally {
    state.busy = false;
  }
}

function renderQuery(query, imageUrl) {
  $("query").hidden = false;
  $("query-image").src = imageUrl;
  $("query-name").textContent = query.name;
}

function sampleButton(id, score, thumbnail, extra = "") {
  return el("button", {
    type: "button", class: "sample", dataset: { id },
    "aria-label": `${id}, score ${fmt(score)}${extra}. Show the queries it influences most.`,
    onclick: () => showSample(id),
    title: id,
  }, [
    el("img", { src: thumbnail, alt: "", width: 56, height: 56 }),
    el("span", { class: "id", text: id }),
    el("span", { class: "score", text: fmt(score) }),
  ]);
}

function resultList(result, kind) {
  const list = el("ol", { class: "grid", dataset: { method: result.method, kind }, "aria-label": `${result.method} ${kind}` });
  result.ids[0].forEach((id, j) => list.append(el("li", {}, sampleButton(id, result.scores[0][j], result.thumbnails[0][j]))));
  return list;
}

function renderResults(proponents, opponents) {
  const box = $("results");
  box.replaceChildren();
  for (const method of Object.keys(proponents)) {
    const column = el("section", { class: "method", dataset: { method }, "aria-label": `method ${method}` }, [
      el("h3", { text: method }),
      el("h4", { class: "pro", text: "Proponents (highest scores)", title: "a gradient step on these lowers the query's loss" }),
      resultList(proponents[method], "proponents"),
    ]);
    if (opponents && opponents[method]) {
      column.append(el("h4", { class: "opp", text: "Opponents (most negative scores)", title: "a gradient step on these raises the query's loss" }));
      column.append(resultList(opponents[method], "opponents"));
    }
    box.append(column);
  }
  applyMethodToggles();
}

function renderAudit(record) {
  const box = $("audit");
  box.replaceChildren();
  if (!record) { box.hidden = true; return; }
  box.hidden = false;
  box.dataset.verdict = record.verdict;
  const text = el("div", { class: "audit-text" }, [
    el("h3", {}, ["Memorization audit: ", el("span", { class: `verdict ${record.verdict}`, text: record.verdict })]),
    el("p", { class: "note", text:
      `relative distance r = ${fmt(record.relative_distance)} (copy below ${fmt(record.thresholds.copy)}, near below ` +
      `${fmt(record.thresholds.near)}): nearest L2 distance ${fmt(record.nn_distance)} over the mean ` +
      `${fmt(record.mean_neighbour_distance)} of the ${record.num_neighbours} nearest distinct training images.` }),
  ]);
  const ranks = Object.entries(record.proponents).map(([m, p]) => `${m} ${p.nn_rank === null ? "not in the top k" : `rank ${p.nn_rank}`}`);
  if (ranks.length) text.append(el("p", { class: "note", text: `The nearest training image among the proponents: ${ranks.join(", ")}.` }));
  const list = el("ol", { class: "grid", dataset: { kind: "nearest" }, "aria-label": "nearest training images" });
  for (const near of record.nearest) {
    const dup = near.duplicates > 1 ? `, ${near.duplicates} copies` : "";
    list.append(el("li", {}, sampleButton(near.id, near.distance, near.image_url, ` (L2 distance${dup})`)));
  }
  box.append(text, el("div", { class: "audit-nearest" }, [el("h4", { text: "Nearest training images (L2 distance)" }), list]));
}

// ------------------------------------------------------------------------------------ one sample
async function showSample(id) {
  const dialog = $("sample");
  $("sample-title").textContent = `Training sample ${id}`;
  $("sample-image").src = `/samples/${encodeURIComponent(id)}/image.png`;
  $("sample-meta").replaceChildren();
  $("sample-influenced").replaceChildren();
  $("sample-note").textContent = "Loading\u2026";
  if (!dialog.open) dialog.showModal();
  try {
    const info = await api(`/samples/${encodeURIComponent(id)}`);
    const meta = { id: info.id, row: info.row, label: info.label, shape: info.shape.join(" x ") };
    if (info.duplicates !== undefined) meta["exact copies"] = info.duplicates;
    for (const [key, value] of Object.entries(meta)) {
      $("sample-meta").append(el("dt", { text: key }), el("dd", { text: value === null ? "none" : String(value) }));
    }
    const n = info.queries_considered;
    $("sample-note").textContent = `Scored against the ${n} ${n === 1 ? "query" : "queries"} this server has answered ` +
      "(kept in memory), highest score first.";
    for (const [method, rows] of Object.entries(info.influenced)) {
      const list = el("ol", { class: "grid", dataset: { method, kind: "influenced" }, "aria-label": `${method} influenced queries` });
      for (const row of rows) {
        list.append(el("li", {}, el("div", { class: "sample", role: "group", "aria-label": `${row.query_id}, score ${fmt(row.score)}` }, [
          el("img", { src: row.image_url, alt: "", width: 56, height: 56 }),
          el("span", { class: "id", text: row.query_id }),
          el("span", { class: "score", text: fmt(row.score) }),
        ])));
      }
      $("sample-influenced").append(el("section", { class: "method", dataset: { method } }, [el("h3", { text: method }), list]));
    }
  } catch (error) {
    $("sample-note").textContent = `Cannot read the sample: ${error.message}`;
  }
}

// ------------------------------------------------------------------------------------ wiring
function wire() {
  $("file").addEventListener("change", (event) => pickFile(event.target.files[0]));
  const drop = $("drop");
  for (const name of ["dragenter", "dragover"]) drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  for (const name of ["dragleave", "drop"]) drop.addEventListener(name, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    if (event.dataTransfer && event.dataTransfer.files.length) pickFile(event.dataTransfer.files[0]);
  });
  // Ask again when k or "opponents too" changed since the answer on screen (not on every blur).
  const rerun = () => {
    const k = String($("k").value), opponents = $("show-opponents").checked;
    if (state.query && !state.busy && (state.shown.k !== k || state.shown.opponents !== opponents)) runQuery(state.query);
  };
  $("k").addEventListener("change", rerun);
  $("show-opponents").addEventListener("change", rerun);
  $("prompt").addEventListener("change", () => { if (state.query && !state.busy) runQuery(state.query); });
  init();
}

document.addEventListener("DOMContentLoaded", wire);
