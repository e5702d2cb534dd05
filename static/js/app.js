// Small enhancements for the clerical interface; every page works without them.
(function () {
  "use strict";

  document.addEventListener("click", function (event) {
    var copy = event.target.closest("[data-copy]");
    if (copy && navigator.clipboard) {
      var source = document.getElementById(copy.dataset.copy);
      navigator.clipboard.writeText(source.textContent.trim()).then(function () {
        var label = copy.textContent;
        copy.textContent = copy.dataset.copied;
        setTimeout(function () { copy.textContent = label; }, 2000);
      });
      return;
    }
    if (event.target.closest("[data-print]")) {
      window.print();
      return;
    }
    // A click outside an open menu closes it.
    document.querySelectorAll("details[data-menu][open]").forEach(function (menu) {
      if (!menu.contains(event.target)) menu.removeAttribute("open");
    });
  });

  // Escape closes an open menu and returns focus to its button.
  document.addEventListener("keydown", function (event) {
    if (event.key !== "Escape") return;
    document.querySelectorAll("details[data-menu][open]").forEach(function (menu) {
      menu.removeAttribute("open");
      menu.querySelector("summary").focus();
    });
  });

  // Buttons that need script stay hidden where it is not available.
  document.querySelectorAll("[data-needs-js]").forEach(function (el) { el.hidden = false; });
})();
