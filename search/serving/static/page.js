"use strict";
// The page: upload an image (picker or drop), show it, and each model's top-3 with its card summary.
const drop = document.getElementById("drop");
const picker = document.getElementById("file");
const preview = document.getElementById("preview");
const status = document.getElementById("status");
const board = document.getElementById("models");
const cards = new Map();

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  Object.entries(attrs || {}).forEach(([k, v]) => node.setAttribute(k, v));
  children.forEach((c) => node.append(c));
  return node;
}

function fmt(value, digits, unit) {
  return value === null || value === undefined ? "-" : `${Number(value).toFixed(digits)}${unit}`;
}

function summary(s) {
  const list = el("dl", { class: "summary" });
  const items = [
    ["latency at search", fmt(s.latency_ms, 2, " ms")],
    [`top-1 (${s.top1_split || "?"})`, s.top1 === null || s.top1 === undefined ? "-" : `${(100 * s.top1).toFixed(1)}%`],
    ["MACs", s.macs ? `${(s.macs / 1e6).toFixed(1)} M` : "-"],
    ["size", s.size_bytes ? `${(s.size_bytes / 1e6).toFixed(1)} MB` : "-"],
  ];
  items.forEach(([k, v]) => list.append(el("dt", {}, k), el("dd", {}, v)));
  return list;
}

function showModels(models) {
  board.replaceChildren();
  models.forEach((m) => {
    const box = el("article", { class: "model", "data-model": m.name },
      el("h2", {}, m.name, el("span", { class: "role" }, `${m.role}, ${m.precision}`)),
      summary(m.summary),
      el("div", { class: "answer" }, el("p", { class: "timing" }, "No image yet.")));
    cards.set(m.name, box);
    board.append(box);
  });
}

function clearAnswers(text) {
  cards.forEach((box) => box.querySelector(".answer").replaceWith(
    el("div", { class: "answer" }, el("p", { class: "timing" }, text))));
}

function showAnswer(result) {
  result.models.forEach((m) => {
    const box = cards.get(m.name);
    if (!box) return;
    const answer = el("div", { class: "answer" });
    m.top.forEach((t) => {
      const pct = (100 * t.probability).toFixed(1);
      const bar = el("div", { class: "bar" }, el("span", { style: `width: ${pct}%` }));
      answer.append(el("div", { class: "row", "data-label": t.label },
        el("span", { class: "label", title: t.label }, t.label), bar, el("span", { class: "prob" }, `${pct}%`)));
    });
    const timing = el("p", { class: "timing" }, `this request: ${m.inference_ms.toFixed(2)} ms in ONNX Runtime`);
    answer.append(timing);
    if (m.agrees_with_baseline !== null) {
      const yes = m.agrees_with_baseline;
      answer.append(el("p", { class: `agree ${yes ? "yes" : "no"}` },
        yes ? "top-1 agrees with the baseline" : "top-1 differs from the baseline"));
    }
    box.querySelector(".answer").replaceWith(answer);
  });
}

async function send(file) {
  if (!file) return;
  status.className = "";
  status.textContent = `Sending ${file.name} (${(file.size / 1e3).toFixed(0)} kB)...`;
  clearAnswers("Waiting for the answer...");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  const form = new FormData();
  form.append("image", file);
  try {
    const reply = await fetch("/predict?k=3", { method: "POST", body: form });
    const body = await reply.json();
    if (!reply.ok) throw new Error(body.error || `HTTP ${reply.status}`);
    showAnswer(body);
    const rotated = body.image.exif_rotated ? ", EXIF rotation applied" : "";
    status.textContent = `${file.name}: ${body.image.width}x${body.image.height} ${body.image.format}${rotated}, answered in ${body.total_ms.toFixed(1)} ms`;
  } catch (err) {
    clearAnswers("No answer for this image.");
    status.className = "error";
    status.textContent = `error: ${err.message}`;
  }
}

// A small image (a 32 px CIFAR picture, an 8 px digit) is enlarged to the preview's box, pixels kept sharp.
preview.addEventListener("load", () => preview.classList.toggle("small", preview.naturalWidth < 256));

picker.addEventListener("change", () => send(picker.files[0]));
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, () => drop.classList.remove("over")));
drop.addEventListener("drop", (e) => { e.preventDefault(); send(e.dataTransfer.files[0]); });

fetch("/models").then((r) => r.json()).then(showModels).catch((err) => {
  status.className = "error";
  status.textContent = `error: cannot list the models (${err.message})`;
});
