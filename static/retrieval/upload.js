// The upload portal's sender: choose a disc or folder (picker or drag and drop), announce
// its files to the server in batches (path, size, first bytes), then send those the
// server does not have yet, several to a request and several requests at once (a large
// file goes alone), with progress, automatic
// retries, and recovery after a dropped connection: before sending again, the browser
// asks the server which files it has, so nothing already received is sent twice. A
// request that goes quiet (no bytes sent and no answer for config.stallSeconds: a
// connection that died without closing, as behind a sleeping router) is given up and
// treated as a dropped connection.
(function () {
  "use strict";

  const root = document.querySelector("[data-upload]");
  if (!root) return;
  const config = JSON.parse(document.getElementById("upload-config").textContent);
  const csrf = JSON.parse(document.body.getAttribute("hx-headers") || "{}")["X-CSRFToken"];
  const words = {};
  document.querySelector("template[data-i18n]").content.querySelectorAll("[data-key]")
    .forEach(function (el) { words[el.dataset.key] = el.textContent.trim(); });

  function say(key, values) {
    return (words[key] || key).replace(/%\((\w+)\)s/g, function (_, name) {
      return values && name in values ? values[name] : "";
    });
  }
  function $(selector) { return root.querySelector(selector); }
  function show(el, visible) { el.hidden = !visible; }

  const number = new Intl.NumberFormat(document.documentElement.lang || undefined);
  function size(bytes) {
    const units = ["bytes", "KB", "MB", "GB", "TB"];
    let value = bytes, unit = 0;
    while (value >= 1000 && unit < units.length - 1) { value /= 1000; unit += 1; }
    return (unit ? value.toFixed(value < 100 ? 1 : 0) : value) + " " + units[unit];
  }
  function files(n) { return n === 1 ? say("file") : say("files", { n: number.format(n) }); }

  // --- Paths as the server keeps them ----------------------------------------------------

  function cleanPath(text) {
    return text.normalize("NFC").replace(/\\/g, "/").split("/")
      .filter(function (p) { return p && p !== "."; }).join("/");
  }

  // --- Choosing ---------------------------------------------------------------------------

  const state = {
    items: [],        // {file, path, size, status: "new"|"queued"|"sending"|"done"|"failed", loaded}
    byPath: new Map(),
    queue: [],
    active: new Set(),  // the files of the requests in flight
    sending: 0,         // requests in flight
    waiting: 0,         // files set aside to try again shortly
    announced: false,
    offline: false,
    recovering: null,
    fatal: false,
    counts: { images: 0, skipped: 0, invalid: 0 },
    doneBytes: 0,
    totalBytes: 0,
    started: 0,
    samples: [],
  };

  function choose(list, name) {
    const items = [];
    const seen = new Set();
    list.forEach(function (entry) {
      const path = cleanPath(entry.path);
      if (!path || seen.has(path)) return;
      seen.add(path);
      items.push({ file: entry.file, path: path, size: entry.file.size, status: "new", loaded: 0 });
    });
    state.items = items;
    state.byPath = new Map(items.map(function (item) { return [item.path, item]; }));
    state.totalBytes = items.reduce(function (sum, item) { return sum + item.size; }, 0);
    const error = $("[data-chosen-error]");
    show($("[data-pick]"), false);
    show($("[data-chosen]"), true);
    $("[data-chosen-name]").textContent = name ? say("folder", { name: name }) : say("selection");
    $("[data-chosen-summary]").textContent = say("chosen", { files: files(items.length), size: size(state.totalBytes) });
    show(error, items.length === 0 || items.length > config.maxFiles);
    $("[data-start]").disabled = items.length === 0 || items.length > config.maxFiles;
    if (items.length === 0) error.textContent = say("empty");
    else if (items.length > config.maxFiles) error.textContent = "";
    $("[data-start]").focus();
  }

  function topFolder(paths) {
    const first = paths.length ? paths[0].split("/")[0] : "";
    const shared = paths.length > 0 && paths.every(function (p) { return p.indexOf("/") > 0 && p.split("/")[0] === first; });
    return shared ? first : "";
  }

  const folderInput = root.querySelector("[data-folder-input]");
  const filesInput = root.querySelector("[data-files-input]");
  folderInput.addEventListener("change", function () {
    const list = Array.from(folderInput.files).map(function (f) { return { file: f, path: f.webkitRelativePath || f.name }; });
    choose(list, topFolder(list.map(function (e) { return e.path; })));
  });
  filesInput.addEventListener("change", function () {
    choose(Array.from(filesInput.files).map(function (f) { return { file: f, path: f.name }; }), "");
  });
  $("[data-rechoose]").addEventListener("click", function () {
    folderInput.value = "";
    filesInput.value = "";
    show($("[data-chosen]"), false);
    show($("[data-pick]"), true);
  });

  // Drag and drop: a dropped folder is walked entry by entry. A directory reader returns
  // its entries in batches (Chromium: at most 100 per call), so it is read until it
  // returns none.
  const drop = $("[data-drop]");
  ["dragenter", "dragover"].forEach(function (type) {
    drop.addEventListener(type, function (event) {
      event.preventDefault();
      event.dataTransfer.dropEffect = "copy";
      drop.classList.add("is-over");
    });
  });
  ["dragleave", "dragend"].forEach(function (type) {
    drop.addEventListener(type, function () { drop.classList.remove("is-over"); });
  });
  drop.addEventListener("drop", function (event) {
    event.preventDefault();
    drop.classList.remove("is-over");
    const entries = Array.from(event.dataTransfer.items || [])
      .map(function (item) { return item.webkitGetAsEntry ? item.webkitGetAsEntry() : null; })
      .filter(Boolean);
    if (!entries.length) {
      choose(Array.from(event.dataTransfer.files).map(function (f) { return { file: f, path: f.name }; }), "");
      return;
    }
    const found = [];
    const title = drop.querySelector(".u-drop-title");
    const before = title.textContent;
    Promise.all(entries.map(function (entry) { return walk(entry, found, title); })).then(function () {
      title.textContent = before;
      const name = entries.length === 1 && entries[0].isDirectory ? entries[0].name : "";
      choose(found, name);
    }, function () {
      title.textContent = say("unreadable");
    });
  });

  function readAll(reader) {
    return new Promise(function (resolve, reject) { reader.readEntries(resolve, reject); });
  }
  async function walk(entry, found, title) {
    if (entry.isFile) {
      const file = await new Promise(function (resolve, reject) { entry.file(resolve, reject); });
      found.push({ file: file, path: entry.fullPath.replace(/^\/+/, "") });
      if (found.length % 100 === 0) title.textContent = say("reading", { n: number.format(found.length) });
      return;
    }
    if (!entry.isDirectory) return;
    const reader = entry.createReader();
    for (;;) {
      const batch = await readAll(reader);
      if (!batch.length) break;
      for (const child of batch) await walk(child, found, title);
    }
  }

  // --- Talking to the server -----------------------------------------------------------

  class Refused extends Error {
    constructor(status, data) {
      super((data && data.error) || String(status));
      this.status = status;
      this.data = data || {};
    }
  }

  function delay(attempt) {
    return Math.min(30, Math.pow(2, attempt)) * 1000 * (0.75 + Math.random() / 2);
  }

  function offlineCountdown(ms) {
    const text = $("[data-offline-text]");
    const until = Date.now() + ms;
    show($("[data-offline]"), true);
    return new Promise(function (resolve) {
      function tick() {
        const left = Math.ceil((until - Date.now()) / 1000);
        if (left <= 0) {
          text.textContent = say("reconnecting");
          resolve();
          return;
        }
        text.textContent = say("retrying", { n: left });
        setTimeout(tick, 250);
      }
      tick();
    });
  }

  // A JSON POST that waits out dropped connections, server restarts and connections
  // that go quiet.
  async function postJson(url, body) {
    for (let attempt = 0; ; attempt += 1) {
      let response;
      try {
        response = await fetch(url, {
          method: "POST", body: JSON.stringify(body), credentials: "same-origin",
          headers: { "Content-Type": "application/json", "Accept": "application/json", "X-CSRFToken": csrf },
          signal: AbortSignal.timeout(config.stallSeconds * 1000),
        });
      } catch (networkError) {
        state.offline = true;
        await offlineCountdown(delay(attempt));
        continue;
      }
      if (response.status >= 500 || response.status === 429) {
        state.offline = true;
        await offlineCountdown(delay(attempt));
        continue;
      }
      const data = await response.json().catch(function () { return {}; });
      if (!response.ok) throw new Refused(response.status, data);
      return data;
    }
  }

  async function readHead(file) {
    const buffer = await file.slice(0, config.headBytes).arrayBuffer();
    let binary = "";
    new Uint8Array(buffer).forEach(function (b) { binary += String.fromCharCode(b); });
    return btoa(binary);
  }

  async function mapLimit(items, limit, fn) {
    const results = new Array(items.length);
    let next = 0;
    async function worker() {
      while (next < items.length) {
        const i = next++;
        results[i] = await fn(items[i]);
      }
    }
    await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
    return results;
  }

  // Announce ``items``; settle those the server has, queue the others (once).
  async function announce(items, checking) {
    for (let i = 0; i < items.length; i += config.batch) {
      const chunk = items.slice(i, i + config.batch);
      const heads = await mapLimit(chunk, 8, function (item) { return readHead(item.file); });
      if (checking) setTitle(say("checking", { n: number.format(Math.min(i + chunk.length, items.length)), total: number.format(items.length) }));
      const answer = await postJson(config.announceUrl, {
        files: chunk.map(function (item, k) { return { path: item.path, size: item.size, head: heads[k] }; }),
        total_files: state.items.length, total_bytes: state.totalBytes,
      });
      answer.files.forEach(function (result, k) {
        const item = chunk[k];
        if (result.outcome === "pending") {
          if (item.status === "new" || item.status === "failed") {
            item.status = "queued";
            state.queue.push(item);
          }
        } else if (item.status !== "done") {
          state.queue = state.queue.filter(function (q) { return q !== item; });
          settle(item, result);
        }
      });
      state.offline = false;
      show($("[data-offline]"), false);
      pump();
    }
  }

  function settle(item, result) {
    item.status = "done";
    item.loaded = 0;
    state.doneBytes += item.size;
    const outcome = result.outcome;
    if (outcome === "stored" || outcome === "duplicate" || outcome === "conflict") state.counts.images += 1;
    if (outcome === "skipped" || outcome === "refused") state.counts.skipped += 1;
    if (outcome === "invalid") state.counts.invalid += 1;
    if (outcome !== "stored" && outcome !== "duplicate") problem(item.path, result.label, result.reason);
    render();
  }

  function problem(path, label, reason) {
    const list = $("[data-problems-list]");
    const li = document.createElement("li");
    const name = document.createElement("span");
    name.className = "mono";
    name.textContent = path;
    const why = document.createElement("span");
    why.className = "u-why";
    why.textContent = label + (reason ? ": " + reason : "");
    li.append(name, why);
    list.append(li);
    const details = $("[data-problems]");
    show(details, true);
    details.querySelector("[data-problems-title]").textContent = say("problems", { n: number.format(list.children.length) });
  }

  // --- Sending ---------------------------------------------------------------------------

  function pump() {
    while (!state.fatal && !state.offline && state.sending < config.parallel && state.queue.length) {
      send(nextBatch());
    }
    render();
    if (!state.fatal && state.announced && !state.queue.length && !state.active.size && !state.waiting && !state.recovering) finish();
  }

  // The next files to send together: a disc is mostly small images, and one request for
  // many of them costs the server far less than one each. A large file goes alone.
  function nextBatch() {
    const batch = [];
    let bytes = 0;
    while (state.queue.length && batch.length < config.batchFiles) {
      const item = state.queue[0];
      if (batch.length && bytes + item.size > config.batchBytes) break;
      batch.push(state.queue.shift());
      bytes += item.size;
    }
    return batch;
  }

  // One request: a manifest (paths and sizes, in order), then the files' bytes. The
  // browser streams the files from the disc; nothing is read into memory here.
  function send(batch) {
    state.sending += 1;
    batch.forEach(function (item) {
      item.status = "sending";
      item.loaded = 0;
      state.active.add(item);
    });
    const row = activeRow(batch);
    const manifest = new TextEncoder().encode(JSON.stringify({
      files: batch.map(function (item) { return { path: item.path, size: item.size }; }),
    }));
    const total = batch.reduce(function (sum, item) { return sum + item.size; }, 0);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", config.batchUrl);
    xhr.setRequestHeader("X-Upload-Manifest-Length", String(manifest.length));
    xhr.setRequestHeader("X-CSRFToken", csrf);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    // Bytes going out, or the answer coming, are signs of life; none for too long and
    // the request is given up.
    let lastSign = Date.now();
    const watchdog = setInterval(function () {
      if (Date.now() - lastSign > config.stallSeconds * 1000) xhr.abort();
    }, 1000);
    xhr.upload.onload = xhr.onprogress = function () { lastSign = Date.now(); };
    xhr.upload.onprogress = function (event) {
      lastSign = Date.now();
      let left = Math.max(0, event.loaded - manifest.length);
      batch.forEach(function (item) {
        item.loaded = Math.min(item.size, left);
        left -= item.loaded;
      });
      const sent = Math.max(0, event.loaded - manifest.length);
      row.querySelector(".progress-bar").style.width = (total ? Math.min(100, 100 * sent / total) : 100) + "%";
      render();
    };
    xhr.onloadend = function () { clearInterval(watchdog); };
    xhr.onload = function () {
      let data = {};
      try { data = JSON.parse(xhr.responseText); } catch (e) { data = {}; }
      finished(batch, row);
      if (xhr.status === 200 && Array.isArray(data.files) && data.files.length === batch.length) {
        data.files.forEach(function (result, k) {
          if (result.error) fail(batch[k], result.error);
          else settle(batch[k], result);
        });
      } else if (xhr.status === 401) {
        stop(data.error, data.signin);
        requeue(batch);
      } else if (xhr.status === 413) {
        stop(data.error);
      } else if (xhr.status >= 500 || xhr.status === 429 || (xhr.status === 400 && data.retry)) {
        retryLater(batch);
      } else {
        batch.forEach(function (item) { fail(item, data.error || String(xhr.status)); });
      }
      pump();
    };
    xhr.onerror = xhr.onabort = function () {
      finished(batch, row);
      requeue(batch);
      recover();
    };
    xhr.send(new Blob([manifest].concat(batch.map(function (item) { return item.file; }))));
  }

  function requeue(batch) {
    batch.slice().reverse().forEach(function (item) {
      item.status = "queued";
      state.queue.unshift(item);
    });
  }

  function finished(batch, row) {
    state.sending -= 1;
    batch.forEach(function (item) {
      state.active.delete(item);
      item.loaded = 0;
    });
    row.remove();
  }

  function retryLater(batch) {
    const again = [];
    batch.forEach(function (item) {
      item.attempts = (item.attempts || 0) + 1;
      if (item.attempts > 6) {
        fail(item, say("failed"));
      } else {
        item.status = "waiting";
        again.push(item);
      }
    });
    if (!again.length) return;
    state.waiting += 1;
    setTimeout(function () {
      state.waiting -= 1;
      requeue(again);
      pump();
    }, delay(again[0].attempts));
  }

  function fail(item, message) {
    item.status = "failed";
    state.failed = (state.failed || 0) + 1;
    problem(item.path, say("failed"), message);
  }

  // The connection dropped: wait, then ask the server which of the unsent files it has
  // (a file may have arrived whole just before the connection broke), and carry on.
  function recover() {
    if (state.recovering) return;
    state.offline = true;
    state.recovering = (async function () {
      await offlineCountdown(delay(0));
      const unsent = state.queue.slice();
      try {
        await announce(unsent, false);
      } catch (error) {
        handleRefused(error);
      }
      state.recovering = null;
      state.offline = false;
      pump();
    })();
  }

  function stop(message, signin) {
    state.fatal = true;
    const box = $("[data-fatal]");
    box.textContent = message || "";
    if (signin) {
      const link = document.createElement("a");
      link.href = signin;
      link.textContent = " " + say("session");
      box.append(link);
    }
    show(box, true);
    window.removeEventListener("beforeunload", warn);
  }

  function handleRefused(error) {
    if (error instanceof Refused) stop(error.message, error.data.signin);
    else stop(String(error));
  }

  function activeRow(batch) {
    const li = document.createElement("li");
    const name = document.createElement("span");
    name.className = "mono u-active-name";
    name.textContent = batch[0].path;
    const bar = document.createElement("div");
    bar.className = "progress u-active-bar";
    bar.innerHTML = '<div class="progress-bar" style="width:0%"></div>';
    const amount = document.createElement("span");
    amount.className = "u-active-size muted";
    const bytes = batch.reduce(function (sum, item) { return sum + item.size; }, 0);
    amount.textContent = batch.length === 1 ? size(bytes) : files(batch.length) + " · " + size(bytes);
    li.append(name, bar, amount);
    $("[data-active]").append(li);
    return li;
  }

  // --- Showing progress ------------------------------------------------------------------

  let renderQueued = false;
  function render() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(function () {
      renderQueued = false;
      let inFlight = 0;
      state.active.forEach(function (item) { inFlight += item.loaded; });
      const done = Math.min(state.totalBytes, state.doneBytes + inFlight);
      const percent = state.totalBytes ? Math.floor(100 * done / state.totalBytes) : 100;
      const settled = state.items.filter(function (i) { return i.status === "done"; }).length;
      $("[data-percent]").textContent = percent + "%";
      const bar = $("[data-bar]");
      bar.setAttribute("aria-valuenow", String(percent));
      bar.firstElementChild.style.width = percent + "%";
      $("[data-bytes]").textContent = say("bytes", { done: size(done), total: size(state.totalBytes) });
      $("[data-files]").textContent = say("progress_files", { done: number.format(settled), total: number.format(state.items.length) });
      $("[data-count=images]").textContent = number.format(state.counts.images);
      $("[data-count=skipped]").textContent = number.format(state.counts.skipped);
      $("[data-count=invalid]").textContent = number.format(state.counts.invalid);
      $("[data-count=waiting]").textContent = number.format(state.items.length - settled - (state.failed || 0));
      $("[data-eta]").textContent = eta(done);
    });
  }

  function eta(done) {
    const now = Date.now();
    state.samples.push([now, done]);
    while (state.samples.length > 2 && now - state.samples[0][0] > 15000) state.samples.shift();
    const first = state.samples[0];
    const rate = (done - first[1]) / Math.max(1, now - first[0]);
    if (rate <= 0 || now - state.started < 3000) return "";
    const seconds = Math.round((state.totalBytes - done) / rate / 1000);
    if (seconds < 5) return "";
    return " · " + say("eta", { time: seconds >= 90 ? say("minutes", { n: Math.round(seconds / 60) }) : say("seconds", { n: seconds }) });
  }

  function setTitle(text) { $("[data-progress-title]").textContent = text; }

  function finish() {
    window.removeEventListener("beforeunload", warn);
    const failed = state.failed || 0;
    setTitle(failed ? say("done_failed") : say("done"));
    show($("[data-finish]"), true);
    show($("[data-retry]"), failed > 0);
    const review = $("[data-review]");
    review.focus();
    if (!failed) setTimeout(function () { window.location.assign(review.href); }, 800);
  }

  function warn(event) {
    event.preventDefault();
    event.returnValue = say("leave");
    return event.returnValue;
  }

  $("[data-retry]").addEventListener("click", function () {
    const again = state.items.filter(function (i) { return i.status === "failed"; });
    state.failed = 0;
    $("[data-problems-list]").querySelectorAll("li").forEach(function (li) {
      if (li.querySelector(".u-why").textContent.indexOf(say("failed")) === 0) li.remove();
    });
    again.forEach(function (item) { item.attempts = 0; item.status = "new"; });
    show($("[data-finish]"), false);
    setTitle(say("uploading"));
    window.addEventListener("beforeunload", warn);
    announce(again, false).catch(handleRefused);
  });

  $("[data-start]").addEventListener("click", async function () {
    show($("[data-chosen]"), false);
    show($("[data-progress]"), true);
    const resume = document.querySelector("[data-resume]");
    if (resume) resume.hidden = true;
    state.started = Date.now();
    window.addEventListener("beforeunload", warn);
    render();
    try {
      await announce(state.items, true);
      state.announced = true;
      setTitle(say("uploading"));
      pump();
    } catch (error) {
      handleRefused(error);
    }
  });
})();
