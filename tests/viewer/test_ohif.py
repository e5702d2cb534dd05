"""The OHIF viewer as installed (the pinned package, trimmed, loadable from any folder), as
served (content types, compressed variants), and the pages that start it: the View link
without the study's UID, the app page naming only the visitor's DICOMweb root, and what
a visitor sees when the viewer is missing. The viewer itself runs in Chromium in
tests/browser/test_viewer.py."""

import json
import re
import subprocess
import tarfile
from pathlib import Path

import pytest
from django.conf import settings
from django.test import Client

from tests.conftest import sign_in
from viewer import ohif
from viewer.ohif import (
    INTEGRITY,
    PUBLIC_PATH_AT_RUN_TIME,
    PUBLIC_PATH_BUILT,
    UNREGISTERED,
    VERSION,
    ViewerInstallError,
    ohif_app_config,
    ohif_install,
    ohif_installed,
)


@pytest.fixture
def installed() -> ohif.Installed:
    found = ohif_installed()
    assert found is not None, "the OHIF viewer is not installed: run `make ohif`"
    return found


def config_of(html: str) -> dict:
    found = re.search(r'<script id="viewer-config" type="application/json">(.*?)</script>',
                      html, re.S)
    assert found, html[:2000]
    return json.loads(found.group(1))


# --- As installed ---------------------------------------------------------------------


def test_the_installed_viewer_is_the_pinned_version_trimmed(installed):
    folder = Path(settings.OHIF_DIR)
    stamp = json.loads((folder / ohif.STAMP).read_text())
    assert (installed.version, stamp["integrity"]) == (VERSION, INTEGRITY)
    names = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert not any(n.endswith(".map") for n in names)
    for left_out in ("index.html", "app-config.js", "sw.js", "init-service-worker.js",
                     *ohif.LEFT_OUT_CHUNKS):
        assert left_out not in names
    assert not (folder / "ort").exists() and not (folder / "dicom-microscopy-viewer").exists()
    assert {p.name for p in (folder / "assets").iterdir()} == {"images"}
    # What the viewer needs is there: the entry, the image decoders, the font.
    assert installed.entry in names and installed.stylesheet in names
    assert sum(n.endswith(".wasm") for n in names) >= 4
    assert installed.bytes < 60_000_000


def test_the_installed_viewer_loads_its_files_from_where_it_is_served(installed):
    folder = Path(settings.OHIF_DIR)
    entry = (folder / installed.entry).read_text(encoding="utf-8")
    assert PUBLIC_PATH_AT_RUN_TIME in entry and PUBLIC_PATH_BUILT not in entry
    for line in UNREGISTERED:
        assert line not in entry
    for path in folder.glob("*.js"):
        assert PUBLIC_PATH_BUILT not in path.read_text(encoding="utf-8"), path.name
    for path in folder.glob("*.css"):
        assert not re.search(r"url\(['\"]?/(?!/)", path.read_text(encoding="utf-8")), path.name


def test_the_viewer_files_are_served_with_their_types_and_compressed(installed, client):
    entry = client.get(f"/static/ohif/{installed.entry}", HTTP_ACCEPT_ENCODING="br, gzip")
    assert entry.status_code == 200
    assert entry["Content-Type"].startswith("text/javascript")
    assert entry["Content-Encoding"] == "br"
    wasm = next(Path(settings.OHIF_DIR).glob("*.wasm")).name
    codec = client.get(f"/static/ohif/{wasm}")
    assert codec.status_code == 200 and codec["Content-Type"] == "application/wasm"
    font = next(Path(settings.OHIF_DIR).glob("*.woff2")).name
    assert client.get(f"/static/ohif/{font}")["Content-Type"] == "font/woff2"
    assert client.get("/static/ohif/app-config.js").status_code == 404


# --- The pages that start it ------------------------------------------------------------


