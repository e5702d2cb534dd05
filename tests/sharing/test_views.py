"""The clerical pages of sharing: who may see what, searches that keep names out of
URLs, making a share from the archive or from PACS search results, revoking."""

import datetime
import re

from django.core import signing

from dicomgw.retrieve import StudyHit
from pockethealth.models import AuditEvent
from sharing.models import Share
from sharing.picks import SALT, pick_encode
from tests.conftest import sign_in

from .conftest import ADA_DOB, make_patient, make_study


def test_another_facilitys_clerk_gets_404_everywhere(client, other_clerk, share_made):
    sign_in(client, other_clerk)
    pk = share_made.share.pk
    for url in (f"/clerk/shares/{pk}/", f"/clerk/shares/{pk}/live/",
                f"/clerk/shares/{pk}/access-page.pdf"):
        assert client.get(url).status_code == 404
    for url in (f"/clerk/shares/{pk}/revoke/", f"/clerk/shares/{pk}/reissue/",
                f"/clerk/shares/{pk}/retry/"):
        assert client.post(url).status_code == 404
    assert not Share.objects.get(pk=pk).is_revoked
    response = client.get("/clerk/shares/")
    assert b"LOVELACE" not in response.content.upper()


def test_the_share_pages_need_a_signed_in_clerk(client, share_made):
    response = client.get(f"/clerk/shares/{share_made.share.pk}/")
    assert response.status_code == 302 and "/account/login/" in response["Location"]
    response = client.get(f"/clerk/shares/{share_made.share.pk}/access-page.pdf")
    assert response.status_code == 302


def test_the_list_shows_status_expiry_extension_and_last_access(clerk_client, share_made):
    body = clerk_client.get("/clerk/shares/").content.decode()
    share = share_made.share
    assert "LOVELACE, ADA" in body
    assert f"…{share.code_last3}" in body
    assert share_made.code not in body  # never the whole code
    assert "Ready" in body and "Not yet" in body
    assert share.expires_at.astimezone(
        datetime.timezone(datetime.timedelta(hours=-5))).strftime("%Y/%m/%d") in body


def test_searching_keeps_the_patients_name_out_of_every_url(clerk_client, share_made,
                                                            facility, clerk):
    other = make_patient(facility, name="BABBAGE^CHARLES", patient_id="SMH-1791")
    from sharing.services import Recipient, share_create

    share_create(facility=facility, patient_or_identity=other,
                 studies=[make_study(other, "CT", "HEAD", datetime.date(2021, 1, 1))],
                 recipient=Recipient(method=Share.Method.PRINT), created_by=clerk)

    response = clerk_client.post("/clerk/shares/", {"q": "Lovelace", "code": "",
                                                    "recipient": ""})
    assert response.status_code == 302
    assert response["Location"] == "/clerk/shares/"
    body = clerk_client.get(response["Location"]).content.decode()
    assert "LOVELACE, ADA" in body and "BABBAGE" not in body
    links = re.findall(r'(?:href|hx-get|hx-post|action)="([^"]*)"', body)
    assert links and not any("ovelace" in link.lower() for link in links)
    assert AuditEvent.objects.filter(action="share.search", actor_user=clerk).exists()


def test_a_share_is_found_by_the_last_three_symbols_of_its_code_or_the_whole_code(
        clerk_client, share_made):
    code = share_made.code
    for typed in (code[-3:].lower(), f"{code[:3]}-{code[3:6]}-{code[6:]}".lower()):
        clerk_client.post("/clerk/shares/", {"q": "", "code": typed, "recipient": ""})
        body = clerk_client.get("/clerk/shares/").content.decode()
        assert "LOVELACE, ADA" in body, typed
    other_tail = "ZZZ" if code[-3:] != "ZZZ" else "YYY"
    clerk_client.post("/clerk/shares/", {"q": "", "code": other_tail, "recipient": ""})
    assert "LOVELACE" not in clerk_client.get("/clerk/shares/").content.decode()


