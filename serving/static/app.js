// The search / compare / vote page over the /v1 API. No framework, no build step.
//
// State that can be shared lives in the URL (q, like, mode, k, rerank, rephrase): a search
// pushes a history entry and the back button replays it. An uploaded or pasted image cannot
// live in a URL, so it is kept in memory only. In compare mode a text query asks /v1/compare
// for two rows in random order (A, B); a vote names the preferred row, and the answer reveals
// which model was which.
"use strict";

const $ = (sel) => document.querySelector(sel);
const KEY_STORE = "aligner.apiKey";
const el = {
  form: $("#search-form"), query: $("#query"), mode: $("#mode"), k: $("#k"),
  rerank: $("#rerank"), rephrase: $("#rephrase"), upload: $("#upload"), key: $("#api-key"),
  keyBox: $("#key-box"), status: $("#status"), results: $("#results"), vote: $("#vote"),
  ack: $("#vote-ack"), comment: $("#comment"), download: $("#download"),
  queryImage: $("#query-image"), clearImage: $("#clear-image"),
};
let imageB64 = null;      // an uploaded or pasted query image (base64, no data: prefix)
let imageName = "";
let last = null;          // what the Download button saves
let comparison = null;    // {id, rows: [{label, el}]} of the comparison on screen
let compareModels = ["base", "aligned"];
let seq = 0;              // the latest search; older answers are dropped

// ------------------------------------------------------------------------------ helpers

function setStatus(text, isError = false) {
  el.status.textContent = text;
  el.status.classList.toggle("error", isError);
}

function headers(json = true) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = el.key.value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function errorText(status, body) {
  let detail = body && body.detail;
  if (Array.isArray(detail)) {
    detail = detail.map((d) => (d.loc ? d.loc.slice(1).join(".") + ": " : "") + d.msg)
      .join("; ");
  }
  if (status === 401) return "an API key is needed for this (open \"API key\")";
  if (status === 429) return "too many requests; wait a moment";
  if (status === 413) return "the image is too large for this server";
  return (detail || "request failed") + " (HTTP " + status + ")";
}

async function api(path, body) {
  const init = body === undefined ? { headers: headers(false) }
    : { method: "POST", headers: headers(), body: JSON.stringify(body) };
  const resp = await fetch(path, init);
  let data = null;
  try { data = await resp.json(); } catch (e) { data = null; }
  if (!resp.ok) {
    const err = new Error(errorText(resp.status, data));
    err.status = resp.status;
    throw err;
  }
  return data;
}

// ------------------------------------------------------------------------------ URL state

function readUrl() {
  const p = new URLSearchParams(location.search);
  el.query.value = p.get("q") || "";
  const mode = p.get("mode");
  if (mode && [...el.mode.options].some((o) => o.value === mode)) el.mode.value = mode;
  const k = p.get("k");
  if (k) {
    if (![...el.k.options].some((o) => o.value === k) && /^\d+$/.test(k)) {
      el.k.add(new Option(k, k));
    }
    el.k.value = k;
  }
  el.rerank.checked = p.get("rerank") === "1";
  el.rephrase.checked = p.get("rephrase") === "1";
  return { like: p.get("like") || null };
}

function writeUrl(like) {
  const p = new URLSearchParams();
  if (el.query.value.trim()) p.set("q", el.query.value.trim());
  if (like) p.set("like", like);
  p.set("mode", el.mode.value);
  p.set("k", el.k.value);
  if (el.rerank.checked) p.set("rerank", "1");
  if (el.rephrase.checked) p.set("rephrase", "1");
  const url = location.pathname + "?" + p.toString();
  if (url !== location.pathname + location.search) history.pushState({ like }, "", url);
}

// ------------------------------------------------------------------------------ rendering

async function loadImage(img, url, card) {
  img.alt = card.dataset.id;
  img.addEventListener("error", () => hideBroken(card));
  if (!el.key.value.trim()) { img.src = url; return; }
  try {
    // With a key (a server that protects reads), <img src> cannot send it: fetch instead.
    const resp = await fetch(url, { headers: headers(false) });
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    img.src = URL.createObjectURL(await resp.blob());
  } catch (e) {
    hideBroken(card);
  }
}

function hideBroken(card) {
  if (card.hidden) return;
  card.hidden = true;
  const n = document.querySelectorAll(".card[hidden]").length;
  el.results.dataset.hidden = String(n);
  const note = " (" + n + " image" + (n === 1 ? "" : "s") + " could not be shown)";
  setStatus(el.status.textContent.replace(/ \(\d+ images? could not be shown\)$/, "") + note);
}