def test_the_app_config_reads_only_the_given_dicomweb_root():
    config = ohif_app_config(dicomweb_root="https://images.example.org/view/dicomweb",
                             router_basename="/view/app/")
    assert config["routerBasename"] == "/view/app"
    assert config["showStudyList"] is False
    assert config["investigationalUseDialog"] == {"option": "never"}
    [source] = config["dataSources"]
    urls = [v for v in json.dumps(config).split('"') if "://" in v or v.startswith("/")]
    assert set(urls) == {"https://images.example.org/view/dicomweb", "/view/app"}
    options = source["configuration"]
    assert options["imageRendering"] == options["thumbnailRendering"] == "wadors"
    assert options["supportsWildcard"] and not options["supportsFuzzyMatching"]
    assert options["omitQuotationForMultipartRequest"] and options["enableStudyLazyLoad"]
    assert not options["supportsStow"] and not options["supportsReject"]


def test_view_opens_the_app_at_the_exams_address_without_its_uid(installed, recipient,
                                                                  ada_share, ada_archive):
    exam = ada_share.share.share_studies.get(study=ada_archive.ct)
    uid = ada_archive.ct.study_instance_uid
    inbox = recipient.get("/view/inbox").content.decode()
    assert f'href="/view/studies/{exam.pk}/viewer"' in inbox and uid not in inbox

    page = recipient.get(f"/view/studies/{exam.pk}/viewer")
    assert page.status_code == 200 and page["Cache-Control"] == "no-store"
    html = page.content.decode()
    assert f'src="/static/ohif/{installed.entry}"' in html
    assert '<meta name="referrer" content="no-referrer">' in html
    app_page = json.loads(re.search(r'<script id="viewer-page" type="application/json">'
                                    r"(.*?)</script>", html, re.S).group(1))
    # The browser's address becomes the app's route in place, without a request.
    assert app_page["appUrl"] == f"/view/app/viewer?StudyInstanceUIDs={uid}"
    assert app_page["exitUrl"] == "/view/inbox"
    config = config_of(html)
    [source] = config["dataSources"]
    assert source["configuration"]["qidoRoot"] == "http://testserver/view/dicomweb"
    assert source["configuration"]["wadoRoot"] == "http://testserver/view/dicomweb"
    assert config["routerBasename"] == "/view/app"
    # A reload asks for that route, and gets the same app.
    assert config_of(recipient.get(app_page["appUrl"]).content.decode()) == config


def test_the_app_opens_no_study_outside_the_share(installed, recipient, ada_archive):
    for uid in (ada_archive.old.study_instance_uid, ada_archive.charles.study_instance_uid,
                f"{ada_archive.ct.study_instance_uid},{ada_archive.old.study_instance_uid}"):
        assert recipient.get(f"/view/app/viewer?StudyInstanceUIDs={uid}").status_code == 404
    # The app's other routes (its study list) lead back to the Share Inbox.
    for path in ("/view/app/", "/view/app/viewer", "/view/app/segmentation?StudyInstanceUIDs=1"):
        response = recipient.get(path)
        assert (response.status_code, response["Location"]) == (303, "/view/inbox"), path


def test_without_a_session_the_app_sends_to_view(installed, ada_archive):
    response = Client().get(
        f"/view/app/viewer?StudyInstanceUIDs={ada_archive.ct.study_instance_uid}")
    assert response.status_code == 303 and response["Location"] == "/view"


def test_a_clerk_opens_a_study_of_the_facility_only(installed, client, clerk, other_clerk,
                                                    ada_archive):
    sign_in(client, clerk)
    page = client.get(f"/clerk/viewer/studies/{ada_archive.ct.pk}/")
    assert page.status_code == 200
    [source] = config_of(page.content.decode())["dataSources"]
    assert source["configuration"]["qidoRoot"] == "http://testserver/clerk/dicomweb"
    app_url = f"/clerk/viewer/app/viewer?StudyInstanceUIDs={ada_archive.ct.study_instance_uid}"
    assert client.get(app_url).status_code == 200
    study_page = client.get(f"/clerk/archive/studies/{ada_archive.ct.pk}/").content.decode()
    assert f'href="/clerk/viewer/studies/{ada_archive.ct.pk}/"' in study_page

    other = Client()
    sign_in(other, other_clerk)
    assert other.get(f"/clerk/viewer/studies/{ada_archive.ct.pk}/").status_code == 404
    assert other.get(app_url).status_code == 404


