// gyoza ui: live parts of the pages. No framework; the server renders every fragment.
"use strict";

(function () {
  const ACTION_HEADERS = { "X-Gyoza-UI": "1", "Content-Type": "application/x-www-form-urlencoded" };

  // -- the connection indicator ---------------------------------------------------
  const connection = document.getElementById("connection");
  function setLive(live, message) {
    if (!connection) return;
    connection.classList.toggle("live", live);
    connection.classList.toggle("down", !live);
    connection.querySelector(".text").textContent = live ? "live" : "reconnecting";
    connection.title = live ? "connected to the server" : (message || "server unreachable");
  }

  // -- messages -------------------------------------------------------------------
  const flash = document.getElementById("flash");
  let flashTimer = null;
  function say(text, bad) {
    if (!flash) return;
    flash.textContent = text;
    flash.classList.toggle("bad", !!bad);
    flash.hidden = false;
    clearTimeout(flashTimer);
    flashTimer = setTimeout(() => { flash.hidden = true; }, bad ? 10000 : 4000);
  }
  function describe(body) {
    let text = body.error || "failed";
    if (body.code) text = body.code.toLowerCase().replace(/_/g, " ") + ": " + text;
    if (body.reason) text += " [" + body.reason + "]";
    return text;
  }

  // -- polled fragments: <div data-refresh="URL" data-every="MS"> --------------------
  function poll(element) {
    const every = parseInt(element.dataset.every || "3000", 10);
    async function tick() {
      // Leave a fragment alone while someone works inside it.
      if (!element.contains(document.activeElement) || document.activeElement === document.body) {
        try {
          const response = await fetch(element.dataset.refresh, { cache: "no-store" });
          const text = await response.text();
          if (response.ok) {
            element.innerHTML = text;
            setLive(true);
          } else {
            setLive(false, text);
          }
        } catch (error) {
          setLive(false, String(error));
        }
      }
      setTimeout(tick, every);
    }
    setTimeout(tick, every);
  }
  document.querySelectorAll("[data-refresh]").forEach(poll);

  // An error page retries by reloading itself.
  const retry = document.querySelector("[data-retry-ms]");
  if (retry) {
    setLive(false);
    setTimeout(() => location.reload(), parseInt(retry.dataset.retryMs, 10));
  }

  // -- actions: <button data-action="URL"> and <form data-api="URL"> ----------------
  async function act(url, params) {
    let body;
    try {
      const response = await fetch(url, { method: "POST", headers: ACTION_HEADERS, body: params.toString() });
      body = await response.json();
    } catch (error) {
      body = { ok: false, error: "the dashboard did not answer (" + error + ")" };
    }
    return body;
  }

  document.addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    event.preventDefault();
    if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) return;
    button.disabled = true;
    const body = await act(button.dataset.action, new URLSearchParams());
    button.disabled = false;
    if (body.ok) {
      say(body.message);
      if (body.url && body.url !== location.pathname) location.assign(body.url);
      else if (body.url) location.reload();
      refreshNow();
    } else {
      say(describe(body), true);
    }
  });

  document.addEventListener("submit", async (event) => {
    const form = event.target.closest("form[data-api]");
    if (!form) return;
    event.preventDefault();
    form.querySelectorAll("[data-error-for]").forEach((e) => { e.hidden = true; e.textContent = ""; });
    form.querySelectorAll(".field.invalid").forEach((e) => e.classList.remove("invalid"));
    // Read attributes, not properties: an input named "dataset" or "action" shadows them.
    const submit = form.querySelector("[type=submit]");
    if (submit) submit.disabled = true;
    const body = await act(form.getAttribute("data-api"), new URLSearchParams(new FormData(form)));
    if (submit) submit.disabled = false;
    if (body.ok) {
      say(body.message);
      if (body.url) location.assign(body.url);
      return;
    }
    const violations = Object.entries(body.violations || {});
    let placed = 0;
    for (const [field, description] of violations) {
      const slot = form.querySelector('[data-error-for="' + CSS.escape(field) + '"]');
      if (!slot) continue;
      slot.textContent = description;
      slot.hidden = false;
      const holder = slot.closest(".field");
      if (holder) holder.classList.add("invalid");
      placed += 1;
    }
    const general = form.querySelector('[data-error-for="_"]');
    if (general && (violations.length === 0 || placed < violations.length)) {
      general.textContent = describe(body);
      general.hidden = false;
    }
    say(describe(body), true);
  });

  function refreshNow() {
    // After an action, polled fragments refresh at once rather than on their next tick.
    document.querySelectorAll("[data-refresh]").forEach(async (element) => {
      try {
        const response = await fetch(element.dataset.refresh, { cache: "no-store" });
        if (response.ok) element.innerHTML = await response.text();
      } catch (error) { /* the next tick tries again */ }
    });
  }

  // -- the run page's feed ----------------------------------------------------------
  const runPage = document.getElementById("run-page");
  if (runPage) {
    const log = document.getElementById("log");
    const follow = document.getElementById("log-follow");
    const limit = parseInt(log.dataset.limit || "2000", 10);
    const seen = new Set();

    function appendLines(lines) {
      const empty = document.getElementById("log-empty");
      if (empty) empty.remove();
      const fragment = document.createDocumentFragment();
      for (const line of lines) {
        const key = line.attempt + ":" + line.number;
        if (seen.has(key)) continue;
        seen.add(key);
        const row = document.createElement("span");
        row.className = "line" + (line.stream === "stderr" ? " stderr" : "");
        const number = document.createElement("span");
        number.className = "n";
        number.textContent = line.number;
        row.append(number, document.createTextNode(line.text + "\n"));
        fragment.append(row);
      }
      log.append(fragment);
      while (log.childElementCount > limit) log.firstElementChild.remove();
      if (follow.checked) log.scrollTop = log.scrollHeight;
    }

    const feed = new EventSource(runPage.dataset.live);
    feed.addEventListener("open", () => setLive(true));
    feed.addEventListener("error", () => setLive(false, "the dashboard's live feed is reconnecting"));
    // The actions bar stays put (so typing a priority is never interrupted); the live
    // head says which of its buttons apply now.
    function applyCaps() {
      const caps = runPage.querySelector('[data-role="run-caps"]');
      if (!caps) return;
      runPage.querySelector('[data-role="cancel"]').hidden = caps.dataset.canCancel !== "1";
      runPage.querySelector('[data-role="retry"]').hidden = caps.dataset.canRetry !== "1";
    }
    feed.addEventListener("run", (event) => {
      const fragments = JSON.parse(event.data);
      for (const [id, html] of Object.entries(fragments)) {
        const element = document.getElementById(id);
        if (element) element.innerHTML = html;
      }
      applyCaps();
      setLive(true);
    });
    feed.addEventListener("log", (event) => appendLines(JSON.parse(event.data)));
    feed.addEventListener("log-reset", (event) => {
      const data = JSON.parse(event.data);
      const marker = document.createElement("span");
      marker.className = "line marker";
      marker.textContent = "── attempt " + data.attempt + " ──\n";
      log.append(marker);
      document.getElementById("log-attempt").textContent = "attempt " + data.attempt;
    });
    feed.addEventListener("status", (event) => {
      const data = JSON.parse(event.data);
      setLive(data.live, data.message);
    });
  }
})();