function card(result) {
  const fig = document.createElement("figure");
  fig.className = "card";
  fig.setAttribute("data-testid", "result");
  fig.dataset.id = result.id;
  const img = document.createElement("img");
  img.setAttribute("data-testid", "result-image");
  fig.append(img);
  const cap = document.createElement("figcaption");
  cap.textContent = result.caption || result.id;
  fig.append(cap);
  const meta = document.createElement("div");
  meta.className = "meta";
  const rank = document.createElement("span");
  rank.textContent = "#" + result.rank;
  const aes = document.createElement("span");
  aes.textContent = result.aesthetic == null ? "" : "aesthetic " + result.aesthetic.toFixed(2);
  aes.title = "the low-level aesthetic scorer's score";
  meta.append(rank, aes);
  fig.append(meta);
  const more = document.createElement("button");
  more.type = "button";
  more.textContent = "more like this";
  more.setAttribute("data-testid", "more-like-this");
  more.addEventListener("click", () => {
    el.query.value = "";
    clearImage();
    search({ like: result.id, push: true });
  });
  fig.append(more);
  loadImage(img, result.image_url, fig);
  return fig;
}

function row(label, sub, results, testid) {
  const sec = document.createElement("section");
  sec.className = "row";
  sec.setAttribute("data-testid", testid);
  const h = document.createElement("h2");
  const name = document.createElement("span");
  name.textContent = label;
  const model = document.createElement("span");
  model.className = "model";
  model.textContent = sub;
  h.append(name, model);
  const grid = document.createElement("div");
  grid.className = "grid";
  results.forEach((r) => grid.append(card(r)));
  sec.append(h, grid);
  if (!results.length) {
    const p = document.createElement("p");
    p.textContent = "no results";
    sec.append(p);
  }
  return { el: sec, model };
}

function resetVote(show) {
  el.vote.hidden = !show;
  el.ack.hidden = true;
  el.ack.textContent = "";
  el.comment.value = "";
  el.vote.querySelectorAll(".vote-buttons button").forEach((b) => { b.disabled = false; });
}

// ------------------------------------------------------------------------------ search

function describe(q) {
  if (q.like) return "more like " + q.like;
  if (q.image_b64) return "the image " + (imageName || "pasted") + (q.text ? " + \"" + q.text + "\"" : "");
  return "\"" + q.text + "\"";
}

async function search({ like = null, push = true } = {}) {
  const text = el.query.value.trim();
  if (!text && !like && !imageB64) { setStatus("type a query, choose or paste an image", true); return; }
  if (push) writeUrl(like);
  const my = ++seq;
  const k = parseInt(el.k.value, 10);
  const q = { k };
  if (text) q.text = text;
  if (like) q.like = like;
  else if (imageB64) q.image_b64 = imageB64;
  const mode = el.mode.value;
  el.results.replaceChildren();
  el.results.dataset.hidden = "0";
  el.results.classList.toggle("compare", mode === "compare");
  resetVote(false);
  comparison = null;
  el.download.disabled = true;
  setStatus("searching " + describe(q) + " ...");
  const t0 = performance.now();
  try {
    if (mode === "compare" && text && !like && !imageB64) {
      const c = await api("/v1/compare", { text, k });
      if (my !== seq) return;
      const a = row("A", "", c.left.results, "row-left");
      const b = row("B", "", c.right.results, "row-right");
      el.results.append(a.el, b.el);
      comparison = { id: c.comparison_id, a, b };
      last = { mode, query: text, k, comparison_id: c.comparison_id, left: c.left.results,
               right: c.right.results };
      resetVote(true);
      setStatus("two rows for " + describe(q) + " in random order (" +
                Math.round(performance.now() - t0) + " ms). Which is better?");
    } else if (mode === "compare") {
      // Votes train text queries; an image query shows both models, named, without a vote.
      const answers = await Promise.all(compareModels.map((m) => api("/v1/search",
        Object.assign({ model: m }, q))));
      if (my !== seq) return;
      answers.forEach((r, i) => el.results.append(
        row(r.model, "", r.results, i ? "row-right" : "row-left").el));
      last = { mode, query: q.text || null, like: q.like || null, k,
               rows: Object.fromEntries(answers.map((r) => [r.model, r.results])) };
      setStatus("both models for " + describe(q) + " (votes are collected for text queries)");
    } else {
      q.model = mode;
      if (el.rerank.checked) q.rerank = true;
      if (el.rephrase.checked && text) q.rephrase = true;
      const r = await api("/v1/search", q);
      if (my !== seq) return;
      let sub = r.index;
      if (r.query.rephrase === "ok") sub += " · searched: " + r.query.searched;
      else if (r.query.rephrase !== "off") sub += " · rephrasing " + r.query.rephrase;
      if (r.rerank !== "off") sub += " · re-rank " + r.rerank;
      el.results.append(row(r.model, sub, r.results, "row-single").el);
      last = { mode, query: q.text || null, like: q.like || null, k, response: r };
      setStatus(r.results.length + " results for " + describe(q) + " (" +
                Math.round(performance.now() - t0) + " ms)");
    }
    el.download.disabled = false;
  } catch (e) {
    if (my !== seq) return;
    setStatus(e.message, true);
    if (e.status === 401) el.keyBox.open = true;
  }
}

