"""The recipient at /view: the code and date of birth, one answer for every wrong pair,
what a revoked, expired or locked share says, the Share Inbox and its one Extend."""

import datetime
import re
import time
import zoneinfo

import pytest
from django.test import Client
from django.utils import timezone

from dicomgw.models import RetrieveJob
from pockethealth.codes import code_format, code_generate
from pockethealth.models import AuditEvent
from sharing.models import Share
from sharing.recipient import (
    AccessDenied,
    BirthDateError,
    ShareUnavailable,
    birth_date_parse,
    share_max_expiry,
    share_unlock,
)
from sharing.services import PacsStudy, PatientIdentity, Recipient, share_create, share_revoke

from .conftest import ADA_DOB, make_patient, make_study

WRONG_DOB = datetime.date(1980, 1, 2)
CSRF = [re.compile(rb'name="csrfmiddlewaretoken" value="[^"]+"'),
        re.compile(rb'"X-CSRFToken": "[^"]+"')]


def unlock_post(client: Client, code: str, dob: str, **extra):
    return client.post("/view", {"code": code, "birth_date": dob}, **extra)


def open_inbox(client: Client, code: str, dob: str = "1981/08/29", **extra):
    response = unlock_post(client, code, dob, **extra)
    assert response.status_code == 303, response.content[:800]
    assert response["Location"] == "/view/inbox"
    return response


def without_csrf(body: bytes) -> bytes:
    for pattern in CSRF:
        body = pattern.sub(b"CSRF", body)
    return body


def comparable_headers(response) -> dict:
    headers = {k.lower(): v for k, v in response.headers.items()}
    # "expires" is the clock plus max-age: two answers a second apart differ in it alone.
    cookies = {name: {k: v for k, v in morsel.items() if v and k != "expires"}
               for name, morsel in response.cookies.items()}
    return {"headers": headers, "cookies": cookies}


def events(action, share=None):
    found = AuditEvent.objects.filter(action=action)
    if share is not None:
        found = found.filter(object_type="sharing.share", object_id=str(share.pk))
    return found


# --- One answer for every wrong pair ---------------------------------------------------


def test_wrong_dob_gets_the_same_answer_as_wrong_code(share_made):
    """Status, body (but the CSRF token) and headers are the same, byte for byte."""
    unknown = code_format(code_generate())
    typed_dob = "1980/01/02"
    by_wrong_code = unlock_post(Client(), unknown, typed_dob)
    by_wrong_dob = unlock_post(Client(), code_format(share_made.code), typed_dob)

    assert by_wrong_code.status_code == by_wrong_dob.status_code == 403
    assert without_csrf(by_wrong_code.content) == without_csrf(by_wrong_dob.content)
    assert comparable_headers(by_wrong_code) == comparable_headers(by_wrong_dob)
    assert b"do not match a share" in by_wrong_dob.content


@pytest.mark.parametrize("state", ["revoked", "expired", "locked"])
def test_a_revoked_expired_or_locked_share_answers_a_wrong_dob_like_an_unknown_code(
        share_made, clerk, state):
    share = share_made.share
    if state == "revoked":
        share_revoke(share=share, by=clerk)
    elif state == "expired":
        Share.objects.filter(pk=share.pk).update(expires_at=timezone.now())
    else:
        Share.objects.filter(pk=share.pk).update(locked_at=timezone.now())
    unknown = unlock_post(Client(), code_format(code_generate()), "1980/01/02")
    wrong_dob = unlock_post(Client(), share_made.code, "1980/01/02")
    assert unknown.status_code == wrong_dob.status_code == 403
    assert without_csrf(unknown.content) == without_csrf(wrong_dob.content)
    assert comparable_headers(unknown) == comparable_headers(wrong_dob)


