// The console's live parts, driven by data attributes (no framework, nothing from the network but the console):
//   data-refresh="URL" data-every="S"  reload this element's HTML from URL every S seconds (not while it holds the
//                                      keyboard focus, nor while the page is hidden), and
//   data-on-live="KINDS"               at once when a live event of one of these kinds (query, health) arrives;
//   data-live-feed data-max="N"        a list that gets a line per live event change, newest first, at most N
//                                      (each line has data-event, data-state and data-kind);
//   data-live-status                   says whether the live stream (/live, server-sent events) is connected.
(function () {
  "use strict";

  function refresh(el) {
    if (document.hidden || el.contains(document.activeElement)) return;
    fetch(el.dataset.refresh, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(new Error(r.status)); })
      .then(function (html) { el.innerHTML = html; })
      .catch(function () { /* the next round tries again; the status line tells whether the console is reachable */ });
  }

  function span(cls, text) {
    var s = document.createElement("span");
    if (cls) s.className = cls;
    s.textContent = text;
    return s;
  }

  function feedLine(a) {
    var li = document.createElement("li");
    li.dataset.event = a.event;
    li.dataset.state = a.state;
    li.dataset.kind = a.kind;
    var when = document.createElement("time");
    var ms = Math.round(a.detected_ns / 1e6);
    when.dateTime = new Date(ms).toISOString();
    when.textContent = new Date(ms).toLocaleTimeString();
    var what = a.kind === "health"
      ? a.query_text + " (" + a.score.toFixed(1) + " s)"
      : a.query_text + " (" + a.modality + ", score " + a.score.toFixed(3) + ")";
    li.append(when, " ", span("state state-" + a.state, a.state), " ", span("", a.device), " · ", span("", what));
    if (a.event) {
      var link = document.createElement("a");
      link.href = "/events/" + encodeURIComponent(a.event);
      link.textContent = "event " + a.event;
      li.append(" · ", link);
    }
    return li;
  }

  var refreshing = Array.prototype.slice.call(document.querySelectorAll("[data-refresh]"));
  refreshing.forEach(function (el) {
    var every = parseFloat(el.dataset.every);
    if (every > 0) setInterval(function () { refresh(el); }, every * 1000);
  });

  var feeds = document.querySelectorAll("[data-live-feed]");
  var onLive = refreshing.filter(function (el) { return el.dataset.onLive; });
  if (!feeds.length && !onLive.length) return;
  var statuses = document.querySelectorAll("[data-live-status]");
  function status(text) { statuses.forEach(function (s) { s.textContent = "live: " + text; }); }

  var pending = null;
  var source = new EventSource("/live");
  source.onopen = function () { status("connected"); };
  source.onerror = function () { status("reconnecting…"); };
  source.addEventListener("alert", function (message) {
    var a = JSON.parse(message.data);
    feeds.forEach(function (feed) {
      feed.prepend(feedLine(a));
      var max = parseInt(feed.dataset.max, 10) || 50;
      while (feed.children.length > max) feed.lastElementChild.remove();
    });
    var due = onLive.filter(function (el) { return el.dataset.onLive.split(" ").indexOf(a.kind) >= 0; });
    if (!due.length || pending) return;
    pending = setTimeout(function () { pending = null; due.forEach(refresh); }, 300);  // a burst of changes: one reload
  });
})();
