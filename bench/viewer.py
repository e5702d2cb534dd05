"""The browser viewer benchmark: a recipient presses View on a generated 500-slice CT
(512x512, 16 bits, ~263 MB) in headless Chromium, on 127.0.0.1; how long until the
first image is on the screen, how long until every slice is loaded, and how many bytes
crossed the network for it, beside the study's own size.

Ours: the whole product under gunicorn (gthread workers, PostgreSQL or SQLite, WhiteNoise
serving the OHIF app with its Brotli variants), from the click on View in the Share
Inbox: the redirect, the app page, OHIF's files, then our DICOMweb (QIDO-RS, WADO-RS
metadata, one frame request per slice).

The peer: the same OHIF build and the same page, configured the same way, served by
Orthanc (the Debian package) from its ServeFolders plugin and reading Orthanc's own
DICOMweb plugin (metadata "Full"), holding the same 500 files; timed from the page's
load. Both sides answer the same requests from the same browser, so the difference is
the servers. Each round uses a fresh browser profile (nothing cached); the two sides
take turns; medians are reported.

The time of the first image is when the viewport's canvas first holds an image (more
than a blank spread of grey); all slices are loaded when the viewer's image cache has
decoded every one of them (cornerstone's IMAGE_LOADED event for each slice). Bytes are
the bodies as sent (Content-Length), the app's files apart from DICOMweb's answers.

    .venv/bin/python bench/viewer.py [--rounds 3] [--slices 500] [--workers 4]
                                     [--threads 4] [--postgres URL] [--keep]

The last line printed is one JSON object: seconds to all slices loaded, ours and the
peer's, with ``ratio`` = peer / ours (higher is better for us)."""

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
BASE_DIR = BENCH_DIR.parent
if str(BASE_DIR) not in sys.path:
    sys.path.insert(0, str(BASE_DIR))

CHROMIUM = "/usr/bin/chromium"
PLUGINS = Path("/usr/share/orthanc/plugins")
PEER_NAME = "the same OHIF app on Orthanc 1.10 (DICOMweb + ServeFolders plugins)"
CT_SEED = 6500


def _bench_module(name: str):
    """Another benchmark's helpers (bench/zip.py: set-up, generation, share; bench/view.py:
    gunicorn with threads)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


common = _bench_module("zip")
MB = common.MB

# Runs in every page before its scripts: notes (in epoch milliseconds) when the viewport
# first shows an image and when the viewer has decoded the Nth distinct image.
PROBE_JS = """(() => {
  if (!/\\/viewer/.test(location.pathname)) return;
  const expected = %d;
  const probe = window.__probe = {first: null, all: null, loaded: 0};
  const seen = new Set();
  const now = () => performance.timeOrigin + performance.now();
  function hook() {
    const cs = window.cornerstone;
    if (probe.hooked || !cs || !cs.eventTarget || !cs.Enums) return;
    probe.hooked = true;
    cs.eventTarget.addEventListener(cs.Enums.Events.IMAGE_LOADED, (event) => {
      const image = event.detail && event.detail.image;
      if (!image || seen.has(image.imageId)) return;
      seen.add(image.imageId);
      probe.loaded = seen.size;
      if (seen.size >= expected && !probe.all) probe.all = now();
    });
  }
  function drawn() {
    const canvas = document.querySelector(
      'div.cornerstone-viewport-element canvas.cornerstone-canvas');
    if (!canvas || canvas.width < 64 || canvas.height < 64) return false;
    const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    let n = 0, sum = 0, squares = 0;
    for (let i = 0; i < data.length; i += 4 * 13) {
      n++; sum += data[i]; squares += data[i] * data[i];
    }
    const mean = sum / n;
    return Math.sqrt(Math.max(0, squares / n - mean * mean)) > 8;
  }
  function poll() {
    hook();
    if (!probe.first && drawn()) probe.first = now();
    if (!probe.all) setTimeout(poll, 10);
  }
  poll();
})();"""


@dataclass
class Round:
    first_s: float  # click (or page load) to the first image drawn
    all_s: float  # to every slice decoded
    app_bytes: int  # the page and the viewer's own files
    dicomweb_bytes: int  # QIDO, metadata and frames
    frames: int  # frame requests answered


# --- The peer: Orthanc serving the same app and its own DICOMweb -------------------------


@dataclass
class Peer:
    port: int
    process: subprocess.Popen
    page_url: str


def peer_page(folder: Path, port: int, study_uid: str) -> None:
    """The viewer's page as ours renders it, pointed at Orthanc's DICOMweb root and the
    app's files in Orthanc's /ohif folder; like ours, it moves the address bar to the
    app's route (/page/viewer?…) before the app starts."""
    from django.template.loader import render_to_string

    from viewer.ohif import ohif_app_config, ohif_installed

    folder.mkdir(parents=True)
    config = ohif_app_config(dicomweb_root=f"http://127.0.0.1:{port}/dicom-web",
                             router_basename="/page/")
    html = render_to_string("viewer/ohif.html", {
        "config": config, "ohif_url": "/ohif/", "installed": ohif_installed(),
        "page": {"publicUrl": "/ohif/", "exitUrl": "/page/viewer.html", "exitLabel": "Back",
                 "signInUrl": "/page/viewer.html",
                 "appUrl": f"/page/viewer?StudyInstanceUIDs={study_uid}"},
        "PRODUCT_NAME": "Orthanc"})
    html = html.replace("/static/viewer/", "/page/").replace("/static/img/", "/page/")
    (folder / "viewer.html").write_text(html)
    for source in (BASE_DIR / "static/viewer/ohif-boot.js", BASE_DIR / "static/viewer/ohif.css",
                   BASE_DIR / "static/img/mark.svg"):
        shutil.copy(source, folder / source.name)


