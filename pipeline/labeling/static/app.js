// The labeling page. Every prompt and response goes into the DOM with textContent, never as HTML.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const SCORES = [1, 2, 3, 4, 5];
  let session = null; // {labeler, total, done, resume}
  let item = null; // the prompt shown: {index, id, prompt, responses, order, judgement}
  let view = null; // what the person set: {order, tie, scores, ranked, allBad, correction, selected}
  const drafts = new Map(); // unsaved edits per item, kept while the page is open
  let busy = false; // a save or page change is in flight: keys would land on the wrong prompt

  async function api(method, path, body) {
    const options = { method, headers: {} };
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    const response = await fetch(path, options);
    const data = await response.json().catch(() => ({ error: response.statusText }));
    if (!response.ok) throw new Error(data.error || response.statusText);
    return data;
  }

  // element with fixed attributes; `text` is always set as textContent
  function el(tag, props = {}, children = []) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === "text") node.textContent = value;
      else if (key === "class") node.className = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value);
    }
    node.append(...children);
    return node;
  }

  function status(message, kind = "") {
    $("status").textContent = message;
    $("status").className = kind;
  }

  function freshView(it) {
    const k = it.responses.length;
    const v = { order: it.order.slice(), tie: new Array(k).fill(false), scores: new Array(k).fill(null),
                ranked: false, allBad: false, correction: "", selected: 0 };
    const j = it.judgement;
    if (j) {
      if (j.ranks) {
        v.order.sort((a, b) => j.ranks[a] - j.ranks[b]); // stable: ties keep the display order
        v.order.forEach((r, p) => { v.tie[r] = p > 0 && j.ranks[r] === j.ranks[v.order[p - 1]]; });
        v.ranked = true;
      }
      if (j.scores) v.scores = j.scores.slice();
      v.allBad = j.all_bad;
      v.correction = j.correction || "";
    }
    return v;
  }

  // dense ranks per response (0 = best) from the order and the tie marks
  function ranks(v) {
    const out = new Array(v.order.length);
    let rank = -1;
    v.order.forEach((r, p) => {
      if (p === 0 || !v.tie[r]) rank += 1;
      out[r] = rank;
    });
    return out;
  }

  function letter(r) {
    return String.fromCharCode(65 + item.order.indexOf(r));
  }

  function changed() {
    drafts.set(item.index, view);
    render();
    status("unsaved changes");
  }

  function updateProgress() {
    $("progress").max = Math.max(session.total, 1);
    $("progress").value = session.done;
    $("progress-text").textContent = `${session.done} / ${session.total} done`;
  }

  function render() {
    $("prompt").textContent = item.prompt;
    $("item-id").textContent = `(${item.id})`;
    $("position").textContent = `prompt ${item.index + 1} of ${session.total}`;
    $("saved-badge").hidden = !item.judgement;
    $("prev").disabled = item.index === 0;
    $("next").disabled = item.index >= session.total - 1;
    const rk = ranks(view);
    const cards = view.order.map((r, p) => {
      const tied = p > 0 && view.tie[r];
      const scoreButtons = SCORES.map((s) => el("button", {
        type: "button", class: "score", "aria-pressed": String(view.scores[r] === s), "data-score": String(s),
        title: `score ${s}`, text: String(s),
        onclick: () => { view.scores[r] = view.scores[r] === s ? null : s; view.selected = p; changed(); },
      }));
      const card = el("li", {
        class: "card" + (p === view.selected ? " selected" : "") + (tied ? " tied" : ""),
        draggable: "true", "data-response": String(r),
      }, [
        el("div", { class: "card-head" }, [
          el("span", { class: "rank", text: `#${rk[r] + 1}${tied ? " (tie)" : ""}` }),
          el("span", { class: "letter", text: `Response ${letter(r)}` }),
          el("span", { class: "spacer" }),
          el("button", { type: "button", class: "up", title: "move up (Shift+↑)", text: "▲",
                         onclick: () => move(p, p - 1) }),
          el("button", { type: "button", class: "down", title: "move down (Shift+↓)", text: "▼",
                         onclick: () => move(p, p + 1) }),
          el("button", { type: "button", class: "tie", "aria-pressed": String(tied), title: "tie with the one above (t)",
                         text: "= tie", onclick: () => toggleTie(p) }),
          el("span", { class: "scores" }, [el("span", { class: "label", text: "score" }), ...scoreButtons]),
        ]),
        el("div", { class: "text response-text", text: item.responses[r] }),
      ]);
      card.addEventListener("click", (e) => {
        if (e.target.closest("button")) return;
        view.selected = p;
        render();
      });
      card.addEventListener("dragstart", (e) => {
        e.dataTransfer.setData("text/plain", String(p));
        e.dataTransfer.effectAllowed = "move";
      });
      card.addEventListener("dragover", (e) => { e.preventDefault(); card.classList.add("drop"); });
      card.addEventListener("dragleave", () => card.classList.remove("drop"));
      card.addEventListener("drop", (e) => {
        e.preventDefault();
        move(Number(e.dataTransfer.getData("text/plain")), p);
      });
      return card;
    });
    $("responses").replaceChildren(...cards);
    $("all-bad").checked = view.allBad;
    if ($("correction").value !== view.correction) $("correction").value = view.correction;
    const allScored = view.scores.every((s) => s !== null);
    $("ranking-state").textContent = view.allBad ? "(all bad: no preference among them)"
      : view.ranked ? "(ranking set)"
      : allScored ? "(ranking will follow the scores)"
      : "(not ranked yet: move responses, or press r to accept this order)";
    $("ranking-state").className = view.ranked || view.allBad || allScored ? "" : "warn";
    const selected = cards[view.selected];
    if (selected && selected.scrollIntoView) selected.scrollIntoView({ block: "nearest" });
  }

  function move(from, to) {
    const n = view.order.length;
    if (!Number.isInteger(from) || from < 0 || from >= n || to < 0 || to >= n || from === to) return;
    const [r] = view.order.splice(from, 1);
    view.order.splice(to, 0, r);
    view.tie[r] = false;
    view.tie[view.order[0]] = false;
    view.ranked = true;
    view.selected = to;
    changed();
  }

  function toggleTie(p) {
    if (p === 0) return;
    const r = view.order[p];
    view.tie[r] = !view.tie[r];
    view.ranked = true;
    view.selected = p;
    changed();
  }

  function orderByScores() {
    const score = (r) => (view.scores[r] === null ? -Infinity : view.scores[r]);
    view.order.sort((a, b) => score(b) - score(a));
    view.order.forEach((r, p) => {
      view.tie[r] = p > 0 && view.scores[r] !== null && view.scores[r] === view.scores[view.order[p - 1]];
    });
    view.ranked = true;
    view.selected = 0;
    changed();
  }

  async function show(index, message = "") {
    busy = true;
    try {
      item = await api("GET", `/api/item/${index}`);
    } finally {
      busy = false;
    }
    view = drafts.get(index) || freshView(item);
    history.replaceState(null, "", `#${index + 1}`);
    render();
    if (message) status(message, "ok");
    else if (drafts.has(index)) status("unsaved changes");
    else if (item.judgement) status(`saved ${item.judgement.time.replace("T", " ").slice(0, 19)} UTC`, "ok");
    else status("");
  }

  async function save() {
    const body = {
      index: item.index,
      ranks: view.ranked ? ranks(view) : null,
      scores: view.scores.some((s) => s !== null) ? view.scores : null,
      all_bad: view.allBad,
      correction: view.correction.trim() ? view.correction : null,
    };
    if (!body.ranks && !body.scores && !body.all_bad && !body.correction) {
      status("Nothing to save yet: rank, score, mark all bad or write a correction.", "error");
      return;
    }
    let result;
    busy = true;
    try {
      result = await api("POST", "/api/judgement", body);
    } catch (e) {
      status(`NOT saved: ${e.message}`, "error");
      return;
    } finally {
      busy = false;
    }
    drafts.delete(item.index);
    if (document.activeElement === $("correction")) $("correction").blur(); // keys rank the next prompt
    session.done = result.done;
    updateProgress();
    if (result.next === null) {
      item.judgement = result.saved;
      view = freshView(item);
      render();
      status("Saved ✓ Every prompt is labeled: export when ready.", "ok");
    } else {
      await show(result.next, `Saved prompt ${item.index + 1} ✓`);
    }
  }

  async function exportAll() {
    status("exporting…");
    try {
      const result = await api("POST", "/api/export", {});
      const rows = Object.entries(result.metrics.rows)
        .map(([name, splits]) => `${name} ${Object.values(splits).reduce((a, b) => a + b, 0)}`).join(", ");
      status(`Exported to ${result.path} (${rows})`, "ok");
    } catch (e) {
      status(`Export failed: ${e.message}`, "error");
    }
  }

  function go(delta) {
    const index = item.index + delta;
    if (index >= 0 && index < session.total) show(index);
  }

  function onKey(e) {
    const correction = $("correction");
    if (e.target === correction) {
      if (e.key === "Escape") { correction.blur(); e.preventDefault(); }
      else if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); if (!busy) save(); }
      return;
    }
    if (e.ctrlKey || e.metaKey || e.altKey || !item) return;
    if (busy) { e.preventDefault(); return; }
    const last = view.order.length - 1;
    const key = e.key;
    let handled = true;
    if (key === "ArrowDown" && e.shiftKey || key === "J") move(view.selected, view.selected + 1);
    else if (key === "ArrowUp" && e.shiftKey || key === "K") move(view.selected, view.selected - 1);
    else if (key === "ArrowDown" || key === "j") { view.selected = Math.min(last, view.selected + 1); render(); }
    else if (key === "ArrowUp" || key === "k") { view.selected = Math.max(0, view.selected - 1); render(); }
    else if (SCORES.includes(Number(key))) {
      view.scores[view.order[view.selected]] = Number(key);
      view.selected = Math.min(last, view.selected + 1);
      changed();
    } else if (key === "t") toggleTie(view.selected);
    else if (key === "o") orderByScores();
    else if (key === "r") { view.ranked = true; changed(); }
    else if (key === "b") { view.allBad = !view.allBad; changed(); }
    else if (key === "c") correction.focus();
    else if (key === "e") {
      if (!view.correction) { view.correction = item.responses[view.order[view.selected]]; changed(); }
      correction.focus();
    } else if (key === "Enter") save();
    else if (key === "n" || key === "ArrowRight") go(1);
    else if (key === "p" || key === "ArrowLeft") go(-1);
    else if (key === "?") $("help").hidden = !$("help").hidden;
    else handled = false;
    if (handled) e.preventDefault();
  }

  async function init() {
    $("prev").addEventListener("click", () => go(-1));
    $("next").addEventListener("click", () => go(1));
    $("save").addEventListener("click", save);
    $("export").addEventListener("click", exportAll);
    $("order-by-scores").addEventListener("click", orderByScores);
    $("accept-order").addEventListener("click", () => { view.ranked = true; changed(); });
    $("all-bad").addEventListener("change", (e) => { view.allBad = e.target.checked; changed(); });
    $("correction").addEventListener("input", (e) => {
      view.correction = e.target.value;
      drafts.set(item.index, view);
      status("unsaved changes");
    });
    document.addEventListener("keydown", onKey);
    try {
      session = await api("GET", "/api/session");
    } catch (e) {
      status(`Cannot reach the labeling server: ${e.message}`, "error");
      return;
    }
    $("labeler").textContent = session.labeler;
    updateProgress();
    const fromHash = parseInt(location.hash.slice(1), 10);
    const start = fromHash >= 1 && fromHash <= session.total ? fromHash - 1
      : session.resume === null ? session.total - 1 : session.resume;
    await show(start, session.resume === null ? "Every prompt is labeled: export when ready." : "");
    document.body.dataset.ready = "true";
  }

  document.addEventListener("DOMContentLoaded", init);
})();
