// i2v-farm web page: a client of the HTTP API v1 (no framework, no build step, no external resources).
//
//   GET  v1/info          model (and its note), presets, field ranges, prompt tips and examples
//   POST v1/estimate      VRAM class, peak VRAM and seconds of the settings, before submitting
//   POST v1/jobs          submit (multipart: the image file and the fields)
//   GET  v1/jobs/{id}     polled for status, queue position and progress (step i of N)
//   GET  v1/jobs/{id}/preview  the latest live preview (a JPEG strip) while the job denoises
//   GET  v1/jobs          the history; v1/jobs/{id}/poster its thumbnails; POST .../cancel
//   GET  v1/cluster       the farm's classes and queues, in the header
//
// Every path is relative to the page, so the farm can sit behind a route prefix.
"use strict";

(() => {
  // Job statuses, from v1/info (`statuses`: the farm's own lists), set by loadInfo before jobs show.
  let TERMINAL = []; // finished: succeeded, failed, canceled
  let ACTIVE = []; // queued or running: may be canceled
  const PRESET_NAMES = { fast: "Fast", standard: "Standard", high: "High quality" };
  const NUMBER_FIELDS = ["num_frames", "fps", "num_inference_steps", "guidance_scale", "seed", "target_fps"];
  const SELECT_FIELDS = ["resolution", "scheduler", "priority"];
  const PRESET_FIELDS = ["resolution", "num_frames", "num_inference_steps", "guidance_scale", "fps"];
  const POLL_MS = 500;
  const HISTORY_LIMIT = 12;

  const state = {
    info: null,
    cluster: null,
    image: null, // {file, width, height}
    current: null, // id of the job shown in Output
    watchToken: 0,
    rates: new Map(), // job id -> step-rate samples for the ETA
    reported: new Set(), // failed jobs whose error was shown already
    history: new Map(), // job id -> <li>
    estimateSeq: 0,
    estimateTimer: null,
  };

  // ---------------------------------------------------------------------------------- helpers

  const $ = (id) => document.getElementById(id);
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const url = (path) => new URL(String(path).replace(/^\//, ""), document.baseURI).href;
  const shortId = (id) => String(id).slice(0, 8);

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function fmtBytes(bytes) {
    if (bytes === null || bytes === undefined) return "–";
    if (bytes >= 2 ** 30) return `${(bytes / 2 ** 30).toFixed(1)} GiB`;
    if (bytes >= 2 ** 20) return `${(bytes / 2 ** 20).toFixed(1)} MiB`;
    return `${Math.max(1, Math.round(bytes / 1024))} KiB`;
  }

  function fmtSeconds(s) {
    if (s === null || s === undefined || !isFinite(s)) return "–";
    if (s < 10) return `${s.toFixed(1)} s`;
    if (s < 90) return `${Math.round(s)} s`;
    const m = Math.floor(s / 60);
    return `${m} min ${Math.round(s - m * 60)} s`;
  }

  function fmtTime(iso) {
    if (!iso) return "–";
    const d = new Date(iso);
    return isNaN(d) ? iso : d.toLocaleString();
  }

  function newKey() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  // ---------------------------------------------------------------------------------- the API

  class FarmError extends Error {
    constructor({ status, code, message, field = null, retryAfter = null }) {
      super(message);
      Object.assign(this, { status, code, field, retryAfter });
    }
  }

  async function api(method, path, { json, form, headers = {} } = {}) {
    const options = { method, headers: { ...headers } };
    if (json !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(json);
    } else if (form) {
      options.body = form;
    }
    let res;
    try {
      res = await fetch(url(path), options);
    } catch (exc) {
      throw new FarmError({ status: 0, code: "unreachable",
        message: `Cannot reach the farm (${exc.message}). Is \`i2v-farm up\` still running?` });
    }
    let body = null;
    if ((res.headers.get("content-type") || "").includes("application/json")) {
      body = await res.json().catch(() => null);
    }
    if (res.status === 401 && path !== "v1/login") showLogin();
    if (!res.ok) {
      const err = (body && body.error) || {};
      throw new FarmError({
        status: res.status, code: err.code || "http_error", field: err.field || null,
        message: err.message || `HTTP ${res.status} ${res.statusText}`,
        retryAfter: res.headers.get("Retry-After"),
      });
    }
    return body;
  }

  // ---------------------------------------------------------------------------------- sign-in

  function showLogin() {
    const form = document.getElementById("login");
    if (!form.hidden) return;
    form.hidden = false;
    document.getElementById("token").focus();
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const token = document.getElementById("token").value.trim();
      try {
        await api("POST", "v1/login", { json: { token } });  // sets an HttpOnly cookie
        location.reload();
      } catch (err) {
        document.getElementById("login-error").textContent = err.message;
      }
    });
  }

  // Who is signed in (GET v1/me): priorities above the token's maximum are offered disabled, and a
  // signed-in page user can sign out (POST v1/logout ends the session on the farm, not only here).
  async function loadMe() {
    let me;
    try {
      me = await api("GET", "v1/me");
    } catch (err) {
      return;  // 401: the sign-in form is shown
    }
    const order = ["low", "normal", "high"];
    const max = order.indexOf(me.max_priority);
    for (const option of $("priority").options) {
      const rank = order.indexOf(option.value);
      option.disabled = rank > max;
      if (option.disabled) option.title = `this token may use priority up to ${me.max_priority}`;
    }
    if (order.indexOf($("priority").value) > max) $("priority").value = me.max_priority;
    if (me.name === "anonymous" && me.admin) return;  // access control off: nothing to sign out of
    const who = $("signed-in");
    who.replaceChildren(`Signed in as ${me.name}${me.admin ? " (admin)" : ""} `,
      el("button", { type: "button", class: "link", text: "Sign out", onclick: async () => {
        try { await api("POST", "v1/logout"); } finally { location.reload(); }
      } }));
    who.hidden = false;
  }

  // ---------------------------------------------------------------------------------- messages

  function describe(err) {
    if (!(err instanceof FarmError)) return { title: "Something went wrong", text: String(err && err.message || err) };
    if (err.status === 429) {
      const wait = err.retryAfter ? ` Try again in about ${fmtSeconds(Number(err.retryAfter))}.` : "";
      return { title: "The farm is at capacity", text: `${err.message.replace(/[.;]?\s*$/, ".")}${wait}` };
    }
    if (err.code === "no_class_fits") return { title: "Too large for this farm", text: err.message };
    if (err.field === "image") return { title: "The image was refused", text: err.message };
    if (err.status === 422) return { title: "Check the settings", text: err.message };
    if (err.status === 503) return { title: "The farm is not ready", text: err.message };
    if (err.status === 0) return { title: "The farm cannot be reached", text: err.message };
    return { title: `Error ${err.status}`, text: err.message };
  }

  function showMessage(kind, title, text) {
    const box = $("message");
    box.className = `message ${kind}`;
    box.replaceChildren(el("strong", { text: title }), el("span", { text }));
    box.hidden = false;
  }

  function clearMessage() {
    $("message").hidden = true;
    for (const node of document.querySelectorAll("[aria-invalid='true']")) node.removeAttribute("aria-invalid");
  }

  function showError(err) {
    const { title, text } = describe(err);
    showMessage("error", title, text);
    const field = err && err.field && $(err.field);
    if (field) field.setAttribute("aria-invalid", "true");
  }

  // ---------------------------------------------------------------------------------- farm info

  async function loadAdapters() {
    // The registered LoRA adapters, offered as suggestions in Advanced settings.
    try {
      const reply = await api("GET", "v1/adapters");
      $("lora-names").replaceChildren(...reply.adapters.map((a) =>
        el("option", { value: `${a.name}:1`, text: a.note ? `${a.name} (${a.note})` : a.name })));
    } catch (err) {
      // no registry (or no access): the field still takes names typed in
    }
  }

  async function loadInfo() {
    for (;;) {
      try {
        state.info = await api("GET", "v1/info");
        ({ finished: TERMINAL, active: ACTIVE } = state.info.statuses);
        break;
      } catch (err) {
        showError(err);
        await sleep(3000);
      }
    }
    clearMessage();
    const info = state.info;
    loadAdapters();
    renderModelNote(info);
    $("prompt-tips").textContent = info.prompt_tips;
    $("prompt-examples").replaceChildren(...info.prompt_examples.map((text) =>
      el("button", { type: "button", class: "chip", text, title: "Use this prompt",
        onclick: () => { $("prompt").value = text; $("prompt").removeAttribute("aria-invalid"); scheduleEstimate(); } })));
    $("image-tips").replaceChildren(...info.image.tips.map((t) => el("li", { text: t })));
    $("tuning-tips").replaceChildren(...info.tuning_tips.map((t) => el("li", { text: t })));
    for (const name of SELECT_FIELDS) {
      const spec = info.fields[name];
      $(name).replaceChildren(...spec.enum.map((v) => el("option", { value: v, text: v })));
      $(name).value = spec.default;
    }
    for (const name of NUMBER_FIELDS) {
      const spec = info.fields[name];
      const input = $(name);
      if (spec.minimum !== undefined) input.min = spec.minimum;
      if (spec.maximum !== undefined) input.max = spec.maximum;
      if (spec.default !== undefined && spec.default !== null) input.value = spec.default;
      input.title = `${spec.description} (${spec.minimum}–${spec.maximum})`;
    }
    $("prompt").maxLength = info.fields.prompt.maxLength;
    renderPresets(info);
    selectPreset(info.default_preset);
  }

  function renderModelNote(info) {
    const box = $("model-note");
    if (!info.note) { box.hidden = true; return; }
    const title = info.model_kind === "sim"
      ? "Simulated model: the output is a placeholder video, not a rendering."
      : "Test model: the output is noise.";
    const parts = [el("p", {}, el("strong", { text: title }), " ", info.note)];
    if (info.real_weights) {
      parts.push(el("p", { text: info.real_weights.summary }),
        el("pre", {}, el("code", { text: info.real_weights.commands.join("\n") })));
    }
    box.replaceChildren(...parts);
    box.hidden = false;
  }

  function renderPresets(info) {
    const box = $("preset-options");
    box.replaceChildren(...Object.entries(info.presets).map(([name, p]) => {
      const descId = `preset-${name}-desc`;
      return el("div", { class: "preset-card" },
        el("span", { class: "preset-top" },
          el("input", { type: "radio", name: "preset", value: name, id: `preset-${name}`, "aria-describedby": descId,
            onchange: () => selectPreset(name) }),
          el("label", { class: "preset-name", for: `preset-${name}`, text: PRESET_NAMES[name] || name })),
        el("span", { class: "preset-desc", id: descId,
          text: `${p.resolution} · ${p.num_frames} frames · ${p.num_inference_steps} steps` }));
    }));
  }

  function selectPreset(name) {
    const preset = state.info.presets[name];
    if (!preset) return;
    for (const radio of document.querySelectorAll("input[name='preset']")) radio.checked = radio.value === name;
    for (const key of PRESET_FIELDS) {
      if (key in preset) { $(key).value = preset[key]; $(key).removeAttribute("aria-invalid"); }
    }
    scheduleEstimate();
  }

  async function refreshCluster() {
    try {
      state.cluster = await api("GET", "v1/cluster");
    } catch {
      $("farm-status").textContent = "The farm does not answer right now.";
      return;
    }
    const c = state.cluster;
    const classes = c.classes.map((k) => `${k.name}: ${k.replicas.running} worker${k.replicas.running === 1 ? "" : "s"}`
      + `, ${k.busy} busy, ${k.queued} queued`).join(" · ");
    $("farm-status").textContent = `Model ${c.model} · ${classes}`;
  }

  // ---------------------------------------------------------------------------------- the form

  function fields() {
    const out = { prompt: $("prompt").value.trim(), negative_prompt: $("negative_prompt").value.trim() };
    const preset = document.querySelector("input[name='preset']:checked");
    if (preset) out.preset = preset.value;
    for (const name of SELECT_FIELDS) out[name] = $(name).value;
    for (const name of NUMBER_FIELDS) {
      const raw = $(name).value.trim();
      if (raw !== "") out[name] = Number(raw);
    }
    if (!out.negative_prompt) delete out.negative_prompt;
    const lora = $("lora") ? $("lora").value.trim() : "";
    if (lora) out.lora = lora;  // NAME:SCALE, ... (the farm parses it; docs/adapters.md)
    if ($("live_preview") && !$("live_preview").checked) out.preview = false;  // default: previews on
    return out;
  }

  function pickFile(file) {
    clearMessage();
    const info = $("image-info");
    const preview = $("preview");
    info.className = "hint";
    state.image = null;
    if (!file) { preview.hidden = true; info.textContent = ""; scheduleEstimate(); return; }
    const limits = state.info ? state.info.image : { types: ["image/jpeg", "image/png", "image/webp"], max_bytes: 20 * 2 ** 20, min_side: 64, max_aspect_ratio: 4 };
    const byName = /\.(jpe?g|png|webp)$/i.test(file.name);
    if (!limits.types.includes(file.type) && !(file.type === "" && byName)) {
      preview.hidden = true;
      info.textContent = "";
      showMessage("error", "The image was refused",
        `${file.name} is ${file.type || "not a recognised image"}; the farm takes JPG, PNG or WEBP images.`);
      $("image").setAttribute("aria-invalid", "true");
      return;
    }
    if (file.size > limits.max_bytes) {
      preview.hidden = true;
      showMessage("error", "The image was refused",
        `${file.name} is ${fmtBytes(file.size)}; images may be at most ${fmtBytes(limits.max_bytes)}.`);
      $("image").setAttribute("aria-invalid", "true");
      return;
    }
    state.image = { file, width: null, height: null };
    if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
    preview.onload = () => {
      const w = preview.naturalWidth, h = preview.naturalHeight;
      state.image.width = w;
      state.image.height = h;
      const notes = [];
      if (Math.min(w, h) < limits.min_side) notes.push(`too small: the farm needs at least ${limits.min_side} px a side`);
      else if (Math.max(w, h) / Math.min(w, h) > limits.max_aspect_ratio) notes.push(`too long and thin: at most ${limits.max_aspect_ratio}:1`);
      else if (Math.min(w, h) < 512) notes.push("512×512 or larger works best");
      info.textContent = `${file.name} · ${w} × ${h} px · ${fmtBytes(file.size)}${notes.length ? " · " + notes.join("; ") : ""}`;
      info.className = notes.length ? "hint warn" : "hint";
      scheduleEstimate();
    };
    preview.onerror = () => {
      preview.hidden = true;
      info.textContent = `${file.name} · ${fmtBytes(file.size)} · this browser cannot preview it; the farm will check it`;
      info.className = "hint warn";
      scheduleEstimate();
    };
    preview.src = URL.createObjectURL(file);
    preview.hidden = false;
  }

  function scheduleEstimate() {
    clearTimeout(state.estimateTimer);
    state.estimateTimer = setTimeout(updateEstimate, 200);
  }

  async function updateEstimate() {
    if (!state.info) return;
    const seq = ++state.estimateSeq;
    const body = fields();
    if (state.image && state.image.width) { body.width = state.image.width; body.height = state.image.height; }
    const box = $("estimate");
    let est;
    try {
      est = await api("POST", "v1/estimate", { json: body });
    } catch (err) {
      if (seq !== state.estimateSeq) return;
      box.className = "estimate bad";
      box.replaceChildren(el("p", { class: "est-main", text: describe(err).title }), el("p", { text: err.message }));
      if (err.field && $(err.field)) $(err.field).setAttribute("aria-invalid", "true");
      $("generate").disabled = false;
      return;
    }
    if (seq !== state.estimateSeq) return;
    for (const name of [...NUMBER_FIELDS, ...SELECT_FIELDS]) $(name).removeAttribute("aria-invalid");
    const video = `Output ${est.width} × ${est.height} px${state.image && state.image.width ? "" : " (square image)"}, `
      + `${est.num_frames} frames at ${est.fps} fps = ${est.duration_s} s of video.`;
    if (!est.fits) {
      box.className = "estimate bad";
      box.replaceChildren(
        el("p", { class: "est-main", text: `Too large for this farm: ~${fmtBytes(est.vram_bytes)} of GPU memory.` }),
        el("p", { text: est.reason }), el("p", { text: video }));
      $("generate").disabled = true;
      $("generate").title = "No GPU class of this farm can hold this job; lower the resolution or the frames.";
      return;
    }
    const cls = state.cluster && state.cluster.classes.find((k) => k.name === est.vram_class);
    const queue = cls ? `Queue on ${cls.name}: ${cls.queued} waiting, ${cls.busy} of ${cls.replicas.running} worker${cls.replicas.running === 1 ? "" : "s"} busy.` : null;
    box.className = "estimate";
    box.replaceChildren(
      el("p", { class: "est-main",
        text: `VRAM class ${est.vram_class} · peak ~${fmtBytes(est.vram_bytes)} · about ${fmtSeconds(est.seconds)} on its GPU (${est.gpu})` }),
      el("p", { text: video }),
      queue && el("p", { text: queue }),
      state.info.estimate_note && el("p", { class: "est-note", text: state.info.estimate_note }));
    $("generate").disabled = false;
    $("generate").removeAttribute("title");
  }

  async function submit(event) {
    event.preventDefault();
    clearMessage();
    if (!state.image) {
      showMessage("error", "Choose an image first", "Pick a JPG, PNG or WEBP picture to animate.");
      $("image").setAttribute("aria-invalid", "true");
      return;
    }
    const values = fields();
    if (!values.prompt) {
      showMessage("error", "Write a prompt", "Say what should move, and how: subject + action + direction/speed + environment.");
      $("prompt").setAttribute("aria-invalid", "true");
      $("prompt").focus();
      return;
    }
    const form = new FormData();
    form.append("image", state.image.file, state.image.file.name);
    for (const [key, value] of Object.entries(values)) form.append(key, String(value));
    const button = $("generate");
    button.disabled = true;
    button.textContent = "Submitting…";
    try {
      const job = await api("POST", "v1/jobs", { form, headers: { "Idempotency-Key": newKey() } });
      show(job);
      refreshHistory();
    } catch (err) {
      showError(err);
    } finally {
      button.disabled = false;
      button.textContent = "Generate";
      scheduleEstimate();
    }
  }

  // ---------------------------------------------------------------------------------- one job

  function show(job) {
    state.current = job.id;
    renderJob(job);
    watch(job.id);
    for (const [id, li] of state.history) li.classList.toggle("current", id === job.id);
  }

  async function watch(id) {
    const token = ++state.watchToken;
    for (;;) {
      await sleep(POLL_MS);
      if (token !== state.watchToken) return;
      let job;
      try {
        job = await api("GET", `v1/jobs/${id}`);
      } catch (err) {
        if (token !== state.watchToken) return;
        showError(err);
        if (err.status === 404) return;
        await sleep(2000);
        continue;
      }
      if (token !== state.watchToken) return;
      renderJob(job);
      if (TERMINAL.includes(job.status)) {
        refreshHistory();
        refreshCluster().then(scheduleEstimate); // the queue line of the estimate
        return;
      }
    }
  }

  /** Seconds per step and seconds left, from the steps seen advancing (null until two changes). */
  function eta(job) {
    const p = job.progress || {};
    if (job.status !== "running" || !p.total) return null;
    const now = performance.now();
    let r = state.rates.get(job.id);
    if (!r || p.step < r.step) {
      r = { step: p.step, t: now, firstStep: null, firstT: null };
      state.rates.set(job.id, r);
    }
    if (p.step !== r.step) {
      if (r.firstStep === null) { r.firstStep = p.step; r.firstT = now; }
      r.step = p.step;
      r.t = now;
    }
    if (r.firstStep === null || r.step === r.firstStep) return null;
    const perStep = (r.t - r.firstT) / 1000 / (r.step - r.firstStep);
    const left = Math.max(0, (p.total - p.step) * perStep - (now - r.t) / 1000);
    return { perStep, left };
  }

  function progressText(job) {
    const p = job.progress || {};
    switch (job.status) {
      case "queued":
        return job.queue_position
          ? `Queued: position ${job.queue_position} in the ${job.vram_class} queue.`
          : `Queued for a ${job.vram_class} worker.`;
      case "running": {
        if (!p.total || !p.step) return `Starting on ${job.vram_class}: loading the image and conditioning…`;
        if (p.step >= p.total) return `Step ${p.step} / ${p.total} · decoding frames and encoding the MP4…`;
        const e = eta(job);
        const rate = e ? ` · ${fmtSeconds(e.perStep)} per step · about ${fmtSeconds(e.left)} left` : " · estimating time left…";
        return `Step ${p.step} / ${p.total}${rate}`;
      }
      case "succeeded": {
        const t = job.timings || {};
        return `Done in ${fmtSeconds(t.total ?? t.queue_to_finish)}.`;
      }
      case "failed":
        return `Failed: ${job.error ? job.error.message : "unknown error"}`;
      case "canceled":
        return p.total ? `Canceled after step ${p.step || 0} of ${p.total}.` : "Canceled.";
      default:
        return job.status;
    }
  }

  function renderJob(job) {
    if (job.id !== state.current) return;
    $("output-empty").hidden = true;
    $("job-view").hidden = false;
    const badge = $("job-status");
    badge.className = `badge ${job.status}`;
    badge.textContent = job.status;
    $("job-title").textContent = `${shortId(job.id)} · ${job.params.prompt}`;
    $("job-title").title = job.params.prompt;

    const bar = $("job-progress");
    const p = job.progress || {};
    if (job.status === "queued" || (job.status === "running" && !p.total)) {
      bar.removeAttribute("value"); // indeterminate
    } else {
      bar.max = p.total || 1;
      bar.value = job.status === "succeeded" ? bar.max : (p.step || 0);
    }
    $("job-progress-text").textContent = progressText(job);
    renderPreview(job);

    const cancel = $("job-cancel");
    cancel.hidden = !ACTIVE.includes(job.status);
    cancel.onclick = () => cancelJob(job.id);

    const video = $("video");
    const download = $("download");
    if (job.status === "succeeded" && job.result) {
      const src = url(job.result.url || `v1/jobs/${job.id}/video`);
      if (video.dataset.job !== job.id) {
        video.dataset.job = job.id;
        video.src = src;
        video.hidden = false;
        video.play().catch(() => {});
      }
      download.href = src;
      download.download = `video_${shortId(job.id)}.mp4`;
      download.hidden = false;
    } else {
      if (video.dataset.job) { video.removeAttribute("src"); delete video.dataset.job; video.load(); }
      video.hidden = true;
      download.hidden = true;
    }
    if (job.status === "failed" && !state.reported.has(job.id)) {
      state.reported.add(job.id);
      showMessage("error", "The job failed", job.error ? job.error.message : "unknown error");
    }
    renderRecord(job);
  }

  // Live preview: while the job denoises, v1/jobs/{id}/preview holds a JPEG strip of a few frames
  // (X-Preview-Frames) of the clip as the model currently predicts it; the canvas plays them in a loop.
  const PREVIEW_FRAME_MS = 150;
  const preview = { job: null, seq: null, loading: false, bitmap: null, frames: 1, frame: 0, timer: null };

  function renderPreview(job) {
    const box = $("job-preview-box");
    const live = job.status === "running" && job.preview;
    if (!live) {
      hidePreview();
      return;
    }
    if (preview.job !== job.id) hidePreview();
    if (job.preview.seq === preview.seq || preview.loading) return;
    preview.job = job.id;
    preview.loading = true;
    fetch(url(`v1/jobs/${job.id}/preview`), { cache: "no-store" })
      .then(async (res) => {
        if (res.status !== 200 || preview.job !== job.id) return;
        const frames = Number(res.headers.get("X-Preview-Frames")) || 1;
        const step = res.headers.get("X-Preview-Step");
        const total = res.headers.get("X-Preview-Total");
        const bitmap = await createImageBitmap(await res.blob());
        if (preview.job !== job.id || state.current !== job.id) return;
        preview.bitmap = bitmap;
        preview.frames = frames;
        preview.seq = Number(res.headers.get("X-Preview-Seq")) || job.preview.seq;
        $("job-preview-text").textContent = `Live preview at step ${step} / ${total} (a rough look: `
          + "the video is decoded at the end).";
        box.hidden = false;
        drawPreview();
        if (!preview.timer) preview.timer = setInterval(drawPreview, PREVIEW_FRAME_MS);
      })
      .catch(() => {}) // a preview is a nicety: the job goes on without it
      .finally(() => { preview.loading = false; });
  }

  function drawPreview() {
    const bitmap = preview.bitmap;
    if (!bitmap) return;
    const canvas = $("job-preview");
    const width = Math.floor(bitmap.width / preview.frames);
    if (canvas.width !== width || canvas.height !== bitmap.height) {
      canvas.width = width;
      canvas.height = bitmap.height;
    }
    preview.frame = (preview.frame + 1) % preview.frames;
    canvas.getContext("2d").drawImage(bitmap, preview.frame * width, 0, width, bitmap.height,
      0, 0, width, bitmap.height);
  }

  function hidePreview() {
    if (preview.timer) clearInterval(preview.timer);
    Object.assign(preview, { job: null, seq: null, bitmap: null, frames: 1, frame: 0, timer: null });
    $("job-preview-box").hidden = true;
  }

  function renderRecord(job) {
    const params = job.params || {};
    const r = job.result;
    const t = job.timings || {};
    const rows = [
      ["Job", job.id],
      ["Status", job.status],
      job.reused_from && ["Reused from", `job ${job.reused_from} (an identical earlier request: no GPU ran)`],
      ["Prompt", params.prompt],
      params.negative_prompt && ["Negative prompt", params.negative_prompt],
      ["Time", t.total !== undefined || t.queue_to_finish !== undefined
        ? `${fmtSeconds(t.total ?? t.queue_to_finish)}${t.denoise !== undefined ? ` (denoise ${fmtSeconds(t.denoise)})` : ""}`
        : "–"],
      ["Peak VRAM", job.peak_vram_bytes ? fmtBytes(job.peak_vram_bytes)
        : job.status === "succeeded" ? "not measured (no GPU)" : "–"],
      ["VRAM class", job.spilled && job.home_class ? `${job.vram_class} (spilled up from ${job.home_class})` : job.vram_class],
      ["Node", job.node || "–"],
      job.device && ["Device", job.device],
      ["Seed", params.seed ?? "–"],
      params.lora && params.lora.length && ["LoRA", params.lora.map((l) => `${l.name} × ${l.scale}`).join(", ")],
      ["Settings", `${params.preset ? params.preset + " · " : ""}${params.resolution} · ${params.num_frames} frames · `
        + `${params.fps} fps · ${params.num_inference_steps} steps · guidance ${params.guidance_scale} · ${params.scheduler}`],
      r && ["Video", `${r.width} × ${r.height} px · ${r.frames} frames · ${r.fps} fps · ${(r.frames / r.fps).toFixed(2)} s · ${fmtBytes(r.bytes)}`],
      ["Estimate", job.estimate ? `${fmtBytes(job.estimate.vram_bytes)} · ${fmtSeconds(job.estimate.seconds)} on the class GPU` : "–"],
      r && r.key && ["Stored as", r.key],
      ["Submitted", fmtTime(job.created_at)],
      state.info && ["Model", state.info.model],
    ].filter(Boolean);
    $("record").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: String(v) })]));
  }

  async function cancelJob(id) {
    try {
      const job = await api("POST", `v1/jobs/${id}/cancel`);
      if (id === state.current) renderJob(job);
    } catch (err) {
      showError(err);
    }
    refreshHistory();
  }

  // ---------------------------------------------------------------------------------- history

  async function refreshHistory() {
    let list;
    try {
      list = await api("GET", `v1/jobs?limit=${HISTORY_LIMIT}`);
    } catch {
      return; // the header says when the farm does not answer
    }
    const ul = $("history");
    const seen = new Set();
    list.jobs.forEach((job, i) => {
      seen.add(job.id);
      let li = state.history.get(job.id);
      if (!li) {
        li = historyItem(job);
        state.history.set(job.id, li);
      }
      updateHistoryItem(li, job);
      if (ul.children[i] !== li) ul.insertBefore(li, ul.children[i] || null);
    });
    for (const [id, li] of state.history) {
      if (!seen.has(id)) { li.remove(); state.history.delete(id); }
    }
    $("history-empty").hidden = list.jobs.length > 0;
  }

  function historyItem(job) {
    const sid = shortId(job.id);
    const li = el("li", { class: "job-item", "data-job": job.id },
      el("div", { class: "thumb" }, el("span", { class: "no-poster", text: "no preview" })),
      el("div", { class: "job-main" },
        el("p", { class: "job-prompt" }),
        el("p", { class: "job-meta" }),
        el("div", { class: "job-actions" },
          el("button", { type: "button", class: "secondary open", "aria-label": `Open job ${sid}`, text: "Open",
            onclick: () => { clearMessage(); show(li._job); } }),
          el("a", { class: "download", "aria-label": `Download the video of job ${sid}`, text: "Download", hidden: true }),
          el("button", { type: "button", class: "secondary danger cancel", "aria-label": `Cancel job ${sid}`,
            text: "Cancel", hidden: true, onclick: () => cancelJob(job.id) }))));
    return li;
  }

  function updateHistoryItem(li, job) {
    li._job = job;
    li.classList.toggle("current", job.id === state.current);
    const p = job.params || {};
    li.querySelector(".job-prompt").textContent = p.prompt;
    li.querySelector(".job-prompt").title = p.prompt;
    const prog = job.progress || {};
    const step = job.status === "running" && prog.total ? ` · step ${prog.step || 0}/${prog.total}` : "";
    const pos = job.status === "queued" && job.queue_position ? ` · #${job.queue_position} in queue` : "";
    li.querySelector(".job-meta").replaceChildren(
      el("span", { class: `badge ${job.status}`, text: job.status }),
      ` ${shortId(job.id)} · ${p.resolution} · ${p.num_frames} frames · ${job.vram_class}${step}${pos} · `
        + new Date(job.created_at).toLocaleTimeString());
    const download = li.querySelector(".download");
    const done = job.status === "succeeded" && job.result;
    download.hidden = !done;
    if (done) {
      download.href = url(job.result.url || `v1/jobs/${job.id}/video`);
      download.download = `video_${shortId(job.id)}.mp4`;
    }
    li.querySelector(".cancel").hidden = !ACTIVE.includes(job.status);
    const thumb = li.querySelector(".thumb");
    if (done && !thumb.dataset.poster) {
      thumb.dataset.poster = "1";
      const img = el("img", { alt: `First frame of job ${shortId(job.id)}`, loading: "lazy" });
      img.onerror = () => thumb.replaceChildren(el("span", { class: "no-poster", text: "no preview" }));
      img.src = url((job.links && job.links.poster) || `v1/jobs/${job.id}/poster`);
      thumb.replaceChildren(img);
    } else if (!done) {
      thumb.replaceChildren(el("span", { class: "no-poster", text: job.status }));
    }
  }

  async function historyLoop() {
    for (;;) {
      await refreshHistory();
      const busy = [...state.history.values()].some((li) => li._job && ACTIVE.includes(li._job.status));
      await sleep(busy ? 1500 : 6000);
    }
  }

  async function clusterLoop() {
    for (;;) {
      await refreshCluster();
      await sleep(5000);
    }
  }

  // ---------------------------------------------------------------------------------- wiring

  function wire() {
    $("job-form").addEventListener("submit", submit);
    $("image").addEventListener("change", () => pickFile($("image").files[0]));
    const drop = $("drop");
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("dragging"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("dragging");
      if (e.dataTransfer.files.length) {
        $("image").files = e.dataTransfer.files;
        pickFile(e.dataTransfer.files[0]);
      }
    });
    $("job-form").addEventListener("input", (e) => {
      if (e.target.id !== "image") { e.target.removeAttribute("aria-invalid"); scheduleEstimate(); }
    });
    $("history-refresh").addEventListener("click", refreshHistory);
    $("video").addEventListener("error", () => {
      if (!$("video").getAttribute("src")) return;
      showMessage("error", "This browser cannot play the video",
        "The MP4 is H.264; use the download link to play it elsewhere.");
    });
  }

  async function main() {
    wire();
    clusterLoop();
    await loadInfo();
    loadMe();
    historyLoop();
  }

  main();
})();
