"""A clerk signs in with a password and an authenticator code in Chromium and sees the
demo patients."""

from django.core.management import call_command
from django_otp.plugins.otp_totp.models import TOTPDevice

from pockethealth.models import StaffUser
from tests.conftest import totp_now


def test_clerk_signs_in_with_otp_and_sees_the_demo_patients(page, transactional_db,
                                                            artifacts_dir):
    call_command("demo_setup", "--no-studies", stdout=open("/dev/null", "w"))
    call_command("demo_studies", "--facility", "lakeshore", "--ct-slices", "12",
                 stdout=open("/dev/null", "w"))
    clerk = StaffUser.objects.get(username="clerk")

    page.goto("/clerk/archive/")
    assert "/account/login/" in page.url
    page.get_by_label("User name").fill("clerk")
    page.get_by_label("Password").fill("demo-clerk-password")
    page.get_by_role("button", name="Continue").click()
    page.wait_for_url("**/account/verify/**")
    device = TOTPDevice.objects.get(user=clerk, confirmed=True)
    page.get_by_label("Code").fill(totp_now(device))
    page.get_by_role("button", name="Verify and sign in").click()
    page.wait_for_url("**/clerk/archive/")

    table = page.get_by_role("table")
    for family in ("TREMBLAY", "OKAFOR", "NGUYEN"):
        assert family in table.inner_text()
    page.screenshot(path=artifacts_dir / "clerk-patients.png", full_page=True)

    page.get_by_role("link", name="TREMBLAY", exact=False).first.click()
    page.wait_for_url("**/clerk/archive/patients/**")
    assert page.get_by_role("table").count() >= 1
    page.screenshot(path=artifacts_dir / "clerk-patient.png", full_page=True)
