(function () {
  "use strict";
  var cards = Array.prototype.slice.call(document.querySelectorAll("#gallery .card"));
  var paths = cards.map(function (c) { return (c.getAttribute("data-path") || "").toLowerCase(); });
  var labels = cards.map(function (c) { return c.getAttribute("data-label") || ""; });
  var select = document.getElementById("filter-label");
  var search = document.getElementById("search");
  var counter = document.getElementById("visible-count");
  var timer = null;
  function apply() {
    timer = null;
    var want = select.value, q = search.value.toLowerCase(), n = 0;
    for (var i = 0; i < cards.length; i++) {
      var show = (want === "all" || labels[i] === want) && (q === "" || paths[i].indexOf(q) !== -1);
      if (show) { n++; }
      if (cards[i].hidden === show) { cards[i].hidden = !show; }
    }
    counter.textContent = String(n);
    var state = new URLSearchParams();
    if (want !== "all") { state.set("label", want); }
    if (q !== "") { state.set("q", search.value); }
    var hash = state.toString();
    if (hash !== location.hash.replace(/^#/, "")) {
      try { history.replaceState(null, "", hash ? "#" + hash : location.pathname + location.search); }
      catch (e) { /* some browsers refuse on file:// */ }
    }
  }
  function schedule() {
    if (timer !== null) { clearTimeout(timer); }
    timer = setTimeout(apply, cards.length > 2000 ? 120 : 0);
  }
  function readHash() {
    var state = new URLSearchParams(location.hash.replace(/^#/, ""));
    var label = state.get("label");
    var ok = false;
    for (var i = 0; i < select.options.length; i++) { if (select.options[i].value === label) { ok = true; } }
    select.value = ok ? label : "all";
    search.value = state.get("q") || "";
  }
  select.addEventListener("change", apply);
  search.addEventListener("input", schedule);
  window.addEventListener("hashchange", function () { readHash(); apply(); });
  readHash();
  apply();
  document.documentElement.setAttribute("data-ready", "1");
})();
