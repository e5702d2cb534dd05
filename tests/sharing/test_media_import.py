"""What a recipient downloads from the Share Inbox imports into their own PACS as it is:
the share's ZIP, extracted, is sent by dcmtk's storescu (scanning the folder, as a PACS
administrator would) into a real Orthanc, which then holds every instance of every
exam, each in the transfer syntax it was archived in."""

import subprocess

import pytest
from django.test import Client

from dicomgw.models import Instance, Study
from sharing.models import Share
from sharing.services import Recipient, share_create
from tests.dicomgw.conftest import PEER_ENV, orthanc, scp_port  # noqa: F401
from tests.dicomgw.test_media import extract, ingest_folder, storescu_config

from .test_recipient import open_inbox


@pytest.mark.parametrize("folder", [
    "cd_ihe_pdi_hitachi_mr_jp",  # 67 MR images of a Japanese patient's CD
    "transfer_syntaxes_siemens_trio",  # one image in nine transfer syntaxes
])
def test_a_shared_zip_extracted_imports_every_instance_into_orthanc(
        folder, facility, clerk, testdata_dir, orthanc, tmp_path):  # noqa: F811
    archived = ingest_folder(facility, testdata_dir / folder)
    [study] = Study.objects.filter(facility=facility)
    made = share_create(facility=facility, patient_or_identity=study.patient, studies=[study],
                        recipient=Recipient(method=Share.Method.PATIENT), created_by=clerk)
    client = Client()
    open_inbox(client, made.code, study.patient.birth_date.strftime("%Y/%m/%d"))
    exams = list(made.share.share_studies.values_list("pk", flat=True))
    response = client.post("/view/download", {"format": "zip", "exam": exams})
    assert response.status_code == 200, response.content[:500]
    body = b"".join(response.streaming_content)
    assert len(body) == int(response["Content-Length"])
    root = extract(body, tmp_path / "out")
    assert sorted(p.name for p in root.iterdir()) == [
        "DICOMDIR", "IMAGES", "README.TXT", "SHA256SUMS"]
    checked = subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=root,
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    config = storescu_config(root / "IMAGES", tmp_path / "storescu.cfg")
    sent = subprocess.run(
        ["storescu", "--scan-directories", "--recurse", "--scan-pattern", "IM*",
         "--config-file", str(config), "Media", "-aec", orthanc.ae_title, orthanc.host,
         str(orthanc.port), str(root / "IMAGES")],
        capture_output=True, text=True, env=PEER_ENV, timeout=300)
    assert sent.returncode == 0, sent.stdout + sent.stderr

    in_orthanc = orthanc.instance_ids(study.study_instance_uid)
    assert set(in_orthanc) == {instance.sop_instance_uid for instance in archived}
    syntaxes = dict(Instance.objects.filter(series__study=study)
                    .values_list("sop_instance_uid", "transfer_syntax_uid"))
    for sop_instance_uid, orthanc_id in in_orthanc.items():
        assert orthanc.transfer_syntax(orthanc_id) == syntaxes[sop_instance_uid]
