"""The browser viewer: OHIF's prebuilt web app (the npm package ``@ohif/app``, MIT).

``ohif_install`` fetches the pinned version from the npm registry once (``make ohif``),
checks the tarball against the SHA-512 recorded here, and unpacks its ``dist/`` folder
into OHIF_DIR with what the viewer never loads left out. The files are then served with
the static files under ``/static/ohif/``; the page that starts the app is ours
(``templates/viewer/ohif.html``), and so is its configuration (``ohif_app_config``): one
DICOMweb root of ours, nothing else.

The package is built for the root of a web site: its webpack public path is the literal
``"/"``, and its stylesheet names its font as ``url(/…)``. Both are rewritten at install
time so that the app loads its chunks, workers, codecs and font from wherever it is
served: the page says where in ``window.PUBLIC_URL`` and a worker finds its own folder
in ``self.location``. The package also registers, at start-up, modes we do not offer
(segmentation, PET, microscopy, 4D, ultrasound); their registration is taken out
(``UNREGISTERED``), and with it every chunk only they load (``LEFT_OUT_CHUNKS``).
Each rewrite must find what it rewrites, or the install fails."""

import base64
import hashlib
import json
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.utils.translation import gettext as _

from .scopes import ViewerError

PACKAGE = "@ohif/app"
VERSION = "3.13.2"
# The registry's dist.integrity of the version above (npm checks it too).
INTEGRITY = ("sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfp"
             "q+jd5xXZB9E8EA==")
STAMP = "ohif-install.json"
ENTRY_PATTERN = re.compile(r"^app\.bundle\.[0-9a-f]+\.js$")
STYLESHEET = "app.bundle.css"

# What the package ships that the viewer never loads, and why.
LEFT_OUT_DIRS = {
    "ort": "ONNX runtime of the AI segmentation tools",
    "dicom-microscopy-viewer": "whole-slide microscopy mode",
    "customizations": "files for ?customization= URLs, which our configuration refuses",
}
LEFT_OUT_FILES = {
    "index.html": "the page is ours (templates/viewer/ohif.html)",
    "app-config.js": "points at a public demo server; ours is made per visitor",
    "init-service-worker.js": "loads Workbox from a CDN",
    "sw.js": "offline cache of the whole app; we send no-store pages",
    "google.js": "Google Cloud Healthcare data source configuration",
    "oidc-client.min.js": "OpenID Connect sign-in; our sessions are our own",
    "silent-refresh.html": "OpenID Connect token refresh",
    "es6-shim.min.js": "not loaded by the app",
    "polyfill.min.js": "not loaded by the app",
    "manifest.json": "installable-app manifest",
    "_headers": "Netlify hosting file",
    "_redirects": "Netlify hosting file",
    "serve.json": "`serve` hosting file",
}
LEFT_OUT_SUFFIXES = {".map": "source maps"}
# Of assets/, the app loads the preset pictures in images/ only; the rest are icons and
# splash screens for the shipped index.html and manifest.
KEPT_ASSETS = "images"

# The modes (and an extension) the package registers at start-up that we do not offer.
# Left out of the registration, the app never loads them; their chunks go too. What
# stays is the longitudinal mode (route "viewer", the one we open) and the basic mode it
# is built on, with every extension they name (measurements, SR, SEG, RT, parametric
# maps, PDF, video), so that any study a share holds still displays.
UNREGISTERED = [
    'pluginImports_extensions.push("@ohif/extension-ultrasound-pleura-bline");',
    'pluginImports_modes.push("@ohif/mode-segmentation");',
    'pluginImports_modes.push("@ohif/mode-tmtv");',
    'pluginImports_modes.push("@ohif/mode-microscopy");',
    'pluginImports_modes.push("@ohif/mode-preclinical-4d");',
    'pluginImports_modes.push("@ohif/mode-ultrasound-pleura-bline");',
]
# Chunks that only the modes and extensions above (and the package's test modes, which
# it never registers) import: nothing else names their chunk ids. The browser tests fail
# on any request of the viewer that is not answered.
LEFT_OUT_CHUNKS = {
    "1483.bundle.256a358f0af21ca9.js": "segmentation mode",
    "7499.bundle.796480e788eda09a.js": "TMTV (PET/CT) extension",
    "8492.bundle.f30e427e47ad3932.js": "TMTV mode",
    "8492.css": "TMTV mode",
    "976.css": "TMTV extension",
    "9290.bundle.90bacace23d695b0.js": "microscopy mode",
    "8832.bundle.0ed1d5d13e869435.js": "microscopy extension",
    "8832.css": "microscopy extension",
    "5189.bundle.ae2e6c3b91f526f7.js": "microscopy extension",
    "5189.css": "microscopy extension",
    "5731.bundle.694bce33e168bf29.js": "mathjs, for the microscopy extension only",
    "4683.bundle.d4913bffd8e587b7.js": "preclinical 4D mode",
    "1602.bundle.94f12cceab7c2762.js": "dynamic volume extension (4D)",
    "1602.css": "dynamic volume extension (4D)",
    "1180.bundle.762993518ea30ae3.js": "ultrasound pleura B-line mode",
    "2779.bundle.4621e305af9e2c6a.js": "ultrasound pleura B-line extension",
    "8423.bundle.caf5a891d5d9dd35.js": "test extension",
    "8423.css": "test extension",
    "9437.bundle.848ed795e51e521c.js": "test mode",
    "4556.bundle.913804aeca4e49cc.js": "basic development mode",
}