// ------------------------------------------------------------------------------ voting

function newKey() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  const b = new Uint8Array(16);
  crypto.getRandomValues(b);  // available outside secure contexts too
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

async function vote(preferred) {
  if (!comparison) return;
  const buttons = el.vote.querySelectorAll(".vote-buttons button");
  buttons.forEach((b) => { b.disabled = true; });
  const confidence = parseInt(
    (el.vote.querySelector("input[name=confidence]:checked") || { value: "3" }).value, 10);
  const body = { comparison_id: comparison.id, preferred, confidence };
  const comment = el.comment.value.trim();
  if (comment) body.comment = comment;
  // one Idempotency-Key per vote: a retry of the same vote (after a network error or a 503)
  // resends it, so the server records the vote once; a different choice gets a new key
  const sig = JSON.stringify(body);
  if (!comparison.pending || comparison.pending.sig !== sig) {
    comparison.pending = { sig, key: newKey() };
  }
  body.idempotency_key = comparison.pending.key;
  try {
    const v = await api("/v1/votes", body);
    comparison.a.model.textContent = v.left_model;
    comparison.b.model.textContent = v.right_model;
    const said = preferred === "tie" ? "about the same" : (preferred === "left" ? "A" : "B") + " is better";
    el.ack.textContent = "Thanks: vote #" + v.vote_id + " recorded (" + said + ", confidence " +
      confidence + "). A was " + v.left_model + ", B was " + v.right_model + ".";
    el.ack.hidden = false;
    if (last) last.vote = { vote_id: v.vote_id, preferred, confidence,
                            left_model: v.left_model, right_model: v.right_model };
  } catch (e) {
    buttons.forEach((b) => { b.disabled = false; });
    setStatus("the vote was not recorded: " + e.message, true);
    if (e.status === 401) el.keyBox.open = true;
  }
}

// ------------------------------------------------------------------------------ images in

function clearImage() {
  imageB64 = null;
  imageName = "";
  el.upload.value = "";
  el.queryImage.hidden = true;
}

function takeImage(file) {
  if (!file || !file.type.startsWith("image/")) { setStatus("that is not an image", true); return; }
  const reader = new FileReader();
  reader.onload = () => {
    const url = String(reader.result);
    imageB64 = url.slice(url.indexOf(",") + 1);
    imageName = file.name || "pasted image";
    el.queryImage.querySelector("img").src = url;
    el.queryImage.querySelector("span").textContent = imageName;
    el.queryImage.hidden = false;
    search({ push: false });
  };
  reader.onerror = () => setStatus("could not read the image", true);
  reader.readAsDataURL(file);
}

// ------------------------------------------------------------------------------ wiring

el.key.value = localStorage.getItem(KEY_STORE) || "";
el.key.addEventListener("change", () => {
  const v = el.key.value.trim();
  if (v) localStorage.setItem(KEY_STORE, v); else localStorage.removeItem(KEY_STORE);
});
el.form.addEventListener("submit", (ev) => { ev.preventDefault(); search({ push: true }); });
el.upload.addEventListener("change", () => takeImage(el.upload.files[0]));
el.clearImage.addEventListener("click", clearImage);
document.addEventListener("paste", (ev) => {
  const item = [...(ev.clipboardData || { items: [] }).items]
    .find((i) => i.kind === "file" && i.type.startsWith("image/"));
  if (item) { ev.preventDefault(); takeImage(item.getAsFile()); }
});
el.vote.querySelectorAll(".vote-buttons button").forEach((b) =>
  b.addEventListener("click", () => vote(b.dataset.preferred)));
el.download.addEventListener("click", () => {
  if (!last) return;
  const blob = new Blob([JSON.stringify(last, null, 2)], { type: "application/json" });
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = "aligner-results.json";
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
});
window.addEventListener("popstate", () => {
  const { like } = readUrl();
  clearImage();
  if (el.query.value || like) search({ like, push: false });
  else { el.results.replaceChildren(); resetVote(false); setStatus(""); }
});

api("/v1/indexes").then((d) => { if (d.compare && d.compare.length === 2) compareModels = d.compare; })
  .catch(() => {});
const start = readUrl();
if (el.query.value || start.like) search({ like: start.like, push: false });
