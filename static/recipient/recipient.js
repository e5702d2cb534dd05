// The recipient's pages work without this; it adds the calendar for the date of birth and
// the exam selection helpers of the Share Inbox.
(function () {
  "use strict";

  // The calendar button opens the browser's own date picker and writes YYYY/MM/DD back.
  document.querySelectorAll("[data-date-picker]").forEach(function (button) {
    var text = document.getElementById(button.dataset.datePicker);
    var native = document.querySelector('[data-date-for="' + button.dataset.datePicker + '"]');
    if (!text || !native) return;
    native.max = new Date().toISOString().slice(0, 10);
    button.addEventListener("click", function () {
      var typed = /^(\d{4})\D?(\d{2})\D?(\d{2})$/.exec(text.value.trim());
      native.value = typed ? typed[1] + "-" + typed[2] + "-" + typed[3] : "1970-01-01";
      try {
        native.showPicker();
      } catch (e) {
        text.focus();
      }
    });
    native.addEventListener("change", function () {
      if (native.value) {
        text.value = native.value.replace(/-/g, "/");
        text.dispatchEvent(new Event("input", { bubbles: true }));
      }
    });
  });

  // Exam selection: select all, how many are ticked, download buttons only with a choice.
  var form = document.querySelector("[data-download-form]");
  if (!form) return;
  var boxes = Array.prototype.slice.call(form.querySelectorAll('input[name="exam"]:not(:disabled)'));
  var all = form.querySelector("[data-select-all]");
  var summary = form.querySelector("[data-selected-summary]");
  var buttons = form.querySelectorAll("[data-needs-selection]");

  function update() {
    var ticked = boxes.filter(function (b) { return b.checked; }).length;
    if (all) {
      all.checked = ticked > 0 && ticked === boxes.length;
      all.indeterminate = ticked > 0 && ticked < boxes.length;
      all.disabled = boxes.length === 0;
    }
    if (summary) {
      summary.textContent = ticked === 0 ? summary.dataset.none
        : ticked === 1 ? summary.dataset.one
          : summary.dataset.many.replace("%(count)s", ticked);
    }
    buttons.forEach(function (b) { b.disabled = ticked === 0; });
  }

  boxes.forEach(function (b) { b.addEventListener("change", update); });
  if (all) {
    all.addEventListener("change", function () {
      boxes.forEach(function (b) { b.checked = all.checked; });
      update();
    });
  }
  update();
})();
