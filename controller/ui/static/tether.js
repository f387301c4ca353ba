// Tether's dashboard: live pages over the fleet event stream (docs/ui.md).
// The page's <main> is re-fetched (as a fragment, rendered by the server) when the
// stream says something changed; a lost connection is shown and recovers by itself.
"use strict";
(function () {
  var main = document.getElementById("main");
  var badge = document.getElementById("live");
  if (!main || !badge) return;
  var live = main.getAttribute("data-live") !== "off";
  var pending = null;
  var fetching = false;
  var again = false;

  function show(state, text) {
    badge.setAttribute("data-state", state);
    badge.textContent = text;
  }

  function busy() {
    // Never replace what the user is typing into or has selected.
    var el = document.activeElement;
    if (el && main.contains(el) && /^(INPUT|SELECT|TEXTAREA)$/.test(el.tagName)) return true;
    return main.querySelector("input[type=checkbox]:checked") !== null;
  }

  function refresh() {
    pending = null;
    if (!live) return;
    if (fetching || busy()) { again = true; if (!fetching) later(1000); return; }
    fetching = true;
    fetch(window.location.href, { headers: { "X-Tether-Fragment": "1" }, credentials: "same-origin" })
      .then(function (r) {
        if (r.redirected || r.status === 401) { window.location.reload(); return null; }
        return r.ok ? r.text() : null;
      })
      .then(function (html) {
        if (html !== null && html !== undefined && !busy()) {
          // Keep the keyboard where it was: the link or button focused before, if it is still there.
          var focused = document.activeElement;
          var href = focused && main.contains(focused) ? focused.getAttribute("href") : null;
          var label = focused && main.contains(focused) ? focused.getAttribute("aria-label") : null;
          main.innerHTML = html;
          main.setAttribute("data-refreshed", String(Date.now()));
          var back = null;
          if (href) back = main.querySelector('[href="' + CSS.escape(href) + '"]');
          else if (label) back = main.querySelector('[aria-label="' + CSS.escape(label) + '"]');
          if (back) back.focus();
        }
      })
      .catch(function () { /* the stream's own error shows the lost connection */ })
      .then(function () {
        fetching = false;
        if (again) { again = false; later(250); }
      });
  }

  function later(ms) {
    if (pending === null) pending = window.setTimeout(refresh, ms);
  }

  // The HTTP API's fleet event stream (the session cookie opens it): each event is named by
  // its kind, so the page listens to every kind the server listed.
  var STREAM = badge.getAttribute("data-stream");
  var KINDS = (badge.getAttribute("data-kinds") || "").split(" ").filter(Boolean);
  var LOST = badge.getAttribute("data-lost");
  if (!window.EventSource) { show("off", "live updates unavailable"); return; }
  var source = null;
  var retry = 1000;
  // True until the stream first opens: what changed between rendering the page and
  // subscribing is fetched then, as after a lost connection.
  var lost = true;

  function connect() {
    source = new EventSource(STREAM);
    source.onopen = function () {
      retry = 1000;
      show("on", "live");
      if (lost) { lost = false; later(0); } // what happened while away
    };
    source.onmessage = function () { later(300); };
    KINDS.forEach(function (kind) { source.addEventListener(kind, function () { later(300); }); });
    if (LOST) source.addEventListener(LOST, function () { later(0); });
    source.onerror = function () {
      lost = true;
      show("lost", "connection lost, reconnecting…");
      if (source.readyState === EventSource.CLOSED) {
        // The browser gave up (an HTTP error): try again ourselves, backing off.
        window.setTimeout(connect, retry);
        retry = Math.min(retry * 2, 30000);
      }
    };
  }
  connect();
})();

// "Select all" in a form with checkboxes (the waiting room's bulk approve).
document.addEventListener("click", function (e) {
  var button = e.target.closest ? e.target.closest("[data-select-all]") : null;
  if (!button || !button.form) return;
  var boxes = button.form.querySelectorAll("input[type=checkbox][name=" + button.getAttribute("data-select-all") + "]");
  var all = Array.prototype.every.call(boxes, function (b) { return b.checked; });
  Array.prototype.forEach.call(boxes, function (b) { b.checked = !all; });
});

// Following a service's logs (the device page): the device's log stream as server-sent events.
(function () {
  var panel = document.getElementById("follow");
  if (!panel) return;
  var output = document.getElementById("follow-output");
  var start = document.getElementById("follow-start");
  var stop = document.getElementById("follow-stop");
  var source = null;
  var LIMIT = 200000;

  function write(text) {
    output.appendChild(document.createTextNode(text));
    while (output.textContent.length > LIMIT && output.firstChild) output.removeChild(output.firstChild);
    output.scrollTop = output.scrollHeight;
  }

  function end(reason) {
    if (source) { source.close(); source = null; }
    start.disabled = false;
    stop.disabled = true;
    if (reason) write("\n— " + reason + "\n");
  }

  start.addEventListener("click", function () {
    end(null);
    output.textContent = "";
    var url = "/ui/devices/" + encodeURIComponent(panel.getAttribute("data-device")) + "/logs?stack=" +
      encodeURIComponent(document.getElementById("follow-stack").value) + "&service=" +
      encodeURIComponent(document.getElementById("follow-service").value);
    source = new EventSource(url);
    start.disabled = true;
    stop.disabled = false;
    source.onmessage = function (e) {
      var m = JSON.parse(e.data);
      if (m.text) write(m.text);
    };
    source.addEventListener("end", function (e) { end("stream ended: " + JSON.parse(e.data).end); });
    source.onerror = function () { end("connection lost"); };
  });
  stop.addEventListener("click", function () { end("stopped"); });
})();
