"""The cast of the DICOMweb tests: Ada's archive (a native CT series and a JPEG-LS MR
study, shared; an older MR study of hers, not shared), Charles's study in the same
facility with a share of its own, and clients for a recipient's session and a clerk,
either in process (Django's test client) or against the live server (dicomweb-client)."""

import datetime
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from django.conf import settings
from django.test import Client
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicomgw.models import IngestSource, Instance, Study
from dicomgw.services import ingest_file
from sharing.models import Share
from sharing.services import Recipient, share_create
from tests.conftest import sign_in

ADA = {"PatientName": "LOVELACE^ADA", "PatientID": "SMH-1815", "PatientBirthDate": "19810829"}
CHARLES = {"PatientName": "BABBAGE^CHARLES", "PatientID": "SMH-1791",
           "PatientBirthDate": "19311226"}
CT_SIZE = 32


def ct_slices(*, study_uid: str, count: int, who: dict, accession: str = "A-1",
              study_date: str = "20240102", modality: str = "CT",
              description: str = "CT HEAD") -> list[bytes]:
    """A native 16-bit series of ``count`` slices, each with its own pixels."""
    series_uid = generate_uid()
    files = []
    for index in range(count):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        for keyword, value in who.items():
            setattr(ds, keyword, value)
        ds.Modality, ds.StudyDate, ds.StudyTime = modality, study_date, "101500"
        ds.StudyDescription, ds.AccessionNumber = description, accession
        ds.SeriesNumber, ds.InstanceNumber = 2, index + 1
        ds.ImagePositionPatient = [0, 0, index * 2.5]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 2.5
        ds.Rows = ds.Columns = CT_SIZE
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        pixels = (np.arange(CT_SIZE * CT_SIZE, dtype=np.int16) * (index + 3)) % 2000 - 500
        ds.PixelData = pixels.astype("<i2").tobytes()
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        files.append(buffer.getvalue())
    return files


def rewritten(path: str | Path, **attributes) -> bytes:
    """A copy of a DICOM file with some attributes replaced; its pixel data, compressed
    or not, is written back as it was."""
    ds = dcmread(path)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def archive(facility, files) -> list[Instance]:
    """Ingest files (bytes or paths) as any import would; every one must be stored."""
    stored = []
    for item in files:
        if isinstance(item, bytes):
            outcome = ingest_file(facility=facility, fileobj=io.BytesIO(item),
                                  source=IngestSource.IMPORT)
        else:
            outcome = ingest_file(facility=facility, path=item, source=IngestSource.IMPORT)
        assert outcome.ok, (item if not isinstance(item, bytes) else "bytes", outcome.reason)
        stored.append(outcome.instance)
    return stored


def stored_bytes(instance: Instance) -> bytes:
    with instance.file.open("rb") as fh:
        return fh.read()


@dataclass
class AdaArchive:
    ct: Study            # native 16-bit CT, 3 slices, shared
    mr: Study            # JPEG-LS multi-frame MR, shared
    old: Study           # Ada's earlier MR, same patient ID, not shared
    charles: Study       # another patient of the same facility, in a share of its own


@pytest.fixture
def ada_archive(facility) -> AdaArchive:
    ct_uid, old_uid = generate_uid(), generate_uid()
    archive(facility, ct_slices(study_uid=ct_uid, count=3, who=ADA))
    mr_uid = generate_uid()
    archive(facility, [rewritten(
        get_testdata_file("emri_small_jpeg_ls_lossless.dcm"), **ADA,
        StudyInstanceUID=mr_uid, SeriesInstanceUID=generate_uid(), StudyDate="20230611",
        AccessionNumber="A-2", StudyDescription="MR KNEE")])
    archive(facility, ct_slices(study_uid=old_uid, count=1, who=ADA, modality="MR",
                                accession="A-0", study_date="20190304",
                                description="MR BRAIN"))
    charles_uid = generate_uid()
    archive(facility, ct_slices(study_uid=charles_uid, count=2, who=CHARLES, accession="B-1",
                                study_date="20240102"))
    studies = {s.study_instance_uid: s for s in Study.objects.all()}
    return AdaArchive(ct=studies[ct_uid], mr=studies[mr_uid], old=studies[old_uid],
                      charles=studies[charles_uid])


@pytest.fixture
def ada_share(facility, clerk, ada_archive):
    """A share of Ada's CT and MR (not her older MR), handed to her."""
    return share_create(facility=facility, patient_or_identity=ada_archive.ct.patient,
                        studies=[ada_archive.ct, ada_archive.mr],
                        recipient=Recipient(method=Share.Method.PATIENT), created_by=clerk)


@pytest.fixture
def charles_share(facility, clerk, ada_archive):
    return share_create(facility=facility, patient_or_identity=ada_archive.charles.patient,
                        studies=[ada_archive.charles],
                        recipient=Recipient(method=Share.Method.PATIENT), created_by=clerk)


def unlocked(client: Client, code: str, dob: str) -> Client:
    response = client.post("/view", {"code": code, "birth_date": dob})
    assert response.status_code == 303 and response["Location"] == "/view/inbox"
    return client


@pytest.fixture
def recipient(ada_share) -> Client:
    """A recipient's browser with Ada's share open."""
    return unlocked(Client(), ada_share.code, "1981/08/29")


def recipient_cookie(client: Client) -> str:
    return client.cookies[settings.RECIPIENT_SESSION_COOKIE_NAME].value


def live_session(cookie_name: str, cookie_value: str) -> requests.Session:
    session = requests.Session()
    session.headers["Cookie"] = f"{cookie_name}={cookie_value}"
    return session


@pytest.fixture
def clerk_session(client, clerk) -> requests.Session:
    """The clerk's signed-in (password and TOTP) staff session, for the live server."""
    sign_in(client, clerk)
    return live_session(settings.SESSION_COOKIE_NAME,
                        client.cookies[settings.SESSION_COOKIE_NAME].value)


def dicom_date(text: str) -> datetime.date:
    return datetime.datetime.strptime(text, "%Y%m%d").date()
