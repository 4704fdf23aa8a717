// tenement's dashboard: live state, the live log tail, and confirmations. The pages work
// without it; this only saves reloads. No dependencies, no build step.
"use strict";

(function () {
  // Every action asks first; on a tenant page it runs without leaving the page.
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      if (!window.confirm(form.dataset.confirm)) return;
      const button = form.querySelector("button");
      button.disabled = true;
      try {
        const response = await fetch(form.action, {
          method: "POST",
          headers: { Accept: "application/json" },
          body: new URLSearchParams(new FormData(form)),
          credentials: "same-origin",
        });
        if (!response.ok) {
          const body = await response.json().catch(() => null);
          const message = body && body.error ? body.error.message : response.statusText;
          window.alert(message);
        }
      } catch (e) {
        window.alert("The request failed: " + e);
      } finally {
        button.disabled = false;
        refresh();
      }
    });
  }

  // The tenant page: its facts every 2 s.
  const status = document.getElementById("status");
  const duration = (secs) => {
    if (secs === null || secs === undefined) return "-";
    if (secs < 60) return secs + "s";
    const units = secs < 3600 ? [60, "m", 1, "s"] : secs < 86400 ? [3600, "h", 60, "m"] : [86400, "d", 3600, "h"];
    const big = Math.floor(secs / units[0]);
    const small = Math.floor((secs % units[0]) / units[2]);
    return small ? `${big}${units[1]}${small}${units[3]}` : `${big}${units[1]}`;
  };
  const bytes = (n) => {
    if (n === null || n === undefined) return "-";
    if (n >= 1 << 30) return (n / (1 << 30)).toFixed(1) + " GiB";
    if (n >= 1 << 20) return (n / (1 << 20)).toFixed(1) + " MiB";
    return Math.floor(n / 1024) + " KiB";
  };
  const classOf = { running: "ok", starting: "busy", stopping: "busy", unhealthy: "bad", failed: "bad", stopped: "idle" };
  async function refresh() {
    if (!status) return;
    const id = status.dataset.instance;
    try {
      // Ids are DNS labels and a colon: nothing to escape.
      const response = await fetch("/ui/status/" + id, {
        headers: { Accept: "application/json" },
        credentials: "same-origin",
      });
      if (!response.ok) return;
      const info = await response.json();
      const set = (field, text) => {
        const el = status.querySelector(`[data-field="${field}"]`);
        if (el) el.textContent = text;
      };
      set("state", info.state);
      const state = document.getElementById("state");
      state.className = "state " + (classOf[info.state] || "");
      set("release", info.release ?? "-");
      set("address", info.address);
      set("uptime", duration(info.uptime_s));
      set("idle", duration(info.idle_s));
      set("restarts", info.restarts);
      set("health", info.health);
      set("memory", bytes(info.memory_bytes));
      set("cpu", info.cpu_seconds === undefined ? "-" : info.cpu_seconds.toFixed(2) + " s");
      set("pids", info.pids ?? "-");
    } catch (e) {
      // The next round tries again.
    }
  }
  if (status) window.setInterval(refresh, 2000);

  // The live log tail, filtered by the search box as it is typed.
  const log = document.getElementById("log");
  const search = document.getElementById("log-search");
  const live = document.getElementById("live");
  const matches = (div) => !search || !search.value || div.textContent.includes(search.value);
  if (search) {
    search.addEventListener("input", () => {
      for (const div of log.children) div.classList.toggle("hidden", !matches(div));
    });
  }
  if (log && log.dataset.stream && window.EventSource) {
    const stream = new EventSource(log.dataset.stream);
    const pad = (n) => String(n).padStart(2, "0");
    const when = (ms) => {
      const d = new Date(ms);
      return `${d.getUTCFullYear()}-${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())} ${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}:${pad(d.getUTCSeconds())} UTC`;
    };
    const kind = { stdout: "out", stderr: "err", event: "event" };
    stream.onopen = () => { if (live) live.textContent = "live"; };
    stream.onmessage = (event) => {
      const message = JSON.parse(event.data);
      for (const line of message.lines || []) {
        const div = document.createElement("div");
        div.className = "line " + (kind[line.stream] || "");
        const ts = document.createElement("span");
        ts.className = "ts";
        ts.textContent = when(line.ts_ms);
        div.append(ts, " " + line.line);
        if (!matches(div)) div.classList.add("hidden");
        log.append(div);
      }
      while (log.children.length > 1000) log.firstElementChild.remove();
      log.scrollTop = log.scrollHeight;
    };
    stream.addEventListener("error", (event) => {
      if (event.data) {
        stream.close();
        if (live) live.textContent = "stream ended: " + JSON.parse(event.data).error.message;
      } else if (live) {
        live.textContent = "reconnecting";
      }
    });
  }
})();