PUBLIC_PATH_BUILT = '__webpack_require__.p = "/";'
PUBLIC_PATH_AT_RUN_TIME = (
    '__webpack_require__.p = (typeof window === "object" && window.PUBLIC_URL) || '
    'self.location.href.replace(/[?#].*$/, "").replace(/[^/]*$/, "");'
)
ROOT_URL_IN_CSS = re.compile(r"url\((['\"]?)/(?!/)")


class ViewerInstallError(ViewerError):
    """The viewer's package could not be fetched, checked or unpacked."""

    def __init__(self, message: str):
        super().__init__(message, status=503)


@dataclass(frozen=True)
class Installed:
    """What ``ohif_install`` put in OHIF_DIR, as recorded in its stamp."""

    version: str
    entry: str
    stylesheet: str
    files: int
    bytes: int


def _sri(data_path: Path) -> str:
    digest = hashlib.sha512()
    with open(data_path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return "sha512-" + base64.b64encode(digest.digest()).decode()


def _npm_pack(work: Path, npm: str) -> Path:
    """The pinned tarball from the registry, as ``npm pack`` fetches and checks it."""
    try:
        done = subprocess.run(
            [npm, "pack", f"{PACKAGE}@{VERSION}", "--json", "--ignore-scripts",
             "--pack-destination", str(work)],
            check=True, capture_output=True, text=True, timeout=1800, cwd=work)
    except FileNotFoundError as exc:
        raise ViewerInstallError(f"npm is not installed ({npm}): install Node.js") from exc
    except subprocess.CalledProcessError as exc:
        raise ViewerInstallError(f"npm pack {PACKAGE}@{VERSION} failed:\n{exc.stderr}") from exc
    [packed] = json.loads(done.stdout)
    tarball = work / packed["filename"]
    found = _sri(tarball)
    if packed.get("integrity") != INTEGRITY or found != INTEGRITY:
        raise ViewerInstallError(
            f"{tarball.name}: SHA-512 {found} is not the pinned {INTEGRITY}")
    return tarball


def _unpack(tarball: Path, staging: Path) -> None:
    """``package/dist/*`` of the tarball into ``staging``, nothing outside it."""
    with tarfile.open(tarball, "r:gz") as archive:
        members = []
        for member in archive.getmembers():
            if not member.name.startswith("package/dist/") or not member.isfile():
                continue
            member.name = member.name[len("package/dist/"):]
            members.append(member)
        archive.extractall(staging, members=members, filter="data")


def _leave_out(staging: Path) -> list[str]:
    removed = []
    for name in LEFT_OUT_DIRS:
        if (staging / name).is_dir():
            shutil.rmtree(staging / name)
            removed.append(name + "/")
    for name in [*LEFT_OUT_FILES, *LEFT_OUT_CHUNKS]:
        path = staging / name
        if path.exists():
            path.unlink()
            removed.append(name)
        elif name in LEFT_OUT_CHUNKS:
            raise ViewerInstallError(f"{name} is not in {PACKAGE}@{VERSION}")
    for path in sorted(staging.rglob("*")):
        if path.is_file() and path.suffix in LEFT_OUT_SUFFIXES:
            path.unlink()
            removed.append(str(path.relative_to(staging)))
    for path in sorted((staging / "assets").iterdir()):
        if path.name == KEPT_ASSETS:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(f"assets/{path.name}")
    return removed


def _unregister(staging: Path) -> None:
    entry = staging / _entry(staging)
    text = entry.read_text(encoding="utf-8")
    for line in UNREGISTERED:
        if text.count(line) != 1:
            raise ViewerInstallError(f"{entry.name}: {line} not found once")
        text = text.replace(line, "")
    entry.write_text(text, encoding="utf-8")


def _serve_from_anywhere(staging: Path) -> None:
    """Rewrite the root-relative public path of every bundle and stylesheet."""
    patched = 0
    for path in sorted(staging.glob("*.js")):
        text = path.read_text(encoding="utf-8")
        if PUBLIC_PATH_BUILT in text:
            path.write_text(text.replace(PUBLIC_PATH_BUILT, PUBLIC_PATH_AT_RUN_TIME),
                            encoding="utf-8")
            patched += 1
    for path in sorted(staging.glob("*.css")):
        text = path.read_text(encoding="utf-8")
        path.write_text(ROOT_URL_IN_CSS.sub(r"url(\1", text), encoding="utf-8")
    entry = _entry(staging)
    if patched == 0 or PUBLIC_PATH_AT_RUN_TIME not in (staging / entry).read_text("utf-8"):
        raise ViewerInstallError(f"{entry}: the webpack public path was not found")


def _entry(folder: Path) -> str:
    found = [p.name for p in folder.glob("app.bundle.*.js") if ENTRY_PATTERN.match(p.name)]
    if len(found) != 1:
        raise ViewerInstallError(f"expected one app.bundle.<hash>.js in {folder}, found {found}")
    return found[0]


def _precompress(staging: Path) -> None:
    """gzip and Brotli variants beside each text and WebAssembly file, which WhiteNoise
    sends to browsers that accept them."""
    from whitenoise import compress

    class Compressor(compress.Compressor):
        @staticmethod
        def compress_brotli(data: bytes) -> bytes:
            # Quality 6 is within 4% of the maximum for these bundles, in a fortieth of
            # the time.
            return compress.brotli.compress(data, quality=6)

    compressor = Compressor(quiet=True)
    for path in sorted(staging.rglob("*")):
        if path.is_file() and compressor.should_compress(path.name):
            for _written in compressor.compress(str(path)):
                pass


def ohif_install(*, target: Path | None = None, npm: str = "npm",
                 compress: bool = True) -> Installed:
    """Fetch, check, unpack and trim the pinned viewer into ``target`` (OHIF_DIR),
    replacing what was there only once the new copy is complete."""
    target = Path(target or settings.OHIF_DIR)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".ohif-") as work_dir:
        work = Path(work_dir)
        tarball = _npm_pack(work, npm)
        staging = work / "dist"
        _unpack(tarball, staging)
        removed = _leave_out(staging)
        _unregister(staging)
        _serve_from_anywhere(staging)
        if compress:
            _precompress(staging)
        files = [p for p in staging.rglob("*") if p.is_file()]
        installed = Installed(
            version=VERSION, entry=_entry(staging), stylesheet=STYLESHEET,
            files=sum(1 for p in files if p.suffix not in (".gz", ".br")),
            bytes=sum(p.stat().st_size for p in files if p.suffix not in (".gz", ".br")))
        (staging / STAMP).write_text(json.dumps(
            {**installed.__dict__, "integrity": INTEGRITY, "left_out": removed}, indent=1))
        old = work / "old"
        if target.exists():
            target.rename(old)
        staging.rename(target)
    return installed


