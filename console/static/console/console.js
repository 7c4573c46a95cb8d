// Pegasus console: refresh server-rendered fragments and "select all". No third-party code.
// Fragments are rendered (and escaped) by Django; this only swaps them in.
"use strict";
(function () {
  function refresher(el) {
    const every = Math.max(1, parseInt(el.dataset.refreshSeconds || "5", 10)) * 1000;
    let busy = false;
    async function tick() {
      if (busy || document.hidden) return;
      busy = true;
      try {
        const response = await fetch(el.dataset.refreshUrl, {credentials: "same-origin", cache: "no-store"});
        if (response.ok && !response.redirected) {
          el.innerHTML = await response.text();
          el.dataset.refreshedAt = String(Date.now());
        }
      } catch (e) {
        // The server may be restarting: try again on the next tick.
      } finally {
        busy = false;
      }
    }
    setInterval(tick, every);
  }

  function selectAll() {
    const all = document.getElementById("select-all");
    if (!all) return;
    all.addEventListener("change", function () {
      document.querySelectorAll("input.select-row").forEach(function (box) { box.checked = all.checked; });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-refresh-url]").forEach(refresher);
    selectAll();
  });
})();
