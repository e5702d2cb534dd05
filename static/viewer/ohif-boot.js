/* Starts OHIF with the configuration the page carries (viewer/ohif.py), before the app's
   bundle runs: where the app's files are (window.PUBLIC_URL), which DICOMweb root it
   reads, and the way back to our pages. */
(function () {
  "use strict";
  var page = JSON.parse(document.getElementById("viewer-page").textContent);
  var config = JSON.parse(document.getElementById("viewer-config").textContent);

  // The page is served at an address of ours (the exam's id); the app's router reads
  // its own route from the address bar, so put it there without a request.
  if (page.appUrl && location.pathname + location.search !== page.appUrl) {
    history.replaceState(history.state, "", page.appUrl);
  }
  window.PUBLIC_URL = page.publicUrl;
  // The shipped page defines this for modules the app imports by URL.
  window.browserImportFunction = function (url) { return import(url); };

  // Top left of the viewer: the way back to the Share Inbox (or the clerk's study).
  config.whiteLabeling = {
    createLogoComponentFn: function (React) {
      return React.createElement("a", {
        href: page.exitUrl,
        className: "viewer-exit",
        onClick: function (event) { event.stopPropagation(); }
      }, React.createElement("span", { "aria-hidden": "true" }, "\u2190 "), page.exitLabel);
    }
  };
  // A session that ended (idle, signed out elsewhere, share withdrawn) answers 401/403:
  // go where the visitor can sign in again, which says why.
  var leaving = false;
  config.httpErrorHandler = function (error) {
    var status = error && error.status;
    if ((status === 401 || status === 403) && !leaving) {
      leaving = true;
      window.location.assign(page.signInUrl);
    }
  };
  window.config = config;
})();
