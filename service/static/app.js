// retina-align web page: search archived cases by a clinical description or a fundus photograph.
// Plain JavaScript, no framework and nothing loaded from elsewhere. Text from the server is always
// inserted with textContent, never as HTML.
"use strict";

(() => {
  const $ = (selector) => document.querySelector(selector);
  const THUMBNAIL_SIZE = 320;
  const NARRATIVE_SHORT = 180;
  const READY_POLL_MS = 2000;

  const form = $("#search-form");
  const query = $("#query");
  const searchButton = $("#search-button");
  const photoInput = $("#photo-input");
  const dropZone = $("#drop-zone");
  const photoFigure = $("#photo-figure");
  const photoPreview = $("#photo-preview");
  const photoName = $("#photo-name");
  const photoSearch = $("#photo-search");
  const explainToggle = $("#explain-toggle");
  const explainStatus = $("#explain-status");
  const heatmapCanvas = $("#heatmap");
  let explanation = null; // the /explain answer for the current photograph
  const results = $("#results");
  const errorBanner = $("#error");
  const errorMessage = $("#error-message");

  // Grade names: the response's (and /readyz's) names win over these fallbacks.
  let icdrNames = [
    "no diabetic retinopathy",
    "mild non-proliferative diabetic retinopathy",
    "moderate non-proliferative diabetic retinopathy",
    "severe non-proliferative diabetic retinopathy",
    "proliferative diabetic retinopathy",
  ];
  let sdrgNames = ["R0", "R1", "R2", "R3", "R4"];

  let lastQuery = null; // {kind: "text", text} or {kind: "image", file, gate?: "report"}
  let requestSeq = 0;
  let photoUrl = null;
  let readyTimer = null;
  let rerunTimer = null;

  // --- names ----------------------------------------------------------------------------------------

  /** A short form of a grade name for chips and checkboxes: "moderate non-proliferative diabetic
   * retinopathy" -> "Moderate NPDR", "R2 pre-proliferative retinopathy (4 or more ...)" -> "R2". */
  function shortName(name, scale) {
    if (!name) return "";
    if (scale === "sdrg") {
      const code = name.match(/^R\d\w*/);
      return code ? code[0] : name;
    }
    let short = name
      .replace(/\bnon-proliferative diabetic retinopathy\b/i, "NPDR")
      .replace(/\bproliferative diabetic retinopathy\b/i, "PDR")
      .replace(/\bno diabetic retinopathy\b/i, "No DR")
      .replace(/\bdiabetic retinopathy\b/i, "DR");
    if (short === "PDR") return short;
    return short.charAt(0).toUpperCase() + short.slice(1);
  }

  /** The part of an SDRG name after its code, without the parenthesis: "background retinopathy". */
  function describeSdrg(name) {
    return name.replace(/^R\d\w*\s*/, "").replace(/\s*\(.*\)\s*$/, "");
  }

  function capitalise(text) {
    return text ? text.charAt(0).toUpperCase() + text.slice(1) : "";
  }

  function gradeName(scale, grade) {
    const names = scale === "icdr" ? icdrNames : sdrgNames;
    return grade != null && names[grade] ? names[grade] : "";
  }

  function setNames(icdr, sdrg) {
    if (Array.isArray(icdr) && icdr.length) icdrNames = icdr.slice();
    if (Array.isArray(sdrg) && sdrg.length) sdrgNames = sdrg.slice();
    for (const [scale, names] of [["icdr", icdrNames], ["sdrg", sdrgNames]]) {
      names.forEach((name, grade) => {
        const box = document.getElementById(`${scale}-${grade}`);
        if (!box) return;
        const label = box.closest("label");
        label.title = name;
        label.querySelector("span").textContent = scale === "icdr"
          ? `${grade} · ${shortName(name, scale)}` : shortName(name, scale);
      });
    }
  }

  // --- readiness --------------------------------------------------------------------------------------

  async function checkReady() {
    clearTimeout(readyTimer);
    const status = $("#ready-status");
    const text = $("#ready-text");
    let body = null;
    let code = 0;
    try {
      const response = await fetch("/readyz", { headers: { Accept: "application/json" }, cache: "no-store" });
      code = response.status;
      body = await response.json().catch(() => null);
    } catch (_) {
      code = 0;
    }
    if (code === 200 && body && body.ready) {
      status.dataset.ready = "true";
      const size = Number(body.index_size || 0).toLocaleString("en");
      text.textContent = `Ready · ${size} archived photographs`;
      status.title = body.bundle_fingerprint ? `model bundle ${body.bundle_fingerprint}` : "";
      setNames(body.icdr_names, body.sdrg_names);
      return;
    }
    status.dataset.ready = "false";
    if (code === 401) {
      text.textContent = "API key needed: reload the page to enter it";
      return;
    }
    if (code === 0) {
      text.textContent = "Service unreachable; retrying…";
    } else {
      const detail = body && (body.detail || (body.ready === false && "loading"));
      text.textContent = `Not ready: ${detail || `HTTP ${code}`}`;
    }
    readyTimer = setTimeout(checkReady, READY_POLL_MS);
  }

  // --- the request ------------------------------------------------------------------------------------

  function intOrNull(value) {
    if (value === "" || value == null) return null;
    const number = Number(value);
    return Number.isFinite(number) ? number : null;
  }

  /** The filters from the form, or null when none is set. */
  function currentFilters() {
    const filters = {};
    for (const scale of ["icdr", "sdrg"]) {
      const grades = [...form.querySelectorAll(`input[name=${scale}]:checked`)].map((box) => Number(box.value));
      if (grades.length) filters[scale] = grades;
    }
    const eye = $("#eye").value;
    if (eye) filters.exam_eye = eye;
    const ageMin = intOrNull($("#age-min").value);
    const ageMax = intOrNull($("#age-max").value);
    if (ageMin != null) filters.age_min = ageMin;
    if (ageMax != null) filters.age_max = ageMax;
    return Object.keys(filters).length ? filters : null;
  }

  function currentOptions() {
    return {
      k: Number($("#k").value) || 10,
      against: form.querySelector("input[name=against]:checked").value,
      filters: currentFilters(),
    };
  }

  /** A message for a person from a failed response: the service's `detail`, else the status line. */
  async function failureMessage(response) {
    let detail = null;
    try {
      const body = await response.json();
      detail = body && typeof body.detail === "string" ? body.detail : null;
    } catch (_) {
      detail = null;
    }
    if (response.status === 401) {
      return `${detail || "an API key is required"}. Reload the page to enter the API key.`;
    }
    if (response.status === 503) {
      return `${detail || "the service is not ready yet"}. Try again in a few seconds.`;
    }
    return detail || `the service answered ${response.status} ${response.statusText || ""}`.trim();
  }

  async function runSearch(search, reveal = false) {
    clearTimeout(rerunTimer);
    const seq = ++requestSeq;
    const options = currentOptions();
    let request;
    if (search.kind === "text") {
      request = fetch("/search/text", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify({ text: search.text, k: options.k, against: options.against, filters: options.filters }),
      });
    } else {
      const body = new FormData();
      body.append("file", search.file, search.file.name || "photograph");
      body.append("k", String(options.k));
      body.append("against", options.against);
      if (options.filters) body.append("filters", JSON.stringify(options.filters));
      if (search.gate) body.append("gate", search.gate);
      request = fetch("/search/image", { method: "POST", body, headers: { Accept: "application/json" } });
    }
    setBusy(true);
    hideError();
    try {
      const response = await request;
      if (seq !== requestSeq) return; // a newer search has started; its answer will be shown
      if (!response.ok) {
        const message = await failureMessage(response);
        // The gradability gate refused the photograph: offer to answer anyway (flagged), never silently.
        const refused = response.status === 422 && search.kind === "image" && message.includes("not a fundus photograph");
        showError(message, refused ? () => { lastQuery = { ...search, gate: "report" }; runSearch(lastQuery); } : null);
        if (response.status === 503) checkReady();
        return;
      }
      const data = await response.json();
      if (seq !== requestSeq) return;
      render(data, search);
      if (reveal && window.matchMedia("(max-width: 820px)").matches) {
        results.scrollIntoView({ block: "start" });
      }
    } catch (error) {
      if (seq !== requestSeq) return;
      showError("could not reach the service (network error). Check the connection and try again.");
    } finally {
      if (seq === requestSeq) setBusy(false);
    }
  }

  function setBusy(busy) {
    results.setAttribute("aria-busy", busy ? "true" : "false");
    if (busy) {
      results.dataset.state = "loading";
    } else if (results.dataset.state === "loading") {
      results.dataset.state = results.dataset.hasResults === "true" ? "done" : "empty";
    }
    searchButton.disabled = busy;
    searchButton.textContent = busy ? "Searching…" : "Search by description";
  }

  function showError(message, retry = null) {
    errorMessage.textContent = message.charAt(0).toUpperCase() + message.slice(1);
    const retryButton = $("#error-retry");
    retryButton.hidden = !retry;
    retryButton.onclick = retry;
    errorBanner.hidden = false;
    if (errorBanner.getBoundingClientRect().top < 0) errorBanner.scrollIntoView({ block: "nearest" });
    results.dataset.state = results.dataset.hasResults === "true" ? "done" : "empty";
  }

  function hideError() {
    errorBanner.hidden = true;
    errorMessage.textContent = "";
  }

  // --- rendering --------------------------------------------------------------------------------------

  function el(tag, attributes = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attributes)) {
      if (value == null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("data-") || key.startsWith("aria-") || key === "role") node.setAttribute(key, value);
      else node[key] = value;
    }
    for (const child of children) {
      if (child != null) node.append(child);
    }
    return node;
  }

  function percent(probability) {
    const value = probability * 100;
    return value >= 99.95 ? "100%" : value < 0.05 ? "<0.1%" : `${value.toFixed(1)}%`;
  }

  function renderScale(container, scale, title, prediction) {
    container.replaceChildren();
    container.dataset.grade = String(prediction.grade);
    const headingId = `predicted-${scale}-title`;
    container.append(
      el("h4", { id: headingId, text: title }),
      el("p", { class: "top-grade" },
        el("span", { class: `grade-chip g${prediction.grade}`, text: scale === "icdr" ? `ICDR ${prediction.grade}` : `SDRG ${shortName(prediction.name, "sdrg")}` }),
        " ",
        el("span", { class: "top-name", text: capitalise(scale === "icdr" ? prediction.name : describeSdrg(prediction.name)) })),
    );
    const list = el("ul", { class: "bars", "aria-labelledby": headingId });
    for (const item of prediction.probabilities) {
      const top = item.grade === prediction.grade;
      const label = scale === "icdr" ? `${item.grade} · ${shortName(item.name, "icdr")}` : shortName(item.name, "sdrg");
      const fill = el("span", { class: `bar-fill g${item.grade}` });
      fill.style.width = `${Math.max(0, Math.min(1, item.probability)) * 100}%`;
      list.append(el("li", { class: top ? "bar-row top" : "bar-row", "data-grade": String(item.grade) },
        el("span", { class: "bar-label", title: item.name, text: label }),
        el("span", { class: "bar", role: "presentation" }, fill),
        el("span", { class: "bar-value", text: percent(item.probability) })));
    }
    container.append(list);
  }

  /** The gradability gate's answer on the photograph: gradable, possibly ungradable (why), or not a fundus. */
  function renderGradable(gradable) {
    const badge = $("#gradable");
    badge.hidden = !gradable;
    if (!gradable) return;
    const p = Number(gradable.probability).toFixed(2);
    badge.dataset.ok = String(Boolean(gradable.ok));
    badge.dataset.fundus = String(Boolean(gradable.fundus));
    if (!gradable.fundus) {
      badge.className = "badge not-fundus";
      badge.textContent = "Not a fundus photograph: the grades mean nothing";
    } else if (!gradable.ok) {
      badge.className = "badge ungradable";
      const unsure = gradable.recognised === false ? " (unfamiliar kind of photograph: check it yourself)" : "";
      badge.textContent = `Possibly ungradable: ${gradable.reasons.join("; ")}${unsure} · P = ${p}`;
    } else {
      badge.className = "badge gradable";
      badge.textContent = `Gradable photograph · P = ${p}`;
    }
    badge.title = "The gradability gate: is this a fundus photograph of adequate quality (focus, illumination, field, artefacts)?";
  }

  /** The neighbours' consensus: the grades of the nearest archived photographs, and whether they agree. */
  function renderConsensus(consensus, predicted) {
    const line = $("#consensus");
    line.hidden = !consensus || !consensus.known;
    if (line.hidden) return;
    const votes = consensus.counts[consensus.grade];
    const majority = `${votes} of ${consensus.known} are ICDR ${consensus.grade} (${shortName(consensus.name, "icdr")})`;
    line.dataset.agrees = String(Boolean(consensus.agrees));
    line.className = consensus.agrees ? "consensus agrees" : "consensus disagrees";
    line.textContent = consensus.agrees
      ? `Similar archived photographs agree: ${majority}.`
      : `Similar archived photographs disagree: ${majority}, the model says ICDR ${predicted.icdr.grade}. ` +
        "Look at the photograph and its neighbours before relying on the grade.";
    line.title = `The ${consensus.k} archived photographs nearest this one (whole archive, filters not applied), ` +
      "by their recorded ICDR grades";
  }

  function renderPredicted(predicted) {
    setNames(predicted.icdr.probabilities.map((p) => p.name), predicted.sdrg.probabilities.map((p) => p.name));
    renderScale($("#predicted-icdr"), "icdr", "ICDR (International Clinical DR scale)", predicted.icdr);
    renderScale($("#predicted-sdrg"), "sdrg", "SDRG (Scottish DR grading)", predicted.sdrg);
    const badge = $("#referable");
    const p = Number(predicted.referable_probability);
    badge.className = predicted.referable ? "badge referable" : "badge not-referable";
    badge.dataset.referable = String(Boolean(predicted.referable));
    badge.textContent = predicted.referable
      ? `Referable DR likely · P = ${p.toFixed(2)}`
      : `Referable DR unlikely · P = ${p.toFixed(2)}`;
    badge.title = "Probability of referable diabetic retinopathy (ICDR grade 2 or worse)";
    const calibrated = $("#calibrated");
    calibrated.hidden = false;
    calibrated.dataset.calibrated = String(Boolean(predicted.calibrated));
    calibrated.textContent = predicted.calibrated
      ? "Calibrated probabilities: a grade shown at 70% is right about 70% of the time " +
        "(temperature-scaled on a validation split)."
      : "Uncalibrated probabilities (this model was exported without calibration).";
    $("#predicted").hidden = false;
  }

  function eyeText(eye) {
    return eye === "left" ? "Left eye" : eye === "right" ? "Right eye" : "Eye not recorded";
  }

  function ageText(labels) {
    const parts = [];
    if (labels.patient_age != null) parts.push(`${Math.round(labels.patient_age)} y`);
    if (labels.patient_sex) parts.push(labels.patient_sex);
    return parts.join(", ");
  }

  function findings(pathologies) {
    return Object.entries(pathologies || {})
      .filter(([, present]) => present === true)
      .map(([name]) => name.replace(/_/g, " "));
  }

  function neighbourCard(neighbour, rank) {
    const labels = neighbour.labels || {};
    const thumbnail = `${neighbour.image_url}?size=${THUMBNAIL_SIZE}`;
    const img = el("img", {
      class: "thumb",
      src: thumbnail,
      alt: `Fundus photograph ${neighbour.image_id}`,
      loading: "lazy",
      decoding: "async",
      width: 160,
      height: 160,
    });
    img.addEventListener("error", () => {
      img.replaceWith(el("span", { class: "thumb missing", text: "Photograph unavailable" }));
    });
    const icdr = labels.icdr;
    const sdrg = labels.sdrg;
    const chips = el("p", { class: "chips" },
      el("span", { class: `grade-chip g${icdr ?? "x"}`, title: gradeName("icdr", icdr) || "ICDR grade not recorded",
        "data-testid": "neighbour-icdr",
        text: icdr != null ? `ICDR ${icdr} · ${shortName(gradeName("icdr", icdr), "icdr")}` : "ICDR not recorded" }),
      el("span", { class: `grade-chip g${sdrg ?? "x"}`, title: gradeName("sdrg", sdrg) || "SDRG grade not recorded",
        "data-testid": "neighbour-sdrg", text: sdrg != null ? `SDRG ${shortName(gradeName("sdrg", sdrg), "sdrg") || sdrg}` : "SDRG not recorded" }));
    const details = el("dl", { class: "facts" },
      el("dt", { text: "Eye" }), el("dd", { text: eyeText(labels.exam_eye) }));
    const age = ageText(labels);
    if (age) details.append(el("dt", { text: "Patient" }), el("dd", { text: age }));
    const found = findings(labels.pathologies);
    if (found.length) details.append(el("dt", { text: "Findings" }), el("dd", { text: found.join(", ") }));

    const card = el("li", {
      class: "neighbour",
      "data-testid": "neighbour",
      "data-id": String(neighbour.id),
      "data-icdr": icdr != null ? String(icdr) : "",
      "data-sdrg": sdrg != null ? String(sdrg) : "",
      "data-eye": labels.exam_eye || "",
      "data-score": String(neighbour.score),
    },
    el("a", { class: "thumb-link", href: neighbour.image_url, target: "_blank", rel: "noopener",
      "aria-label": `Open photograph ${neighbour.image_id} full size in a new tab` }, img),
    el("div", { class: "card-body" },
      el("div", { class: "card-head" },
        el("span", { class: "rank", text: `#${rank}` }),
        el("span", { class: "score", title: "Cosine similarity to your query (1 is identical)" },
          "similarity ", el("strong", { "data-testid": "score", text: Number(neighbour.score).toFixed(3) }))),
      chips,
      details,
      narrativeBlock(neighbour.narrative),
      el("p", { class: "image-id", text: neighbour.image_id })));
    return card;
  }

  function narrativeBlock(narrative) {
    if (!narrative) return el("p", { class: "narrative empty", text: "No narrative recorded." });
    const text = el("p", { class: "narrative", title: narrative, text: narrative });
    if (narrative.length <= NARRATIVE_SHORT) return text;
    text.classList.add("clamped");
    const toggle = el("button", { type: "button", class: "link-button more", "aria-expanded": "false", text: "Show full narrative" });
    toggle.addEventListener("click", () => {
      const open = text.classList.toggle("clamped") === false;
      toggle.setAttribute("aria-expanded", String(open));
      toggle.textContent = open ? "Show less" : "Show full narrative";
    });
    return el("div", { class: "narrative-block" }, text, toggle);
  }

  function render(data, search) {
    results.dataset.hasResults = "true";
    $("#results-empty").hidden = true;

    const n = data.neighbours.length;
    const source = search.kind === "text" ? "your description" : `the photograph ${search.file.name || ""}`.trim();
    const against = data.against === "record" ? "photographs with patient records" : "archived photographs";
    const summary = $("#results-summary");
    summary.textContent = `${n} similar case${n === 1 ? "" : "s"} for ${source}, compared with ${against} ` +
      `(${Number(data.index_size).toLocaleString("en")} indexed) · ${Math.round(data.took_ms)} ms`;

    const notes = $("#notes");
    notes.replaceChildren(...(data.notes || []).map((note) => el("li", { text: note })));
    notes.hidden = !(data.notes && data.notes.length);

    renderPredicted(data.predicted);
    renderGradable(data.gradable);
    renderConsensus(data.consensus, data.predicted);

    const list = $("#neighbours");
    list.replaceChildren(...data.neighbours.map((neighbour, i) => neighbourCard(neighbour, i + 1)));
    if (!n) {
      list.append(el("li", { class: "no-match", text: "No archived case matches these filters. Clear or widen the filters." }));
    }
    $("#neighbours-section").hidden = false;
    explainToggle.hidden = !(search.kind === "image" && !photoPreview.hidden);
    results.dataset.state = "done";
    results.dataset.kind = search.kind;
    results.dataset.count = String(n);
  }

  // --- the photograph -------------------------------------------------------------------------------

  function usePhoto(file) {
    if (!file) return;
    if (photoUrl) URL.revokeObjectURL(photoUrl);
    photoUrl = URL.createObjectURL(file);
    photoFigure.hidden = false;
    photoPreview.hidden = false;
    photoPreview.src = photoUrl;
    photoName.textContent = file.name || "photograph";
    photoSearch.hidden = false;
    resetEvidence();
    lastQuery = { kind: "image", file };
    runSearch(lastQuery, true);
  }

  // --- the evidence on the photograph (POST /explain) -------------------------------------------------

  function resetEvidence() {
    explanation = null;
    heatmapCanvas.hidden = true;
    photoFigure.classList.remove("evidence");
    explainToggle.hidden = true;
    explainToggle.disabled = false;
    explainToggle.setAttribute("aria-pressed", "false");
    explainToggle.textContent = "Show the evidence on the photograph";
    explainStatus.hidden = true;
  }

  /** Paint the heatmap's cells (red, stronger where hiding them lowers the target more) and its peak. */
  function drawHeatmap(heatmap) {
    const scale = photoPreview.clientWidth / photoPreview.naturalWidth;
    heatmapCanvas.width = photoPreview.clientWidth;
    heatmapCanvas.height = photoPreview.clientHeight;
    const context = heatmapCanvas.getContext("2d");
    context.clearRect(0, 0, heatmapCanvas.width, heatmapCanvas.height);
    const side = heatmap.cell_size * scale;
    let painted = 0;
    heatmap.values.forEach((row, r) => row.forEach((value, c) => {
      if (value <= 0.05) return;
      context.fillStyle = `rgba(255, 40, 0, ${(0.7 * value).toFixed(3)})`;
      context.fillRect(heatmap.x[c] * scale - side / 2, heatmap.y[r] * scale - side / 2, side, side);
      painted += 1;
    }));
    context.strokeStyle = "#00e5ff";
    context.lineWidth = 2;
    context.beginPath();
    context.arc(heatmap.peak.x * scale, heatmap.peak.y * scale, Math.max(6, side), 0, 2 * Math.PI);
    context.stroke();
    heatmapCanvas.dataset.cells = String(painted);
  }

  async function toggleEvidence() {
    if (!heatmapCanvas.hidden) {
      heatmapCanvas.hidden = true;
      photoFigure.classList.remove("evidence");
      explainToggle.setAttribute("aria-pressed", "false");
      explainToggle.textContent = "Show the evidence on the photograph";
      explainStatus.hidden = true;
      return;
    }
    const search = lastQuery;
    if (!search || search.kind !== "image") return;
    if (!explanation) {
      explainToggle.disabled = true;
      explainStatus.hidden = false;
      explainStatus.textContent = "Computing the heatmap (a few seconds)…";
      const body = new FormData();
      body.append("file", search.file, search.file.name || "photograph");
      if (search.gate) body.append("gate", search.gate);
      try {
        const response = await fetch("/explain", { method: "POST", body, headers: { Accept: "application/json" } });
        if (lastQuery !== search) return; // another photograph since
        if (!response.ok) {
          showError(await failureMessage(response));
          explainStatus.hidden = true;
          return;
        }
        explanation = await response.json();
      } catch (error) {
        showError("could not reach the service (network error). Check the connection and try again.");
        explainStatus.hidden = true;
        return;
      } finally {
        explainToggle.disabled = false;
      }
    }
    photoFigure.classList.add("evidence");
    drawHeatmap(explanation.heatmap);
    heatmapCanvas.hidden = false;
    explainToggle.setAttribute("aria-pressed", "true");
    explainToggle.textContent = "Hide the evidence";
    explainStatus.hidden = false;
    explainStatus.textContent = `Red: where hiding part of the photograph lowers ${explanation.target.name} ` +
      `(${percent(explanation.target.probability)}) the most; circle: the strongest. ` +
      `${Math.round(explanation.explain_ms)} ms, ${explanation.occlusions} occluded copies.`;
  }

  explainToggle.addEventListener("click", toggleEvidence);
  window.addEventListener("resize", () => { if (explanation && !heatmapCanvas.hidden) drawHeatmap(explanation.heatmap); });

  // A TIFF or a non-image cannot be previewed: keep the file name only.
  photoPreview.addEventListener("error", () => { photoPreview.hidden = true; });

  photoInput.addEventListener("change", () => {
    usePhoto(photoInput.files && photoInput.files[0]);
    photoInput.value = ""; // choosing the same file again searches again
  });

  for (const type of ["dragenter", "dragover"]) {
    dropZone.addEventListener(type, (event) => {
      event.preventDefault();
      dropZone.classList.add("dragging");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    dropZone.addEventListener(type, () => dropZone.classList.remove("dragging"));
  }
  dropZone.addEventListener("drop", (event) => {
    event.preventDefault();
    const file = event.dataTransfer && event.dataTransfer.files[0];
    usePhoto(file);
  });
  // A file dropped beside the zone must not make the browser leave the page to show it.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());

  photoSearch.addEventListener("click", () => {
    const file = lastQuery && lastQuery.kind === "image" ? lastQuery.file : null;
    if (file) runSearch(lastQuery);
  });

  // --- the description ------------------------------------------------------------------------------

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = query.value.trim();
    if (!text) {
      showError("type a clinical description first, e.g. 'moderate NPDR with hard exudates, left eye'.");
      query.focus();
      return;
    }
    lastQuery = { kind: "text", text };
    runSearch(lastQuery, true);
  });

  query.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      form.requestSubmit();
    }
  });

  // --- filters and options repeat the last search -----------------------------------------------------

  function rerun() {
    clearTimeout(rerunTimer);
    if (!lastQuery) return;
    rerunTimer = setTimeout(() => runSearch(lastQuery), 250);
  }
  for (const control of form.querySelectorAll("fieldset input, select")) {
    control.addEventListener("change", rerun);
  }
  $("#clear-filters").addEventListener("click", () => {
    for (const box of form.querySelectorAll(".filters input[type=checkbox]")) box.checked = false;
    $("#eye").value = "";
    $("#age-min").value = "";
    $("#age-max").value = "";
    rerun();
  });

  $("#error-dismiss").addEventListener("click", hideError);

  checkReady();
})();
