// The signing pad: pointer events (finger, stylus, mouse) draw on a canvas; on submit the
// drawing goes into the form as a PNG data URL. Without script, or for a patient who
// cannot draw, the form's "typed name as signature" box signs instead.
(function () {
  "use strict";

  var form = document.getElementById("sign-form");
  if (!form) return;
  var wrap = form.querySelector("[data-pad-wrap]");
  var canvas = form.querySelector("[data-pad]");
  var clear = form.querySelector("[data-pad-clear]");
  var status = form.querySelector("[data-pad-status]");
  var field = form.querySelector("input[name='signature']");
  var adopt = form.querySelector("input[name='adopt_typed']");
  var ctx = canvas.getContext("2d");
  var drawing = false;
  var inked = false;
  var last = null;

  wrap.hidden = false;

  function size() {
    // Draw at the screen's pixel density. A resize (a rotated tablet, a scroll bar that
    // comes or goes) keeps what was drawn, scaled to the new box.
    var ratio = window.devicePixelRatio || 1;
    var rect = canvas.getBoundingClientRect();
    var kept = null;
    if (inked && canvas.width && canvas.height) {
      kept = document.createElement("canvas");
      kept.width = canvas.width;
      kept.height = canvas.height;
      kept.getContext("2d").drawImage(canvas, 0, 0);
    }
    canvas.width = Math.round(rect.width * ratio);
    canvas.height = Math.round(rect.height * ratio);
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    if (kept) ctx.drawImage(kept, 0, 0, canvas.width, canvas.height);
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.strokeStyle = "#0b1620";
    ctx.lineWidth = 2.5;
  }

  function point(event) {
    var rect = canvas.getBoundingClientRect();
    return { x: event.clientX - rect.left, y: event.clientY - rect.top };
  }

  function say(text) { if (status) status.textContent = text; }

  canvas.addEventListener("pointerdown", function (event) {
    if (adopt && adopt.checked) return;
    event.preventDefault();
    canvas.setPointerCapture(event.pointerId);
    drawing = true;
    last = point(event);
    ctx.beginPath();
    ctx.arc(last.x, last.y, ctx.lineWidth / 2, 0, Math.PI * 2);
    ctx.fillStyle = ctx.strokeStyle;
    ctx.fill();
  });

  canvas.addEventListener("pointermove", function (event) {
    if (!drawing) return;
    event.preventDefault();
    var events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
    events.forEach(function (e) {
      var p = point(e);
      ctx.beginPath();
      ctx.moveTo(last.x, last.y);
      ctx.lineTo(p.x, p.y);
      ctx.stroke();
      last = p;
    });
    inked = true;
  });

  function stop(event) {
    if (!drawing) return;
    drawing = false;
    if (canvas.hasPointerCapture(event.pointerId)) canvas.releasePointerCapture(event.pointerId);
    if (inked) say(canvas.dataset.signedText || "");
  }
  canvas.addEventListener("pointerup", stop);
  canvas.addEventListener("pointercancel", stop);

  if (clear) {
    clear.addEventListener("click", function () {
      ctx.clearRect(0, 0, canvas.width, canvas.height);
      inked = false;
      field.value = "";
      say("");
    });
  }

  if (adopt) {
    adopt.addEventListener("change", function () {
      wrap.classList.toggle("disabled", adopt.checked);
      canvas.setAttribute("aria-disabled", adopt.checked ? "true" : "false");
    });
  }

  form.addEventListener("submit", function () {
    field.value = inked && !(adopt && adopt.checked) ? canvas.toDataURL("image/png") : "";
  });

  size();
  var width = canvas.getBoundingClientRect().width;
  window.addEventListener("resize", function () {
    // Only a change of width matters, not a keyboard opening.
    var now = canvas.getBoundingClientRect().width;
    if (Math.abs(now - width) > 1) { width = now; size(); }
  });
})();
