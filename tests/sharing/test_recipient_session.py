"""The recipient's session: a fresh id bound to one share, idle and absolute timeouts,
its own cookie, nothing cached, and no code or PHI in any URL of the recipient pages."""

import datetime
import re
from html.parser import HTMLParser
from importlib import import_module

import pytest
from django.conf import settings
from django.test import Client
from django.utils import timezone

import sharing.recipient_views as recipient_views
from dicomgw.models import MediaJob
from pockethealth.codes import code_format
from sharing.models import Share
from sharing.services import Recipient, share_create, share_page_reissue, share_revoke

from .conftest import make_patient, make_study
from .test_recipient import open_inbox

COOKIE = "view_session"


def store(key):
    return import_module(settings.RECIPIENT_SESSION_ENGINE).SessionStore(key)


@pytest.fixture
def clock(monkeypatch):
    """The views' clock, moved by hand."""

    class Clock:
        now = timezone.now()

        def advance(self, **delta):
            self.now += datetime.timedelta(**delta)

    c = Clock()
    monkeypatch.setattr(recipient_views, "_now", lambda: c.now)
    return c


@pytest.fixture
def other_share(facility, clerk):
    babbage = make_patient(facility, name="BABBAGE^CHARLES", patient_id="SMH-1791",
                           birth_date=datetime.date(1931, 12, 26))
    study = make_study(babbage, "CT", "ANALYTICAL ENGINE", datetime.date(2021, 5, 1))
    return share_create(facility=facility, patient_or_identity=babbage, studies=[study],
                        recipient=Recipient(method=Share.Method.PATIENT), created_by=clerk)


def test_opening_a_share_starts_a_fresh_session_with_a_private_cookie(share_made):
    client = Client()
    client.get(f"/view?code={share_made.code}")
    before = client.cookies[COOKIE].value
    response = open_inbox(client, share_made.code)
    cookie = response.cookies[COOKIE]
    after = cookie.value
    assert after != before and len(after) >= 32
    assert not store(before).exists(before)
    assert cookie["path"] == "/view" and cookie["httponly"] and cookie["secure"]
    assert cookie["samesite"] == "Lax"
    assert not cookie["max-age"] and not cookie["expires"]  # gone when the browser closes
    data = store(after).load()
    assert data["share"] == share_made.share.pk and "pending_code" not in data


def test_the_recipient_session_leaves_a_staff_session_alone(share_made, clerk_client):
    staff_key = clerk_client.cookies["sessionid"].value
    response = open_inbox(clerk_client, share_made.code)
    assert "sessionid" not in response.cookies
    assert clerk_client.cookies["sessionid"].value == staff_key
    assert clerk_client.get("/clerk/shares/").status_code == 200


def test_the_session_ends_after_30_idle_minutes(share_made, clock):
    client = Client()
    open_inbox(client, share_made.code)
    for _ in range(4):  # two hours of use, a request every 29 minutes
        clock.advance(minutes=29)
        assert client.get("/view/inbox").status_code == 200
    clock.advance(minutes=30)
    response = client.get("/view/inbox")
    assert response.status_code == 303 and response["Location"] == "/view"
    assert "without activity" in client.get("/view").content.decode()
    assert client.get("/view/inbox").status_code == 303


def test_the_session_ends_12_hours_after_it_began_however_busy(share_made, clock):
    client = Client()
    open_inbox(client, share_made.code)
    for _ in range(int(12 * 60 / 20) - 1):
        clock.advance(minutes=20)
        assert client.get("/view/inbox").status_code == 200
    clock.advance(minutes=20)
    assert client.get("/view/inbox")["Location"] == "/view"
    assert "sessions last at most" in client.get("/view").content.decode()


def test_a_session_for_one_share_cannot_see_another_shares_exams(share_made, other_share,
                                                                 facility):
    client = Client()
    open_inbox(client, share_made.code)
    theirs = other_share.share.share_studies.get()
    assert client.get(f"/view/studies/{theirs.pk}/viewer").status_code == 404
    ours = share_made.share.share_studies.first()
    response = client.post("/view/download", {"format": "zip", "exam": [ours.pk, theirs.pk]})
    assert response.status_code == 404
    job = MediaJob.objects.create(facility=facility, owner_ref=f"share:{other_share.share.pk}",
                                  spec_key="x" * 64, study_ids=[theirs.study_id],
                                  expires_at=timezone.now() + datetime.timedelta(hours=1))
    assert client.get(f"/view/downloads/{job.pk}").status_code == 404
    assert client.get(f"/view/downloads/{job.pk}/file").status_code == 404
    assert "ANALYTICAL ENGINE" not in client.get("/view/inbox").content.decode()