def test_behind_a_proxy_that_ends_tls_the_viewer_reads_dicomweb_over_https(
        installed, client, clerk, ada_archive, settings):
    """An https page must read an https DICOMweb root (a browser blocks http from it):
    the proxy's X-Forwarded-Proto is believed from TRUSTED_PROXIES, from no one else."""
    settings.TRUSTED_PROXIES = ["10.0.0.1"]
    sign_in(client, clerk)
    url = f"/clerk/viewer/studies/{ada_archive.ct.pk}/"
    roots = {}
    for peer in ("10.0.0.1", "198.51.100.7"):
        page = client.get(url, REMOTE_ADDR=peer, HTTP_HOST="testserver",
                          HTTP_X_FORWARDED_PROTO="https")
        assert page.status_code == 200
        [source] = config_of(page.content.decode())["dataSources"]
        roots[peer] = source["configuration"]["qidoRoot"]
    assert roots == {"10.0.0.1": "https://testserver/clerk/dicomweb",
                     "198.51.100.7": "http://testserver/clerk/dicomweb"}


def test_a_missing_viewer_gets_a_plain_answer(settings, tmp_path, recipient, ada_share,
                                              ada_archive):
    settings.OHIF_DIR = tmp_path / "nothing-here"
    exam = ada_share.share.share_studies.get(study=ada_archive.ct)
    response = recipient.get(f"/view/studies/{exam.pk}/viewer", follow=True)
    assert response.status_code == 503
    assert "The image viewer is not available" in response.content.decode()


# --- Installing ----------------------------------------------------------------------------


def fake_npm(folder: Path, *, integrity: str) -> Path:
    """An ``npm`` that "packs" a small tarball of its own and reports ``integrity``."""
    package = folder / "src" / "package" / "dist"
    package.mkdir(parents=True)
    (package / "app.bundle.0123abcd.js").write_text(f"{PUBLIC_PATH_BUILT}\n")
    tarball = folder / "ohif-app-x.tgz"
    with tarfile.open(tarball, "w:gz") as archive:
        archive.add(folder / "src" / "package", arcname="package")
    script = folder / "npm"
    script.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do case "$prev" in --pack-destination) dest="$a";; esac; prev="$a"; done\n'
        f'cp {tarball} "$dest/ohif-app-x.tgz"\n'
        f"echo '[{{\"filename\": \"ohif-app-x.tgz\", \"integrity\": \"{integrity}\"}}]'\n")
    script.chmod(0o755)
    return script


def test_an_install_refuses_a_package_that_is_not_the_pinned_one(tmp_path):
    target = tmp_path / "ohif"
    target.mkdir()
    (target / "kept.txt").write_text("the viewer installed before")
    for reported in (INTEGRITY, "sha512-AAAA"):
        with pytest.raises(ViewerInstallError, match="is not the pinned"):
            ohif_install(target=target, npm=str(fake_npm(tmp_path / reported[-4:],
                                                         integrity=reported)))
    assert [p.name for p in target.iterdir()] == ["kept.txt"]


def test_an_install_without_npm_says_so(tmp_path):
    with pytest.raises(ViewerInstallError, match="npm is not installed"):
        ohif_install(target=tmp_path / "ohif", npm=str(tmp_path / "no-npm"))


def test_make_ohif_is_run_by_make_run_test_and_bench():
    plan = subprocess.run(["make", "-n", "-p", "ohif"], cwd=settings.BASE_DIR,
                          capture_output=True, text=True).stdout
    for target in ("run", "test", "bench"):
        # Make's database lists a target's variables ("run: X := …") beside its rule.
        rules = re.findall(rf"^{target}:(.*)$", plan, re.M)
        assert any("var/ohif/ohif-install.json" in rule for rule in rules), target