def start_peer(work: Path, files: list[Path], study_uid: str) -> Peer:
    from django.conf import settings

    from dicomgw.demopacs import (
        ORTHANC_BINARY,
        DemoPacsConfig,
        orthanc_config,
        wait_for_orthanc,
    )

    for plugin in ("libOrthancDicomWeb.so", "libServeFolders.so"):
        if not (PLUGINS / plugin).exists():
            sys.exit(f"{PLUGINS / plugin} is missing: apt-get install orthanc-dicomweb")
    config = DemoPacsConfig(root=work / "orthanc", ae_title="BENCHPACS",
                            port=common.free_port(), http_port=common.free_port(),
                            scp_ae_title="UNUSED", scp_host="127.0.0.1",
                            scp_port=common.free_port())
    config.root.mkdir(parents=True)
    peer_page(work / "page", config.http_port, study_uid)
    values = orthanc_config(config)
    values.update({
        "Plugins": [str(PLUGINS / "libOrthancDicomWeb.so"), str(PLUGINS / "libServeFolders.so")],
        "ServeFolders": {"/ohif": str(settings.OHIF_DIR), "/page": str(work / "page")},
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False,
                     "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
    })
    config_path = config.root / "orthanc.json"
    config_path.write_text(json.dumps(values, indent=2))
    with open(config.root / "orthanc.log", "ab") as log:
        process = subprocess.Popen([str(ORTHANC_BINARY), str(config_path)], cwd=config.root,
                                   env={**os.environ, "TCP_NODELAY": "1"},
                                   stdout=log, stderr=subprocess.STDOUT)
    wait_for_orthanc(config, process, stop=threading.Event())
    common.orthanc_upload(config, files)
    return Peer(port=config.http_port, process=process,
                page_url=f"http://127.0.0.1:{config.http_port}/page/viewer.html")


# --- One round in the browser ------------------------------------------------------------


def response_bytes(response) -> int:
    """Bytes of a response body as sent (compressed when it was): its Content-Length,
    else what the browser counted."""
    length = response.headers.get("content-length")
    if length is not None:
        return int(length)
    try:
        return max(0, response.request.sizes()["responseBodySize"])
    except Exception:  # a request the viewer cancelled has no sizes
        return 0