def test_without_a_session_every_inbox_address_sends_to_view(share_made):
    client = Client()
    item = share_made.share.share_studies.first()
    for url in ("/view/inbox", f"/view/studies/{item.pk}/viewer", "/view/inbox/progress"):
        response = client.get(url)
        assert response.status_code == 303 and response["Location"] == "/view"
    assert client.post("/view/extend").status_code == 303
    assert client.post("/view/download", {"format": "zip", "exam": [item.pk]}).status_code == 303
    polled = client.get("/view/inbox/progress", HTTP_HX_REQUEST="true")
    assert polled["HX-Redirect"] == "/view"
    forged = Client()
    forged.cookies[COOKIE] = "a" * 32
    assert forged.get("/view/inbox").status_code == 303
    assert not Share.objects.get(pk=share_made.share.pk).extended


def test_a_new_access_page_or_a_revoke_ends_open_sessions(share_made, clerk):
    client = Client()
    open_inbox(client, share_made.code)
    new_code = share_page_reissue(share=share_made.share, by=clerk)
    assert client.get("/view/inbox")["Location"] == "/view"
    assert "new Access Page and code" in client.get("/view").content.decode()

    open_inbox(client, new_code)
    share_revoke(share=Share.objects.get(pk=share_made.share.pk), by=clerk)
    assert client.get("/view/inbox")["Location"] == "/view"
    assert "withdrawn access" in client.get("/view").content.decode()


def test_leaving_forgets_the_session(share_made):
    client = Client()
    key = open_inbox(client, share_made.code).cookies[COOKIE].value
    response = client.post("/view/signout")
    assert response.status_code == 303 and response["Location"] == "/view"
    assert not store(key).exists(key)
    assert client.get("/view/inbox").status_code == 303
    assert "You have left the Share Inbox" in client.get("/view").content.decode()


def test_every_recipient_answer_is_no_store(share_made, clerk):
    client = Client()
    item = share_made.share.share_studies.first()
    answers = [client.get(f"/view?code={share_made.code}"), client.get("/view"),
               client.post("/view", {"code": "x", "birth_date": ""}),
               client.post("/view", {"code": share_made.code, "birth_date": "1980/01/01"}),
               open_inbox(client, share_made.code), client.get("/view/inbox"),
               client.get("/view/inbox/progress"), client.get(f"/view/studies/{item.pk}/viewer"),
               client.post("/view/extend"), client.post("/view/signout")]
    Share.objects.filter(pk=share_made.share.pk).update(locked_at=timezone.now())
    answers.append(client.post("/view", {"code": share_made.code, "birth_date": "1981/08/29"}))
    for response in answers:
        assert response["Cache-Control"] == "no-store", response.request["PATH_INFO"]


class UrlCollector(HTMLParser):
    """Every URL a page holds: links, form targets, sources, and htmx's."""

    URL_ATTRS = {"href", "action", "src", "formaction", "hx-get", "hx-post", "hx-put",
                 "hx-delete", "hx-patch", "hx-vals", "hx-headers", "data-url", "poster"}

    def __init__(self):
        super().__init__()
        self.urls = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in self.URL_ATTRS and value:
                self.urls.append(value)


def page_urls(html: str) -> list[str]:
    collector = UrlCollector()
    collector.feed(html)
    return collector.urls


def test_no_url_on_the_recipient_pages_carries_the_code_or_phi(share_made, studies):
    share = share_made.share
    secrets = [share_made.code, code_format(share_made.code), share.code_last3 + "&",
               "LOVELACE", "Lovelace", "ADA", "Ada", "SMH-1815", "1981", "19810829",
               "08/29", "08-29", studies[0].study_instance_uid]
    client = Client()
    pages, redirects = [], []
    redirects.append(client.get(f"/view?code={share_made.code}"))
    pages.append(client.get("/view"))
    pages.append(client.post("/view", {"code": share_made.code, "birth_date": "1980/01/02"}))
    redirects.append(open_inbox(client, share_made.code))
    pages.append(client.get("/view/inbox"))
    item = share.share_studies.first()
    pages.append(client.get(f"/view/studies/{item.pk}/viewer"))
    redirects.append(client.post("/view/extend"))
    pages.append(client.get("/view/inbox"))
    Share.objects.filter(pk=share.pk).update(locked_at=timezone.now())
    pages.append(Client().post("/view", {"code": share_made.code,
                                         "birth_date": "1981/08/29"}))
    urls = [r["Location"] for r in redirects]
    for response in pages:
        html = response.content.decode()
        found = page_urls(html)
        assert found, response.request["PATH_INFO"]
        urls += found
    assert any(u.startswith("/view/studies/") for u in urls)
    for url in urls:
        for secret in secrets:
            assert secret not in url, (secret, url)
        assert not re.search(r"[?&](code|dob|birth|name|mrn)=", url, re.IGNORECASE), url


def test_a_second_share_can_be_opened_from_view_replacing_the_first(share_made, other_share):
    client = Client()
    first = open_inbox(client, share_made.code).cookies[COOKIE].value
    page = client.get("/view").content.decode()
    assert "A Share Inbox is open in this browser" in page and 'href="/view/inbox"' in page
    second = open_inbox(client, other_share.code, "1931/12/26").cookies[COOKIE].value
    assert second != first and not store(first).exists(first)
    body = client.get("/view/inbox").content.decode()
    assert "BABBAGE" in body and "LOVELACE" not in body