def test_a_wrong_code_costs_about_as_long_as_a_wrong_dob(share_made):
    """The same statements run for both (the keyed hash, the look-up, the comparison,
    the counter update, the audit insert); medians stay close."""
    now = timezone.now()

    def timed(code):
        started = time.perf_counter()
        with pytest.raises(AccessDenied):
            share_unlock(code=code, birth_date=WRONG_DOB, address="198.51.100.20", now=now)
        return time.perf_counter() - started

    unknown, wrong_dob = [], []
    for i in range(18):  # under the address limit, and the share's 10 wrong dates
        (unknown if i % 2 else wrong_dob).append(
            timed(code_generate() if i % 2 else share_made.code))
    unknown.sort()
    wrong_dob.sort()
    a, b = unknown[len(unknown) // 2], wrong_dob[len(wrong_dob) // 2]
    assert abs(a - b) < max(0.004, 0.5 * min(a, b)), (a, b)


# --- Both right: say what happened and what to do -------------------------------------


def test_both_right_on_a_revoked_share_says_the_sender_withdrew_it(share_made, clerk):
    share_revoke(share=share_made.share, by=clerk)
    response = unlock_post(Client(), share_made.code, "1981-08-29")
    assert response.status_code == 403
    body = response.content.decode()
    assert "withdrawn access" in body
    assert "St. Anthony&#x27;s Memorial Hospital" in body
    assert "new Access Page" in body
    assert events("share.access.refused", share_made.share).get().detail == {"reason": "revoked"}


def test_both_right_on_an_expired_share_points_to_support_until_nine_months(share_made):
    share = share_made.share
    Share.objects.filter(pk=share.pk).update(expires_at=timezone.now())
    body = unlock_post(Client(), share_made.code, "19810829").content.decode()
    assert "Access to these images has ended" in body
    assert "1-800-555-0199" in body and "support@imagelink.example" in body
    assert share_max_expiry(share).astimezone(zoneinfo.ZoneInfo("America/Toronto")).strftime(
        "%Y/%m/%d") in body


def test_both_right_past_nine_months_asks_the_sender_for_a_new_access_page(share_made):
    long_ago = timezone.now() - datetime.timedelta(days=300)
    Share.objects.filter(pk=share_made.share.pk).update(
        created_at=long_ago, expires_at=long_ago + datetime.timedelta(days=30))
    body = unlock_post(Client(), share_made.code, "1981/08/29").content.decode()
    assert "cannot be extended" in body
    assert "Ask St. Anthony&#x27;s Memorial Hospital for a new Access Page" in body


def test_both_right_on_a_locked_share_says_it_is_locked_and_whom_to_call(share_made):
    Share.objects.filter(pk=share_made.share.pk).update(locked_at=timezone.now())
    response = unlock_post(Client(), share_made.code, "1981/08/29")
    assert response.status_code == 403
    body = response.content.decode()
    assert "This share is locked" in body and "1-800-555-0199" in body


# --- The share lock --------------------------------------------------------------------


def test_ten_wrong_dobs_lock_the_share_and_a_clerk_unlocks_it(share_made, client, clerk):
    from tests.conftest import sign_in

    share = share_made.share
    now = timezone.now()
    for attempt in range(1, 11):
        with pytest.raises(AccessDenied):
            share_unlock(code=share_made.code, birth_date=WRONG_DOB,
                         address=f"198.51.100.{attempt}", now=now)
        share.refresh_from_db()
        assert share.is_locked == (attempt == 10)
    assert share.failed_dob_attempts == 10
    lock = events("share.lock", share).get()
    assert lock.client_address == "198.51.100.10" and lock.actor_type == "anonymous"
    assert events("share.access.denied", share).count() == 10

    with pytest.raises(ShareUnavailable) as refused:
        share_unlock(code=share_made.code, birth_date=ADA_DOB, address="203.0.113.5", now=now)
    assert refused.value.reason == "locked"

    sign_in(client, clerk)
    page = client.get(f"/clerk/shares/{share.pk}/").content.decode()
    assert "too many wrong dates of birth" in page
    response = client.post(f"/clerk/shares/{share.pk}/unlock/")
    assert response.status_code == 302
    share.refresh_from_db()
    assert not share.is_locked and share.failed_dob_attempts == 0
    assert share.unlocked_by == clerk
    unlock = events("share.unlock", share).get()
    assert unlock.actor_user == clerk and unlock.detail == {"attempts": 10}
    assert share_unlock(code=share_made.code, birth_date=ADA_DOB, address="203.0.113.5",
                        now=now).pk == share.pk


def test_another_facilitys_clerk_cannot_unlock(share_made, client, other_clerk):
    from tests.conftest import sign_in

    Share.objects.filter(pk=share_made.share.pk).update(locked_at=timezone.now())
    sign_in(client, other_clerk)
    assert client.post(f"/clerk/shares/{share_made.share.pk}/unlock/").status_code == 404
    assert Share.objects.get(pk=share_made.share.pk).is_locked


def test_support_unlocks_and_extends_in_the_admin_but_never_past_nine_months(
        share_made, client, support_user, facility, clerk, patient):
    from tests.conftest import sign_in

    share = share_made.share
    Share.objects.filter(pk=share.pk).update(locked_at=timezone.now(), failed_dob_attempts=10)
    sign_in(client, support_user)
    response = client.post("/admin/sharing/share/", {"action": "unlock",
                                                     "_selected_action": [share.pk]})
    assert response.status_code == 302
    share.refresh_from_db()
    assert not share.is_locked and share.unlocked_by == support_user
    assert events("share.unlock", share).get().actor_user == support_user

    # Past 30 days, support may extend: to the hard end, 9 months after creation.
    created = timezone.now() - datetime.timedelta(days=45)
    Share.objects.filter(pk=share.pk).update(created_at=created,
                                             expires_at=created + datetime.timedelta(days=30))
    share.refresh_from_db()
    client.post("/admin/sharing/share/", {"action": "extend_to_limit",
                                          "_selected_action": [share.pk]})
    share.refresh_from_db()
    assert share.expires_at == share_max_expiry(share)
    assert events("share.extend.support", share).get().actor_user == support_user

    # A share made ten months ago stays as it is.
    old = share_create(facility=facility, patient_or_identity=patient,
                       studies=[make_study(patient, "CT", "OLD", datetime.date(2019, 1, 1))],
                       recipient=Recipient(method=Share.Method.PATIENT), created_by=clerk).share
    made = timezone.now() - datetime.timedelta(days=305)
    Share.objects.filter(pk=old.pk).update(created_at=made,
                                           expires_at=made + datetime.timedelta(days=30))
    response = client.post("/admin/sharing/share/", {"action": "extend_to_limit",
                                                     "_selected_action": [old.pk]},
                           follow=True)
    assert "the sender must make a new share" in response.content.decode()
    assert Share.objects.get(pk=old.pk).expires_at == made + datetime.timedelta(days=30)
    assert not events("share.extend.support", old).exists()


def test_a_clerk_cannot_use_the_admin_actions(share_made, clerk_client):
    response = clerk_client.post("/admin/sharing/share/", {
        "action": "unlock", "_selected_action": [share_made.share.pk]})
    assert response.status_code in (302, 403)
    assert not events("share.unlock").exists()


def test_a_right_pair_clears_the_count_of_wrong_dobs(share_made):
    now = timezone.now()
    for _ in range(6):
        with pytest.raises(AccessDenied):
            share_unlock(code=share_made.code, birth_date=WRONG_DOB, address="192.0.2.1",
                         now=now)
    share_unlock(code=share_made.code, birth_date=ADA_DOB, address="192.0.2.1", now=now)
    share = Share.objects.get(pk=share_made.share.pk)
    assert share.failed_dob_attempts == 0 and share.last_accessed_at == now


# --- Dates of birth as people type them -----------------------------------------------


@pytest.mark.parametrize("typed", [
    "1981/08/29", "1981-08-29", "1981.08.29", "1981 08 29", "19810829", "1981/8/29",
    "29/08/1981", "08/29/1981", "29-08-1981", "29 Aug 1981", "Aug 29, 1981",
    "August 29 1981", "29 août 1981", " 1981/08/29 ",
])
def test_a_dob_is_read_in_any_common_form(typed):
    assert birth_date_parse(typed, today=datetime.date(2026, 1, 1)) == ADA_DOB


@pytest.mark.parametrize("typed, says", [
    ("05/06/1981", "could be read two ways"),
    ("81/08/29", "four digits"),
    ("1981/02/30", "no such date"),
    ("2031/01/01", "in the future"),
    ("", "Enter the patient"),
    ("yesterday", "year, month, day"),
])
def test_a_dob_that_could_be_misread_is_refused_with_the_expected_form(typed, says):
    with pytest.raises(BirthDateError, match=says):
        birth_date_parse(typed, today=datetime.date(2026, 1, 1))


def test_a_malformed_entry_is_corrected_on_the_page_and_counts_as_no_guess(share_made):
    response = unlock_post(Client(), "K3Q-2PB", "05/06/1981")
    assert response.status_code == 400
    body = response.content.decode()
    assert "XXX-XXX-XXX" in body and "could be read two ways" in body
    assert "YYYY/MM/DD" in body
    assert not events("share.access.denied").exists()


def test_the_code_may_be_typed_in_lower_case_with_o_for_zero_and_spaces(share_made):
    typed = share_made.code.lower().replace("0", "o").replace("1", "l")
    typed = f"{typed[:3]} {typed[3:6]} {typed[6:]}"
    open_inbox(Client(), typed, "1981-08-29")


# --- The QR link -----------------------------------------------------------------------


def test_the_qr_link_fills_in_the_code_and_leaves_the_address_bar_at_once(share_made):
    client = Client()
    response = client.get(f"/view?code={share_made.code}")
    assert response.status_code == 303 and response["Location"] == "/view"
    page = client.get("/view").content.decode()
    assert f'value="{code_format(share_made.code)}"' in page
    # A bad code in the link is dropped, not echoed.
    response = Client().get("/view?code=<script>")
    assert response.status_code == 303 and response["Location"] == "/view"
    open_inbox(client, code_format(share_made.code))


# --- The Share Inbox -------------------------------------------------------------------


def test_the_inbox_lists_the_exams_newest_first_with_what_a_radiologist_needs(
        share_made, patient, settings):
    settings.MEDIA_VIEWER_DIR = None  # the offline viewer is offered only when installed
    client = Client()
    open_inbox(client, share_made.code)
    response = client.get("/view/inbox")
    assert response.status_code == 200
    body = response.content.decode()
    assert "LOVELACE, ADA" in body and "1981/08/29" in body
    assert "St. Anthony&#x27;s Memorial Hospital" in body
    order = [body.index(text) for text in ("CHEST 2 VIEW", "HEAD WITHOUT CONTRAST",
                                           "BREAST BILATERAL")]
    assert order == sorted(order)
    assert "2020/03/29" in body and "2020/02/05" in body
    for item in share_made.share.share_studies.all():
        assert f'href="/view/studies/{item.pk}/viewer"' in body
        assert f'name="exam" value="{item.pk}"' in body
    assert "Download ZIP" in body and "Download Disk Image" in body
    assert "Include the DICOM viewer" not in body
    assert "Transfer in progress" not in body
    assert 'action="/view/extend"' in body


def test_view_opens_the_viewer_on_that_exam_and_is_recorded(share_made, studies):
    client = Client()
    open_inbox(client, share_made.code)
    item = share_made.share.share_studies.get(study=studies[1])
    response = client.get(f"/view/studies/{item.pk}/viewer")
    assert response.status_code == 200
    assert f"StudyInstanceUIDs={studies[1].study_instance_uid}" in response.content.decode()
    viewed = events("share.study.view", share_made.share).get()
    assert viewed.actor_type == "share_session"
    assert viewed.detail == {"exam": item.pk, "arrived": True}


def test_transfer_in_progress_shows_a_live_bar_and_reloads_when_an_exam_arrives(
        facility, clerk, node):
    made = share_create(
        facility=facility, created_by=clerk, recipient=Recipient(method=Share.Method.PRINT),
        patient_or_identity=PatientIdentity(name="LOVELACE^ADA", patient_id="SMH-1815",
                                            birth_date=ADA_DOB),
        pacs_studies=[PacsStudy(node=node, study_instance_uid="1.2.3.4.5",
                                description="CT CHEST", study_date=datetime.date(2024, 1, 2),
                                modalities=("CT",), num_instances=40)])
    client = Client()
    open_inbox(client, made.code)
    body = client.get("/view/inbox").content.decode()
    assert "Transfer in progress" in body
    assert 'hx-get="/view/inbox/progress"' in body and 'hx-trigger="every 2s"' in body
    assert 'name="exam"' in body and "disabled" in body

    job = RetrieveJob.objects.get()
    RetrieveJob.objects.filter(pk=job.pk).update(status="running", archived=10, expected=40)
    poll = client.get("/view/inbox/progress", {"available": "0"}, HTTP_HX_REQUEST="true")
    assert poll.status_code == 200 and "HX-Refresh" not in poll
    assert "25%" in poll.content.decode()

    patient = make_patient(facility)
    study = make_study(patient, "CT", "CT CHEST", datetime.date(2024, 1, 2), images=40,
                       uid="1.2.3.4.5")
    RetrieveJob.objects.filter(pk=job.pk).update(status="complete", archived=40, study=study)
    poll = client.get("/view/inbox/progress", {"available": "0"}, HTTP_HX_REQUEST="true")
    assert poll["HX-Refresh"] == "true"
    body = client.get("/view/inbox").content.decode()
    assert "Transfer in progress" not in body and "/viewer" in body


# --- Extend ----------------------------------------------------------------------------


def test_extend_is_offered_once_in_the_first_30_days_and_lasts_nine_months(share_made):
    share = share_made.share
    client = Client()
    open_inbox(client, share_made.code)
    assert 'action="/view/extend"' in client.get("/view/inbox").content.decode()

    response = client.post("/view/extend")
    assert response.status_code == 303 and response["Location"] == "/view/inbox"
    share.refresh_from_db()
    assert share.extended and share.expires_at == share_max_expiry(share)
    local = zoneinfo.ZoneInfo("America/Toronto")
    assert share.expires_at.astimezone(local).time() == share.created_at.astimezone(local).time()
    body = client.get("/view/inbox").content.decode()
    assert 'action="/view/extend"' not in body and "Access extended until" in body
    extended = events("share.extend", share).get()
    assert extended.actor_type == "share_session" and extended.actor_ref == str(share.pk)

    # Only once: a second press changes nothing.
    until = share.expires_at
    client.post("/view/extend")
    share.refresh_from_db()
    assert share.expires_at == until and events("share.extend", share).count() == 1
    assert "can no longer be extended" in client.get("/view/inbox").content.decode()


def test_extend_is_not_offered_after_30_days(share_made):
    share = share_made.share
    created = timezone.now() - datetime.timedelta(days=31)
    Share.objects.filter(pk=share.pk).update(created_at=created,
                                             expires_at=timezone.now() + datetime.timedelta(1))
    client = Client()
    open_inbox(client, share_made.code)
    assert 'action="/view/extend"' not in client.get("/view/inbox").content.decode()
    client.post("/view/extend")
    share.refresh_from_db()
    assert not share.extended and not events("share.extend").exists()


# --- The audit trail -------------------------------------------------------------------


def test_every_step_is_audited_without_phi(share_made, studies):
    client = Client(REMOTE_ADDR="203.0.113.77")
    unlock_post(client, code_generate(), "1981/08/29")
    unlock_post(client, share_made.code, "1980/01/02")
    open_inbox(client, share_made.code)
    client.get("/view/inbox")
    item = share_made.share.share_studies.first()
    client.get(f"/view/studies/{item.pk}/viewer")
    client.post("/view/extend")
    client.post("/view/signout")

    share = share_made.share
    recorded = list(AuditEvent.objects.filter(action__startswith="share.").exclude(
        action__in=["share.create"]).order_by("time", "id"))
    assert [e.action for e in recorded] == [
        "share.access.denied", "share.access.denied", "share.access", "share.inbox.view",
        "share.study.view", "share.extend", "share.signout"]
    unknown, wrong_dob, *session = recorded
    assert unknown.actor_type == wrong_dob.actor_type == "anonymous"
    assert unknown.client_address == wrong_dob.client_address == "203.0.113.77"
    assert unknown.object_id == "" and wrong_dob.object_id == str(share.pk)
    for event in session:
        assert event.actor_type == "share_session" and event.actor_ref == str(share.pk)
        assert event.client_address == "203.0.113.77"
    phi = [share_made.code, code_format(share_made.code), "LOVELACE", "Ada", "ADA",
           "1981-08-29", "19810829", "1981/08/29", "SMH-1815"]
    for event in recorded:
        text = f"{event.detail} {event.actor_ref} {event.object_id} {event.patient_ref}"
        assert not any(p in text for p in phi), event.action
