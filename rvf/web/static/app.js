// Upload page: send chosen or dropped images to /api/predict and draw one card per image.
// Plain JS, no build step. Text goes in with textContent only, never innerHTML.
"use strict";

(function () {
  const form = document.getElementById("upload");
  const input = document.getElementById("file-input");
  const results = document.getElementById("results");
  const status = document.getElementById("status");
  const template = document.getElementById("card-template");
  const endpoint = form.getAttribute("action");
  const maxFiles = Number(form.dataset.maxFiles) || 32;
  const maxBytes = Number(form.dataset.maxBytes) || 10 * 1024 * 1024;

  const pct = (p, digits = 1) => (100 * p).toFixed(digits) + " %";
  // The header shows the threshold to 0.01 %: near it, so does the card, with more digits
  // until the two differ, so that a verdict never reads as P(fake) 49.9 % -> Fake under a
  // threshold of 49.90 %, nor P(fake) 50.00 % -> Real under 50.00 %.
  const pctBeside = (p, t) => {
    if (Math.abs(p - t) >= 0.0005) return pct(p, 1);
    let digits = 2;
    while (digits < 6 && pct(p, digits) === pct(t, digits)) digits++;
    return pct(p, digits);
  };

  async function post(files, gradcam) {
    const body = new FormData();
    for (const f of files) body.append("image", f, f.name);
    const url = gradcam ? endpoint + "?gradcam=1" : endpoint;
    const resp = await fetch(url, { method: "POST", body });
    let data;
    try {
      data = await resp.json();
    } catch (e) {
      throw new Error("server answered " + resp.status + " without JSON");
    }
    if (!data.results) throw new Error(data.error || "server answered " + resp.status);
    return data.results;
  }

  function makeCard(file) {
    const card = template.content.firstElementChild.cloneNode(true);
    const photo = card.querySelector(".photo");
    photo.src = URL.createObjectURL(file);
    photo.alt = file.name;
    photo.addEventListener("error", () => card.querySelector(".figure").classList.add("no-preview"));
    card.querySelector(".filename").textContent = file.name;
    card.querySelector(".verdict").textContent = "…";
    card.querySelector(".cam-toggle").disabled = true;
    return card;
  }

  function showError(card, message) {
    card.classList.add("failed");
    card.querySelector(".verdict").textContent = "Could not classify";
    card.querySelector(".bar").hidden = true;
    card.querySelector(".numbers").hidden = true;
    card.querySelector(".toggle").hidden = true;
    const err = card.querySelector(".error");
    err.textContent = message;
    err.hidden = false;
  }

  function showResult(card, file, r) {
    if (r.error) return showError(card, r.error);
    card.classList.add(r.label);
    card.dataset.label = r.label;
    card.querySelector(".filename").textContent = r.filename;
    card.querySelector(".verdict").textContent = r.label === "fake" ? "Fake" : "Real";
    card.querySelector(".fill").style.width = pct(r.p_fake).replace(" ", "");
    card.querySelector(".threshold").style.left = (100 * r.threshold).toFixed(1) + "%";
    const bar = card.querySelector(".bar");
    bar.setAttribute("aria-valuenow", (100 * r.p_fake).toFixed(1));
    bar.setAttribute("aria-label", "P(fake) " + pct(r.p_fake));
    card.querySelector(".pfake").textContent = pctBeside(r.p_fake, r.threshold);
    card.querySelector(".preal").textContent = pctBeside(r.p_real, 1 - r.threshold);
    if (r.framing && !r.framing.ok) {
      // The verdict stands; the warning says how little it may mean for this picture.
      const warn = card.querySelector(".framing");
      warn.textContent = "Framed unlike the training faces: " + r.framing.note + ".";
      warn.hidden = false;
    }

    const toggle = card.querySelector(".cam-toggle");
    const cam = card.querySelector(".cam");
    toggle.disabled = false;
    toggle.addEventListener("change", async () => {
      if (toggle.checked && !cam.src) {
        toggle.disabled = true;
        try {
          const [res] = await post([file], true);
          if (res.error) throw new Error(res.error);
          cam.src = "data:image/png;base64," + res.gradcam_png;
        } catch (e) {
          toggle.checked = false;
          status.textContent = "Grad-CAM failed: " + e.message;
        } finally {
          toggle.disabled = false;
        }
      }
      cam.hidden = !toggle.checked;
    });
  }

  async function handle(fileList) {
    const files = Array.from(fileList);
    if (!files.length) return;
    // One upload's cards in the order its files were given, all at once and above the cards
    // of earlier uploads: the newest upload is the one looked at.
    const items = files.map((file) => ({ file, card: makeCard(file) }));
    results.prepend(...items.map((it) => it.card));
    // Send in chunks that respect the server's per-request limits.
    const chunks = [];
    let chunk = [], size = 0;
    for (const it of items) {
      if (chunk.length && (chunk.length >= maxFiles || size + it.file.size > maxBytes * 0.95)) {
        chunks.push(chunk);
        chunk = [];
        size = 0;
      }
      chunk.push(it);
      size += it.file.size;
    }
    chunks.push(chunk);

    status.textContent = "Classifying " + files.length + (files.length === 1 ? " image…" : " images…");
    let failed = 0;
    for (const group of chunks) {
      const part = group.map((it) => it.file);
      const cards = group.map((it) => it.card);
      const tooBig = part.length === 1 && part[0].size > maxBytes;
      try {
        if (tooBig) throw new Error("file is larger than the " + (maxBytes / 1048576).toFixed(1) + " MB upload limit");
        const res = await post(part, false);
        res.forEach((r, i) => { showResult(cards[i], part[i], r); if (r.error) failed++; });
      } catch (e) {
        cards.forEach((c) => showError(c, e.message));
        failed += part.length;
      }
    }
    status.textContent = "Done: " + (files.length - failed) + " classified" + (failed ? ", " + failed + " failed." : ".");
  }

  input.addEventListener("change", () => { handle(input.files); input.value = ""; });

  ["dragenter", "dragover"].forEach((ev) => form.addEventListener(ev, (e) => {
    e.preventDefault();
    form.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((ev) => form.addEventListener(ev, (e) => {
    e.preventDefault();
    form.classList.remove("over");
  }));
  form.addEventListener("drop", (e) => handle(e.dataTransfer.files));
  form.addEventListener("submit", (e) => { e.preventDefault(); handle(input.files); });
})();
