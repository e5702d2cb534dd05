import pytest
from django.db import connection
from django.db.utils import DatabaseError
from django.test import RequestFactory, override_settings
from django_otp.plugins.otp_static.models import StaticToken
from django_otp.plugins.otp_totp.models import TOTPDevice

from dicomgw.models import Patient, Study
from pockethealth.models import AuditEvent, StaffUser
from pockethealth.services import client_address
from tests.conftest import CLERK_PASSWORD, sign_in, totp_now


def password_only(client, user):
    response = client.post("/account/login/", {"username": user.username,
                                                "password": CLERK_PASSWORD})
    assert response.status_code == 302
    return response


def make_archive_patient(facility, name="Tremblay^Marie", mrn="MRN001") -> Study:
    patient = Patient.objects.create(
        facility=facility, patient_id=mrn, name=name, name_search=name.lower().replace("^", " "),
        identity_key=f"{facility.pk}-{mrn}",
    )
    return Study.objects.create(
        facility=facility, patient=patient, study_instance_uid=f"1.2.3.{patient.pk}",
        description="CT CHEST W/O CONTRAST", modalities="CT", num_series=1, num_instances=3,
    )


def test_password_only_session_is_sent_to_the_second_factor(client, clerk):
    response = password_only(client, clerk)
    assert response["Location"].startswith("/account/verify/")
    response = client.get("/clerk/archive/")
    assert response.status_code == 302
    assert response["Location"].startswith("/account/verify/")


def test_admin_refuses_a_password_only_session(client, support_user):
    password_only(client, support_user)
    for url in ("/admin/", "/admin/pockethealth/auditevent/"):
        response = client.get(url, follow=True)
        assert response.redirect_chain, url
        assert response.request["PATH_INFO"] == "/account/verify/"
        assert b"Site administration" not in response.content


def test_admin_opens_after_the_second_factor(client, support_user):
    sign_in(client, support_user)
    assert client.get("/admin/").status_code == 200
    assert client.get("/admin/pockethealth/auditevent/").status_code == 200


def test_totp_login_reaches_the_clerical_pages(client, clerk):
    sign_in(client, clerk)
    response = client.get("/clerk/archive/")
    assert response.status_code == 200
    assert b"St. Anthony" in response.content


def test_a_wrong_totp_code_is_refused_and_recorded(client, clerk):
    password_only(client, clerk)
    device = TOTPDevice.objects.get(user=clerk)
    wrong = f"{(int(totp_now(device)) + 1) % 1_000_000:06d}"
    response = client.post("/account/verify/", {"token": wrong})
    assert response.status_code == 200
    assert client.get("/clerk/").status_code == 302
    event = AuditEvent.objects.get(action="login.otp")
    assert event.outcome == AuditEvent.Outcome.FAILURE
    assert event.actor_user == clerk


def test_a_backup_code_signs_in_once(client, clerk):
    from pockethealth.services import static_codes_issue

    code = static_codes_issue(user=clerk, count=2)[0]
    password_only(client, clerk)
    assert client.post("/account/verify/", {"token": code.upper()}).status_code == 302
    assert client.get("/clerk/").status_code == 200
    assert not StaticToken.objects.filter(token=code).exists()
    client.post("/account/logout/")
    password_only(client, clerk)
    assert client.post("/account/verify/", {"token": code}).status_code == 200


def test_failed_login_is_recorded_without_the_password(client, clerk):
    response = client.post("/account/login/", {"username": "clerk", "password": "nope-nope-nope"},
                           REMOTE_ADDR="203.0.113.9")
    assert response.status_code == 200
    assert b"do not match" in response.content
    event = AuditEvent.objects.get(action="login.password")
    assert event.outcome == AuditEvent.Outcome.FAILURE
    assert event.actor_ref == "clerk"
    assert event.client_address == "203.0.113.9"
    assert "nope" not in str(event.detail)


