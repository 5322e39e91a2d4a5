// Weft web view: sortable tables and a periodic refresh of <main>.
// Plain JavaScript, no build step; every page works without it.
(function () {
  "use strict";
  var sorted = {}; // table id -> [column index, "asc" | "desc"]

  function key(cell, numeric) {
    var v = cell ? (cell.getAttribute("data-v") || cell.textContent) : "";
    if (numeric) { var n = parseFloat(v); return isNaN(n) ? -Infinity : n; }
    return v.toLowerCase();
  }

  function sort(table, col, dir) {
    var th = table.tHead.rows[0].cells[col];
    var numeric = th.getAttribute("data-sort") === "num";
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a.cells[col], numeric), y = key(b.cells[col], numeric);
      var c = x < y ? -1 : x > y ? 1 : 0;
      return dir === "asc" ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (c) { c.removeAttribute("data-dir"); });
    th.setAttribute("data-dir", dir);
    if (table.id) { sorted[table.id] = [col, dir]; }
  }

  function resort() {
    Object.keys(sorted).forEach(function (id) {
      var t = document.getElementById(id);
      if (t && t.tHead) { sort(t, sorted[id][0], sorted[id][1]); }
    });
  }

  document.addEventListener("click", function (e) {
    var th = e.target.closest && e.target.closest("th[data-sort]");
    if (!th) { return; }
    var table = th.closest("table");
    var dir = th.getAttribute("data-dir") === "desc" ? "asc" : "desc";
    sort(table, th.cellIndex, dir);
  });

  var refreshed = 0;
  var every = parseInt(document.body.getAttribute("data-refresh"), 10);
  if (!(every > 0) || !window.fetch || !window.DOMParser) { return; }
  setInterval(function () {
    if (document.hidden) { return; }
    var open = Array.prototype.map.call(document.querySelectorAll("details[open] summary"), function (s) { return s.textContent; });
    fetch(location.href, { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (text) {
        var fresh = new DOMParser().parseFromString(text, "text/html").querySelector("main");
        var main = document.querySelector("main");
        if (!fresh || !main) { return; }
        main.replaceWith(fresh);
        resort();
        document.body.setAttribute("data-refreshed", String(++refreshed));
        document.querySelectorAll("details summary").forEach(function (s) {
          if (open.indexOf(s.textContent) >= 0) { s.parentNode.open = true; }
        });
      })
      .catch(function () { /* keep the last page; the next tick tries again */ });
  }, every * 1000);
})();