def test_the_htmx_search_answers_with_the_rows_only(clerk_client, share_made):
    response = clerk_client.post("/clerk/shares/", {"q": "ada", "code": "", "recipient": ""},
                                 HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    assert b"<html" not in response.content and b"LOVELACE, ADA" in response.content


def test_the_access_page_is_served_to_the_facility_uncached_and_audited(
        clerk_client, share_made, clerk):
    share = share_made.share
    response = clerk_client.get(f"/clerk/shares/{share.pk}/access-page.pdf?download=1")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/pdf"
    assert response["Cache-Control"] == "no-store"
    assert f'filename="access-page-{share.pk}.pdf"' in response["Content-Disposition"]
    assert b"".join(response.streaming_content).startswith(b"%PDF")
    assert AuditEvent.objects.filter(action="share.page.download", actor_user=clerk,
                                     object_id=str(share.pk)).exists()


def test_the_detail_page_shows_exams_history_and_no_code(clerk_client, share_made):
    share = share_made.share
    body = clerk_client.get(f"/clerk/shares/{share.pk}/").content.decode()
    assert "CHEST 2 VIEW" in body and "In the archive" in body
    assert "Share created" in body  # the access history, from audit events
    assert share_made.code not in body
    assert "hx-trigger=\"every 2s\"" not in body  # nothing is moving: no polling


def test_a_transferring_share_page_polls_until_the_transfer_ends(clerk_client, facility,
                                                                 clerk, node):
    from sharing.services import PacsStudy, PatientIdentity, Recipient, share_create

    made = share_create(
        facility=facility, created_by=clerk, recipient=Recipient(method=Share.Method.PRINT),
        patient_or_identity=PatientIdentity(name="LOVELACE^ADA", birth_date=ADA_DOB),
        pacs_studies=[PacsStudy(node=node, study_instance_uid="1.2.3.4", num_instances=5)],
    )
    body = clerk_client.get(f"/clerk/shares/{made.share.pk}/").content.decode()
    assert "Transfer in progress" in body
    assert f'hx-get="/clerk/shares/{made.share.pk}/live/"' in body
    live = clerk_client.get(f"/clerk/shares/{made.share.pk}/live/",
                            HTTP_HX_REQUEST="true").content.decode()
    assert "every 2s" in live and "Waiting" in live


def test_revoking_from_the_page_ends_access_and_is_audited(clerk_client, share_made, clerk):
    share = share_made.share
    response = clerk_client.post(f"/clerk/shares/{share.pk}/revoke/")
    assert response.status_code == 302
    share.refresh_from_db()
    assert share.is_revoked and share.status == Share.Status.REVOKED
    event = AuditEvent.objects.get(action="share.revoke", object_id=str(share.pk))
    assert event.actor_user == clerk and event.client_address == "127.0.0.1"
    assert clerk_client.get(f"/clerk/shares/{share.pk}/access-page.pdf").status_code == 404
    assert "Revoked on" in clerk_client.get(f"/clerk/shares/{share.pk}/").content.decode()


def test_revoking_needs_a_post(clerk_client, share_made):
    response = clerk_client.get(f"/clerk/shares/{share_made.share.pk}/revoke/")
    assert response.status_code == 405


def test_a_clerk_shares_ticked_archive_exams_with_a_fax_recipient(
        clerk_client, patient, studies, fax_gateway, clerk):
    page = clerk_client.get(f"/clerk/shares/new/?patient={patient.pk}").content.decode()
    assert "CHEST 2 VIEW" in page and "LOVELACE, ADA" in page
    assert page.index("CHEST 2 VIEW") < page.index("BREAST BILATERAL")  # newest first

    response = clerk_client.post("/clerk/shares/new/", {
        "step": "create", "patient": patient.pk,
        "studies": [studies[0].pk, studies[2].pk], "method": "fax", "attn": "Film Library",
        "institution": "Palm Beach MRI Clinic", "fax_number": "561-555-0142",
        "subject": "", "note": "",
    })

    share = Share.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/clerk/shares/{share.pk}/"
    assert {s.study_id for s in share.share_studies.all()} == {studies[0].pk, studies[2].pk}
    assert share.deliveries.get().address == "5615550142@fax.gateway.test"
    assert share.created_by == clerk


def test_the_new_share_form_says_what_is_missing(clerk_client, patient, studies,
                                                 fax_gateway):
    response = clerk_client.post("/clerk/shares/new/", {
        "step": "create", "patient": patient.pk, "method": "fax", "fax_number": "",
    })
    body = response.content.decode()
    assert response.status_code == 200
    assert "Tick at least one exam" in body
    assert "Enter the fax number" in body
    assert not Share.objects.exists()


def test_a_clerk_cannot_share_another_facilitys_patient(client, other_clerk, patient,
                                                        studies):
    sign_in(client, other_clerk)
    assert client.get(f"/clerk/shares/new/?patient={patient.pk}").status_code == 404
    response = client.post("/clerk/shares/new/", {
        "step": "create", "patient": patient.pk, "studies": [studies[0].pk],
        "method": "print"})
    assert response.status_code == 404
    assert not Share.objects.exists()


def hit(uid, description, date, images=20):
    return StudyHit(study_instance_uid=uid, study_date=date, study_time="",
                    patient_name="LOVELACE^ADA", patient_id="SMH-1815", birth_date=ADA_DOB,
                    sex="F", accession_number="", description=description,
                    modalities=("CT",), num_series=2, num_instances=images)


def test_ticked_pacs_results_posted_to_the_new_share_page_become_a_share(
        clerk_client, node, clerk):
    picks = [pick_encode(hit("1.2.3.1", "CT HEAD", datetime.date(2022, 2, 2)), node),
             pick_encode(hit("1.2.3.2", "CT CHEST", datetime.date(2023, 3, 3)), node)]

    # The PACS search page posts its ticked results here...
    page = clerk_client.post("/clerk/shares/new/", {"pick": picks}).content.decode()
    assert "CT HEAD" in page and "CT CHEST" in page and "LOVELACE, ADA" in page
    assert page.count('name="pick"') == 2 and page.count("checked") >= 2

    # ...and the clerk says who receives them.
    response = clerk_client.post("/clerk/shares/new/", {
        "step": "create", "pick": picks, "method": "patient"})

    share = Share.objects.get()
    assert response.status_code == 302
    assert share.status == Share.Status.TRANSFERRING
    assert share.patient_birth_date == ADA_DOB and share.patient_mrn == "SMH-1815"
    assert sorted(share.share_studies.values_list("study_instance_uid", flat=True)) == [
        "1.2.3.1", "1.2.3.2"]
    assert all(s.retrieve_id for s in share.share_studies.all())


def test_the_pacs_search_page_posts_its_ticked_results_to_the_new_share_page(
        clerk_client, node):
    """The PACS page keeps its results in the session; a button with
    ``formaction="/clerk/shares/new/"`` sends the ticked ``study_uids`` here."""
    session = clerk_client.session
    session["pacs_search_hits"] = {"node": node.pk, "hits": [
        hit("1.2.3.1", "CT HEAD", datetime.date(2022, 2, 2)).as_session(),
        hit("1.2.3.2", "CT CHEST", datetime.date(2023, 3, 3)).as_session(),
        hit("1.2.3.3", "CT SPINE", datetime.date(2021, 1, 1)).as_session(),
    ]}
    session.save()

    page = clerk_client.post("/clerk/shares/new/", {
        "study_uids": ["1.2.3.1", "1.2.3.2"]}).content.decode()

    assert "CT HEAD" in page and "CT CHEST" in page and "CT SPINE" not in page
    assert page.count('name="pick"') == 2
    tokens = re.findall(r'name="pick" value="([^"]+)"', page)
    clerk_client.post("/clerk/shares/new/", {"step": "create", "pick": tokens,
                                             "method": "print"})
    assert sorted(Share.objects.get().share_studies.values_list(
        "study_instance_uid", flat=True)) == ["1.2.3.1", "1.2.3.2"]


def test_a_study_no_longer_in_the_search_results_is_not_shared(clerk_client, node):
    session = clerk_client.session
    session["pacs_search_hits"] = {"node": node.pk, "hits": [
        hit("1.2.3.1", "CT HEAD", datetime.date(2022, 2, 2)).as_session()]}
    session.save()
    page = clerk_client.post("/clerk/shares/new/", {
        "study_uids": ["1.2.3.1", "9.9.9"]}).content.decode()
    assert page.count('name="pick"') == 1 and "could not be used" in page


def test_a_forged_or_foreign_pick_is_refused(clerk_client, node, other_facility):
    from dicomgw.models import PacsNode

    forged = signing.dumps({"f": node.facility_id, "n": node.pk, "u": "1.2.3", "d": "",
                            "t": "", "m": [], "i": None, "pn": "X^Y", "pid": "",
                            "dob": "2000-01-01"}, salt="some other salt")
    theirs = PacsNode.objects.create(facility=other_facility, name="Their PACS",
                                     ae_title="THEIRS", host="127.0.0.1", port=2)
    foreign = pick_encode(hit("1.2.3.3", "CT", None), theirs)
    for token in (forged, foreign, "not-a-token"):
        response = clerk_client.post("/clerk/shares/new/", {"pick": [token]})
        assert response.status_code == 400
        assert b"can no longer be used" in response.content
    assert signing.loads(pick_encode(hit("1", "", None), node), salt=SALT)["f"] == node.facility_id


def test_picks_of_two_patients_keep_only_the_first(clerk_client, node):
    ada = pick_encode(hit("1.2.3.1", "CT HEAD", datetime.date(2022, 2, 2)), node)
    other = StudyHit(**{**hit("1.2.3.2", "MR", None).__dict__, "patient_name": "BABBAGE^C"})
    page = clerk_client.post("/clerk/shares/new/", {
        "pick": [ada, pick_encode(other, node)]}).content.decode()
    assert page.count('name="pick"') == 1
    assert "could not be used" in page


def test_the_new_share_page_without_a_patient_explains_where_to_start(clerk_client):
    response = clerk_client.get("/clerk/shares/new/")
    assert response.status_code == 200
    assert b"Choose a patient first" in response.content
    assert clerk_client.get("/clerk/shares/new/?patient=abc").status_code == 404
