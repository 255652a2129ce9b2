// The dashboard's only script: keeps the page's live region current, asks before destructive
// actions. Without it every page and action still works (plain links and forms).
(function () {
  "use strict";
  const live = document.getElementById("live");
  const freshness = document.getElementById("freshness");
  document.addEventListener("submit", function (event) {
    const question = event.target.dataset.confirm;
    if (question && !window.confirm(question)) event.preventDefault();
  });
  if (!live || !live.dataset.poll) return;
  let shown = null;  // the last fragment the server sent (the DOM's own HTML never equals it)
  let busy = false;
  let editing = false;
  // Typing in a form inside the live region stops the refresh: it would wipe the edit.
  live.addEventListener("input", function () {
    editing = true;
    if (freshness) freshness.textContent = "paused while you edit";
  });
  function say(text, trouble) {
    if (!freshness) return;
    freshness.textContent = text;
    freshness.classList.toggle("trouble", Boolean(trouble));
  }
  async function refresh() {
    if (busy || editing || document.hidden) return;
    // Never swap under the reader: a field being filled in, or a selection (copying a
    // traceback).
    const focused = document.activeElement;
    if (focused && live.contains(focused) && focused.matches("input, textarea, select")) return;
    const selection = window.getSelection();
    if (selection && !selection.isCollapsed && live.contains(selection.anchorNode)) return;
    busy = true;
    try {
      const response = await fetch(window.location.href, {
        headers: { "X-Offload-Fragment": "live" },
        credentials: "same-origin",
        cache: "no-store",
      });
      if (response.status === 401 || response.status === 403) {
        say("signed out: reload to sign in", true);
      } else if (!response.ok) {
        say("refresh failed (" + response.status + ")", true);
      } else {
        const html = await response.text();
        if (html !== shown) {
          // Keep what the reader opened (a traceback) open across the swap.
          const open = Array.from(live.querySelectorAll("details[open][id]"), (d) => d.id);
          live.innerHTML = html;
          for (const id of open) {
            const details = document.getElementById(id);
            if (details) details.open = true;
          }
        }
        shown = html;
        say("live · " + new Date().toLocaleTimeString(), false);
      }
    } catch (error) {
      say("offline: retrying", true);
    } finally {
      busy = false;
    }
  }
  window.setInterval(refresh, Number(live.dataset.poll));
})();