def ohif_installed(folder: Path | None = None) -> Installed | None:
    """The installed viewer, or None when ``make ohif`` has not run (or another version
    is pinned than the one installed)."""
    try:
        data = json.loads((Path(folder or settings.OHIF_DIR) / STAMP).read_text())
    except (OSError, ValueError):
        return None
    if data.get("version") != VERSION or data.get("integrity") != INTEGRITY:
        return None
    return Installed(**{k: data[k] for k in Installed.__dataclass_fields__})


# --- The app's configuration --------------------------------------------------------------


def ohif_app_config(*, dicomweb_root: str, router_basename: str) -> dict:
    """``window.config`` for one visitor (the page adds the functions it holds): the
    basic viewer reading ``dicomweb_root`` and nothing else, without the study list,
    uploads or deletions."""
    return {
        "routerBasename": router_basename.rstrip("/"),
        "extensions": [],
        "modes": [],
        # No first-visit tour of the viewer over the images.
        "customizationService": {"global": {"ohif.tours": {"$set": []}}},
        "showStudyList": False,
        "investigationalUseDialog": {"option": "never"},
        # Measurements go to the measurement panel without asking first.
        "measurementTrackingMode": "simplified",
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "showErrorDetails": "never",
        "strictZSpacingForVolumeViewport": True,
        "allowMultiSelectExport": False,
        "maxNumberOfWebWorkers": 3,
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 25},
        "defaultDataSourceName": "archive",
        "dataSources": [{
            "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
            "sourceName": "archive",
            "configuration": {
                "friendlyName": _("Archive"),
                "name": "archive",
                "qidoRoot": dicomweb_root,
                "wadoRoot": dicomweb_root,
                "wadoUriRoot": dicomweb_root,
                "qidoSupportsIncludeField": True,
                "supportsReject": False,
                "supportsStow": False,
                "supportsFuzzyMatching": False,
                "supportsWildcard": True,
                "enableStudyLazyLoad": True,
                "imageRendering": "wadors",
                "thumbnailRendering": "wadors",
                "omitQuotationForMultipartRequest": True,
                "staticWado": False,
                "singlepart": "bulkdata,video,pdf",
                "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
                "dicomUploadEnabled": False,
            },
        }],
    }