def test_login_is_recorded(client, clerk):
    sign_in(client, clerk)
    actions = list(
        AuditEvent.objects.filter(actor_user=clerk).order_by("id").values_list("action", "outcome")
    )
    assert actions == [("login.password", "success"), ("login", "success")]
    assert AuditEvent.objects.get(action="login").facility == clerk.facility


def test_archive_browsing_is_recorded(clerk_client, clerk):
    study = make_archive_patient(clerk.facility)
    assert clerk_client.get("/clerk/archive/").status_code == 200
    assert clerk_client.post("/clerk/archive/", {"q": "tremblay"}).status_code == 302
    assert clerk_client.get(f"/clerk/archive/patients/{study.patient_id}/").status_code == 200
    assert clerk_client.get(f"/clerk/archive/studies/{study.pk}/").status_code == 200
    events = AuditEvent.objects.filter(actor_user=clerk, action__startswith="archive.")
    assert set(events.values_list("action", flat=True)) == {
        "archive.browse", "archive.search", "archive.view_patient", "archive.view_study",
    }
    viewed = events.get(action="archive.view_study")
    assert viewed.patient_ref == str(study.patient_id)
    assert viewed.object_id == str(study.pk)
    assert "Tremblay" not in str(list(events.values()))


def test_a_clerk_cannot_open_another_facilitys_patient(clerk_client, other_facility):
    study = make_archive_patient(other_facility, name="Other^Person", mrn="X1")
    assert clerk_client.get(f"/clerk/archive/patients/{study.patient_id}/").status_code == 404
    assert clerk_client.get(f"/clerk/archive/studies/{study.pk}/").status_code == 404
    clerk_client.post("/clerk/archive/", {"q": "other"})
    assert b"OTHER" not in clerk_client.get("/clerk/archive/").content


def test_patient_search_by_name_or_mrn(clerk_client, clerk):
    make_archive_patient(clerk.facility, name="Tremblay^Marie", mrn="MRN001")
    make_archive_patient(clerk.facility, name="Okafor^Daniel", mrn="MRN002")
    found = clerk_client.post("/clerk/archive/", {"q": "okafor"}, follow=True).content.decode()
    assert "OKAFOR" in found and "TREMBLAY" not in found
    found = clerk_client.post("/clerk/archive/", {"q": "MRN001"}, HTTP_HX_REQUEST="true")
    assert "TREMBLAY" in found.content.decode() and "OKAFOR" not in found.content.decode()
    found = clerk_client.post("/clerk/archive/", {"q": "daniel okafor"}, follow=True)
    assert "OKAFOR" in found.content.decode()


def test_a_patient_search_never_puts_the_query_in_a_url(clerk_client, clerk):
    make_archive_patient(clerk.facility, name="Tremblay^Marie", mrn="MRN001")
    response = clerk_client.post("/clerk/archive/", {"q": "Tremblay"})
    assert response.status_code == 302
    assert "Tremblay" not in response["Location"] and "MRN" not in response["Location"]
    page = clerk_client.get(response["Location"]).content.decode()
    assert "TREMBLAY" in page
    assert "q=" not in page and "?page=1&" not in page


def test_enrolment_shows_a_qr_code_and_confirms_with_a_code(client, facility):
    user = StaffUser.objects.create_user(username="newclerk", password=CLERK_PASSWORD,
                                         facility=facility)
    response = client.post("/account/login/", {"username": "newclerk",
                                                "password": CLERK_PASSWORD})
    assert response["Location"].startswith("/account/enrol/")
    page = client.get(response["Location"])
    assert b"<svg" in page.content
    device = TOTPDevice.objects.get(user=user, confirmed=False)
    response = client.post("/account/enrol/", {"token": totp_now(device)})
    assert response.status_code == 302
    device.refresh_from_db()
    assert device.confirmed
    codes_page = client.get(response["Location"]).content.decode()
    codes = StaticToken.objects.filter(device__user=user).values_list("token", flat=True)
    assert len(codes) == 10
    assert all(code in codes_page for code in codes)
    # Shown once only.
    assert codes[0] not in client.get(response["Location"]).content.decode()
    assert client.get("/clerk/").status_code == 200


