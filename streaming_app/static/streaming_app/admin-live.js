/* Refresh the Streams changelist's counts every few seconds, without a reload. */
(function () {
  "use strict";
  // The admin loads this in <head>: start once the page (and its counts) exist.
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
  function start() {
  var box = document.getElementById("streaming-live");
  if (!box) return;
  function refresh() {
    if (document.hidden) return;  // no polling from a background tab
    var cells = document.querySelectorAll("[data-stream]");
    var ids = {}, query = [];
    cells.forEach(function (cell) { ids[cell.dataset.stream] = true; });
    Object.keys(ids).forEach(function (id) { query.push("id=" + encodeURIComponent(id)); });
    fetch(box.dataset.url + "?" + query.join("&"), { credentials: "same-origin" })
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (data) {
        if (!data) return;
        box.querySelector("[data-field=active]").textContent = data.active;
        cells.forEach(function (cell) {
          var row = data.streams[cell.dataset.stream];
          if (row && cell.dataset.field in row) cell.textContent = row[cell.dataset.field];
        });
      })
      .catch(function () {});
  }
  window.setInterval(refresh, 3000);
  }
})();
