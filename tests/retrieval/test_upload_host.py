"""A facility's own upload host name: printed on its Request Pages, and on that host the
server is only the facility's upload portal."""

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.test import Client

from pockethealth.models import Facility
from retrieval.middleware import facility_hosts_forget
from retrieval.services import upload_address, upload_link
from tests.sharing.conftest import pdf_png, pdf_text, qr_payloads

from .test_request_page import flat, page_bytes

HOST = "upload.st-anthony.example"


@pytest.fixture(autouse=True)
def own_host(settings, facility):
    settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, HOST, "upload.palm-beach.example"]
    facility.upload_host = " Upload.St-Anthony.Example "
    facility.save()
    facility_hosts_forget()
    yield facility
    facility_hosts_forget()


def test_the_request_page_prints_the_host_name_and_its_qr_code_leads_there(
        record_request, facility, tmp_path):
    assert facility.upload_host == HOST  # kept as host names are compared: lower case
    made, pin, token = record_request()
    pdf = page_bytes(made)
    text = flat(pdf_text(pdf, tmp_path))
    assert HOST in text and "/upload/st-anthony" not in text.replace("/ ", "/")
    assert upload_address(facility) == f"https://{HOST}"
    assert qr_payloads(pdf_png(pdf, tmp_path, dpi=200)) == [upload_link(made, token)]
    assert upload_link(made, token) == f"https://{HOST}?t={token}"


def test_the_host_leads_to_the_portal_and_the_qr_link_opens_the_request(record_request):
    made, pin, token = record_request()
    client = Client(HTTP_HOST=HOST)
    response = client.get("/")
    assert response.status_code == 302 and response["Location"] == "/upload/st-anthony"
    response = client.get("/", {"t": token})
    assert response["Location"] == f"/upload/st-anthony?t={token}"
    page = client.get(response["Location"], follow=True)
    assert page.status_code == 200
    assert page.redirect_chain[-1][0] == "/upload/st-anthony/request"
    assert "ANTHONY" in page.content.decode()
    # With the PIN, on a fresh browser, the same.
    other = Client(HTTP_HOST=HOST)
    assert other.get("/upload/st-anthony").status_code == 200
    response = other.post("/upload/st-anthony", {"pin": pin}, follow=True)
    assert response.redirect_chain[-1][0] == "/upload/st-anthony/request"
    assert "ANTHONY" in response.content.decode()


@pytest.mark.parametrize("path", ["/clerk/", "/admin/", "/view", "/upload/palm-beach",
                                  "/clerk/requests/"])
def test_on_the_host_nothing_but_the_portal_is_served(path, other_facility):
    response = Client(HTTP_HOST=HOST).get(path)
    assert response.status_code == 302 and response["Location"] == "/upload/st-anthony"


def test_the_main_site_and_other_hosts_are_unchanged(other_facility):
    assert Client().get("/upload/st-anthony").status_code == 200
    assert Client().get("/upload/palm-beach").status_code == 200
    # A host listed for the server but no facility's: the site as usual.
    response = Client(HTTP_HOST="upload.palm-beach.example").get("/upload/palm-beach")
    assert response.status_code == 200


def test_host_names_are_checked_and_belong_to_one_facility(facility, other_facility):
    for wrong in ("https://upload.example.org", "upload.example.org/portal", "upload",
                  "-upload.example.org", "upload..example.org", "up load.example.org"):
        other_facility.upload_host = wrong
        with pytest.raises(ValidationError):
            other_facility.full_clean()
    other_facility.upload_host = HOST
    with pytest.raises(IntegrityError), transaction.atomic():
        other_facility.save()
    # Without a host name, any number of facilities.
    Facility.objects.create(name="Third", short_name="third-clinic")
    assert Facility.objects.filter(upload_host="").count() == 2