def measure(browser, *, slices: int, start, timeout_s: float) -> Round:
    """Open a fresh profile, run ``start(page)`` (which returns the epoch milliseconds
    the timing starts from), wait for every slice, and read the probe and the responses."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.add_init_script(PROBE_JS % slices)
    page = context.new_page()
    responses = []
    page.on("response", lambda response: responses.append(response))
    try:
        started = start(page)
        page.wait_for_function("() => window.__probe && window.__probe.all && "
                               "window.__probe.first", timeout=timeout_s * 1000)
        probe = page.evaluate("() => window.__probe")
        app_bytes = dicomweb_bytes = frames = 0
        for response in responses:
            size = response_bytes(response)
            if "/dicomweb/" in response.url or "/dicom-web/" in response.url:
                dicomweb_bytes += size
                frames += "/frames/" in response.url and response.status == 200
            else:
                app_bytes += size
        return Round(first_s=(probe["first"] - started) / 1000,
                     all_s=(probe["all"] - started) / 1000, app_bytes=app_bytes,
                     dicomweb_bytes=dicomweb_bytes, frames=frames)
    finally:
        context.close()


def open_inbox_and_press_view(base: str, code: str, birth_date: str):
    def start(page) -> float:
        page.goto(f"{base}/view")
        page.get_by_label("Security code").fill(code)
        page.get_by_label("Patient's date of birth").fill(birth_date)
        page.get_by_role("button", name="Open the Share Inbox").click()
        page.wait_for_url("**/view/inbox")
        link = page.get_by_role("link", name="View").first
        link.wait_for()
        started = time.time() * 1000
        link.click()
        return started

    return start


def load_page(url: str):
    def start(page) -> float:
        started = time.time() * 1000
        page.goto(url, wait_until="commit")
        return started

    return start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slices", type=int, default=500)
    parser.add_argument("--workers", type=int, default=4, help="gunicorn workers")
    parser.add_argument("--threads", type=int, default=4, help="threads per gunicorn worker")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per round")
    parser.add_argument("--postgres", metavar="URL", default=os.environ.get("BENCH_POSTGRES"),
                        help="a PostgreSQL server to create a throwaway database on "
                             "(default: BENCH_POSTGRES, else SQLite)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    if not shutil.which(CHROMIUM):
        sys.exit("Chromium is required (apt-get install chromium)")

    def say(text: str) -> None:
        print(text, flush=True)

    work = Path(tempfile.mkdtemp(prefix="bench-viewer-"))
    database_url = database_name = None
    if args.postgres:
        database_url, database_name = common.create_postgres_database(args.postgres)
    server = peer = None
    ours: list[Round] = []
    theirs: list[Round] = []
    try:
        env = common.setup_django(work, database_url=database_url)
        from viewer.ohif import ohif_installed

        if ohif_installed() is None:
            sys.exit("the OHIF viewer is not installed: run `make ohif`")
        loaded = common.generate_and_ingest(work, slices=args.slices, say=say, seed=CT_SEED)
        shared = common.share_study(loaded.study_id)
        from dicomgw.models import Study

        study_uid = Study.objects.get(pk=loaded.study_id).study_instance_uid
        say("Starting Orthanc with the same study…")
        peer = start_peer(work, loaded.files, study_uid)
        common.warm(loaded.files)
        from django.db import connections

        connections.close_all()
        gunicorn = _bench_module("view").Gunicorn
        server = gunicorn(env, common.free_port(), args.workers, args.threads,
                          work / "gunicorn.log")
        base = f"http://127.0.0.1:{server.port}"

        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, headless=True,
                args=["--no-sandbox", "--disable-gpu", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update"])
            sides = {
                "ours": (ours, open_inbox_and_press_view(base, shared.code, shared.birth_date)),
                "peer": (theirs, load_page(peer.page_url)),
            }
            # One untimed round each, so that both start from the same warm servers.
            for _results, start in sides.values():
                measure(browser, slices=args.slices, start=start, timeout_s=args.timeout)
            for number in range(args.rounds):
                order = ["ours", "peer"] if number % 2 == 0 else ["peer", "ours"]
                for side in order:
                    results, start = sides[side]
                    results.append(measure(browser, slices=args.slices, start=start,
                                           timeout_s=args.timeout))
                    last = results[-1]
                    say(f"round {number + 1} {side}: first image {last.first_s:.2f} s, "
                        f"all {last.all_s:.2f} s")
            browser.close()
    finally:
        if server is not None:
            server.stop()
        if peer is not None:
            from dicomgw.demopacs import stop_process

            stop_process(peer.process)
        if database_name:
            common.drop_postgres_database(args.postgres, database_name)
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    def med(results: list[Round], attr: str) -> float:
        return common.median([getattr(r, attr) for r in results])

    say("")
    say(f"{args.slices}-slice CT, {loaded.bytes / MB:.0f} MB as stored; {args.rounds} "
        f"round(s), medians; gunicorn -w {args.workers} --threads {args.threads}; "
        f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}")
    say(f"{'':<9} {'first image s':>13} {'all slices s':>12} {'frames':>6} "
        f"{'DICOMweb MB':>11} {'/ study':>7} {'app MB':>7}")
    for name, results in (("ours", ours), ("Orthanc", theirs)):
        say(f"{name:<9} {med(results, 'first_s'):>13.2f} {med(results, 'all_s'):>12.2f} "
            f"{results[-1].frames:>6} "
            f"{med(results, 'dicomweb_bytes') / MB:>11.1f} "
            f"{med(results, 'dicomweb_bytes') / loaded.bytes:>7.3f} "
            f"{med(results, 'app_bytes') / MB:>7.1f}")
    say(f"peer: {PEER_NAME}")
    mine, peer_all = med(ours, "all_s"), med(theirs, "all_s")
    say(json.dumps({
        "bench": "viewer", "unit": "s", "ours": round(mine, 2), "peer": round(peer_all, 2),
        "peer_name": PEER_NAME, "ratio": round(peer_all / mine, 3) if mine else None,
        "first_image_s": round(med(ours, "first_s"), 2),
        "peer_first_image_s": round(med(theirs, "first_s"), 2),
        "bytes_over_study": round(med(ours, "dicomweb_bytes") / loaded.bytes, 3)}))


if __name__ == "__main__":
    main()