def test_enrolment_cannot_replace_a_device_without_the_second_factor(client, clerk):
    password_only(client, clerk)
    response = client.get("/account/enrol/")
    assert response.status_code == 302
    assert response["Location"].startswith("/account/verify/")
    assert not TOTPDevice.objects.filter(user=clerk, confirmed=False).exists()


def test_audit_events_cannot_be_changed_or_removed(db, clerk):
    from pockethealth.services import audit_record

    event = audit_record(action="test.event", user=clerk)
    event.action = "edited"
    with pytest.raises(PermissionError):
        event.save()
    with pytest.raises(PermissionError):
        event.delete()
    with pytest.raises(PermissionError):
        AuditEvent.objects.filter(pk=event.pk).update(action="edited")
    with pytest.raises(PermissionError):
        AuditEvent.objects.all().delete()


def test_the_database_refuses_to_change_audit_events(db, clerk):
    from pockethealth.services import audit_record

    assert connection.vendor == "postgresql", "the suite runs on PostgreSQL (make test)"

    event = audit_record(action="test.event", user=clerk)
    with pytest.raises(DatabaseError), connection.cursor() as cursor:
        cursor.execute("UPDATE pockethealth_auditevent SET action = 'x' WHERE id = %s", [event.pk])


def test_audit_admin_is_read_only(client, support_user):
    from pockethealth.services import audit_record

    event = audit_record(action="test.event", user=support_user)
    sign_in(client, support_user)
    listing = client.get("/admin/pockethealth/auditevent/", {"outcome__exact": "success"})
    assert listing.status_code == 200 and b"test.event" in listing.content
    assert client.get("/admin/pockethealth/auditevent/add/").status_code == 403
    change = f"/admin/pockethealth/auditevent/{event.pk}/change/"
    assert client.get(change).status_code == 200  # view-only page
    assert client.post(change, {"action": "edited"}).status_code == 403
    assert client.post(f"/admin/pockethealth/auditevent/{event.pk}/delete/").status_code == 403
    event.refresh_from_db()
    assert event.action == "test.event"


@override_settings(TRUSTED_PROXIES=["10.0.0.1"])
def test_x_forwarded_for_is_believed_only_from_a_trusted_proxy():
    rf = RequestFactory()
    spoofed = rf.get("/", REMOTE_ADDR="198.51.100.7", HTTP_X_FORWARDED_FOR="1.2.3.4")
    assert client_address(spoofed) == "198.51.100.7"
    proxied = rf.get("/", REMOTE_ADDR="10.0.0.1", HTTP_X_FORWARDED_FOR="1.2.3.4, 198.51.100.8")
    assert client_address(proxied) == "198.51.100.8"


def test_too_many_wrong_passwords_lock_the_sign_in(client, clerk, settings):
    settings.LOGIN_FAILURE_LIMIT = 3
    for _ in range(3):
        client.post("/account/login/", {"username": "clerk", "password": "wrong-password-1"})
    response = client.post("/account/login/", {"username": "clerk", "password": CLERK_PASSWORD})
    assert response.status_code == 200
    assert b"Too many unsuccessful attempts" in response.content
    assert client.get("/clerk/").status_code == 302
    denied = AuditEvent.objects.get(action="login.password", outcome="denied")
    assert denied.actor_ref == "clerk"


def test_times_are_shown_in_the_facility_time_zone(clerk_client, clerk):
    import datetime

    clerk.facility.time_zone = "America/Vancouver"
    clerk.facility.save()
    study = make_archive_patient(clerk.facility)
    Study.objects.filter(pk=study.pk).update(
        created_at=datetime.datetime(2026, 7, 1, 3, 30, tzinfo=datetime.UTC)
    )
    page = clerk_client.get("/clerk/").content.decode()
    # 03:30 UTC on 1 July is 20:30 on 30 June in Vancouver (PDT, UTC-7).
    assert "2026/06/30" in page and "20:30" in page
