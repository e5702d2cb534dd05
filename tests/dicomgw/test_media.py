"""The DICOMDIR and the ZIP download (dicomgw.media), checked with the readers a
recipient would use: Python's zipfile, pydicom's FileSet, dcmtk's dcmdump and storescu
into a real Orthanc."""

import hashlib
import io
import os
import subprocess
import sys
import time
import tracemalloc
import zipfile
from datetime import date
from datetime import time as dtime
from pathlib import Path

import pytest
from django.conf import settings
from django.core.files.base import ContentFile
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.fileset import FileSet
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
    MRImageStorage,
    generate_uid,
)
from zipstream import ZipStream

from dicomgw.media import (
    IMPLEMENTATION_CLASS_UID,
    Dicomdir,
    MediaError,
    MediaFile,
    MediaPlan,
    PlannedInstance,
    PlannedPatient,
    PlannedSeries,
    PlannedStudy,
    derived_uid,
    dicomdir_bytes,
    image_record,
    image_record_length,
    leaf_record_type,
    media_name,
    media_plan,
    patient_record,
    series_record,
    study_record,
    zip_chunks,
    zip_entries,
    zip_length,
    zip_response,
)
from dicomgw.models import IngestSource, Instance, Patient, Series, Study
from dicomgw.services import ingest_file

from .conftest import PEER_ENV


def dicom_paths(folder: Path) -> list[Path]:
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(path, "rb") as fh:
            head = fh.read(132)
        if head[128:132] == b"DICM" and path.name != "DICOMDIR":
            found.append(path)
    return found


def ingest_folder(facility, folder: Path) -> list[Instance]:
    instances = []
    for path in dicom_paths(folder):
        outcome = ingest_file(facility=facility, path=path, source=IngestSource.IMPORT)
        assert outcome.ok, (path, outcome.reason)
        instances.append(outcome.instance)
    return instances


CORPUS = ("cd_ihe_pdi_hitachi_mr_jp", "transfer_syntaxes_siemens_trio",
          "mr_vendor_series/philips_achieva_fmri")


@pytest.fixture
def corpus_studies(facility, testdata_dir) -> list[Study]:
    """The Japanese patient CD, one image in nine transfer syntaxes, and the Philips fMRI
    series whose Study ID is empty."""
    for folder in CORPUS:
        ingest_folder(facility, testdata_dir / folder)
    return list(Study.objects.filter(facility=facility))


def download(response) -> bytes:
    return b"".join(response.streaming_content)


def extract(data: bytes, into: Path) -> Path:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        archive.extractall(into)
    [root] = list(into.iterdir())
    return root


def test_media_name_is_ascii_with_safe_characters_only():
    assert media_name("IMAGES", "Gagné") == "IMAGES_Gagne"
    assert media_name("IMAGES", "O'Brien-Smith") == "IMAGES_OBrien-Smith"
    assert media_name("ISO", "van der Berg") == "ISO_van_der_Berg"
    assert media_name("IMAGES", "../../etc/passwd") == "IMAGES_etcpasswd"
    assert media_name("IMAGES", "ﾌﾙﾊｼ") == "IMAGES_Patient"
    assert media_name("IMAGES", "") == "IMAGES_Patient"


def test_zip_of_real_studies_reads_back_with_fileset_and_dcmdump(corpus_studies, tmp_path):
    response = zip_response(studies=corpus_studies, patient_last_name="Furuhashi",
                            include_viewer=False)
    assert response["Content-Disposition"] == 'attachment; filename="IMAGES_Furuhashi.zip"'
    assert response["Cache-Control"] == "no-store"
    assert response["Content-Type"] == "application/zip"
    data = download(response)
    assert int(response["Content-Length"]) == len(data)

    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = archive.infolist()
        assert all(info.compress_type == zipfile.ZIP_STORED for info in infos)
        names = [info.filename for info in infos]
    archived = list(Instance.objects.filter(series__study__in=corpus_studies))
    assert len(archived) == 67 + 9 + 27
    expected_images = [f"IMAGES_Furuhashi/IMAGES/DICOMS/IM{n}" for n in
                       range(1, len(archived) + 1)]
    assert sorted(n for n in names if "/IMAGES/" in n) == sorted(expected_images)
    assert {"IMAGES_Furuhashi/DICOMDIR", "IMAGES_Furuhashi/README.TXT",
            "IMAGES_Furuhashi/SHA256SUMS"} <= set(names)
    assert not any("IHE_PDI" in n or n.endswith("INDEX.HTM") for n in names)

    root = extract(data, tmp_path / "out")
    fileset = FileSet(root / "DICOMDIR")
    assert len(fileset) == len(archived)
    by_uid = {instance.sop_instance_uid: instance for instance in archived}
    for item in fileset:
        path = Path(item.path)
        assert path.is_file()
        assert path.relative_to(root).as_posix() == "/".join(item.ReferencedFileID)
        instance = by_uid.pop(item.SOPInstanceUID)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == instance.sha256
        assert item.ReferencedTransferSyntaxUIDInFile == instance.transfer_syntax_uid
    assert not by_uid

    # Every key type 1 in PS3.3 F.5 has a value, even where the file has none.
    records = dcmread(root / "DICOMDIR").DirectoryRecordSequence
    study_records = [r for r in records if r.DirectoryRecordType == "STUDY"]
    assert len(study_records) == 3
    assert all(r.StudyID and r.StudyDate and r.StudyTime for r in study_records)
    philips = Study.objects.get(patient__patient_id="phantom")
    assert philips.study_id == ""
    philips_items = fileset.find(StudyInstanceUID=philips.study_instance_uid)
    assert len(philips_items) == 27
    assert philips_items[0].StudyID == philips.accession_number[:16] or philips_items[0].StudyID

    # The Japanese name keeps its kanji group through the DICOMDIR's character set.
    assert any("古橋^大地" in str(v) for v in fileset.find_values("PatientName"))

    dump = subprocess.run(["dcmdump", "-q", str(root / "DICOMDIR")], capture_output=True,
                          text=True, errors="replace", timeout=60)
    assert dump.returncode == 0, dump.stderr
    assert dump.stdout.count('"Directory Record" IMAGE') == len(archived)

    sums = (root / "SHA256SUMS").read_text().splitlines()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    assert len(sums) == len(files)
    for line in sums:
        digest, relative = line.split("  ", 1)
        assert hashlib.sha256((root / relative).read_bytes()).hexdigest() == digest
    check = subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=root,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    readme = (root / "README.TXT").read_bytes()
    assert readme.isascii() and b"\r\n" in readme
    assert settings.PRODUCT_NAME.encode() in readme and b"SHA256SUMS" in readme


def test_dcmmkdir_takes_our_dicomdir_as_its_own(facility, testdata_dir, tmp_path):
    """dcmtk's dcmmkdir, asked to update our DICOMDIR from the same files, finds every
    file already recorded and consistent: it adds nothing and warns of nothing."""
    ingest_folder(facility, testdata_dir / "cd_ihe_pdi_hitachi_mr_jp")
    root = extract(download(zip_response(studies=Study.objects.filter(facility=facility),
                                         patient_last_name="Furuhashi", include_viewer=False)),
                   tmp_path / "out")
    result = subprocess.run(["dcmmkdir", "-v", "+U", "+id", ".", "+D", "DICOMDIR", "+r",
                             "IMAGES"], cwd=root, capture_output=True, text=True,
                            errors="replace", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert "W:" not in output and "E:" not in output, output
    dump = subprocess.run(["dcmdump", "-q", str(root / "DICOMDIR")], capture_output=True,
                          text=True, errors="replace")
    assert dump.stdout.count('"Directory Record" IMAGE') == 67
    assert dump.stdout.count('"Directory Record" STUDY') == 1


def test_extracted_zip_imports_into_orthanc_with_storescu(corpus_studies, tmp_path, orthanc):
    root = extract(download(zip_response(studies=corpus_studies, patient_last_name="Import",
                                         include_viewer=False)), tmp_path / "out")
    config = storescu_config(root / "IMAGES", tmp_path / "storescu.cfg")
    result = subprocess.run(
        ["storescu", "+sd", "+r", "--scan-pattern", "IM*", "--config-file", str(config),
         "Media", "-aec", orthanc.ae_title, orthanc.host, str(orthanc.port),
         str(root / "IMAGES")],
        capture_output=True, text=True, env=PEER_ENV, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    for study in corpus_studies:
        expected = set(Instance.objects.filter(series__study=study)
                       .values_list("sop_instance_uid", flat=True))
        assert orthanc.sop_uids(study.study_instance_uid) == expected


def storescu_config(folder: Path, path: Path) -> Path:
    """A storescu association profile "Media" proposing each SOP class with the transfer
    syntaxes its files are in, so that every file is sent as it is: storescu on its own
    proposes uncompressed syntaxes and one compressed family at most."""
    pairs = set()
    for file in folder.rglob("IM*"):
        meta = dcmread(file, stop_before_pixels=True).file_meta
        pairs.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
    syntaxes = sorted({syntax for _sop, syntax in pairs})
    lines = ["[[TransferSyntaxes]]"]
    for number, syntax in enumerate(syntaxes, start=1):
        lines += [f"[TS{number}]", f"TransferSyntax1 = {syntax}"]
    lines += ["[[PresentationContexts]]", "[Media]"]
    for number, (sop_class, syntax) in enumerate(sorted(pairs), start=1):
        ts_number = syntaxes.index(syntax) + 1
        lines.append(f"PresentationContext{number} = {sop_class}\\TS{ts_number}")
    lines += ["[[Profiles]]", "[Media]", "PresentationContexts = Media"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_zip_with_viewer_puts_it_under_ihe_pdi_and_links_it(corpus_studies, tmp_path):
    viewer = tmp_path / "viewer"
    (viewer / "assets").mkdir(parents=True)
    (viewer / "index.html").write_text("<html><body>viewer</body></html>")
    (viewer / "assets" / "viewer-bundle.min.js").write_text("console.log('offline');")
    (viewer / ".cache").write_text("left out")
    data = download(zip_response(studies=corpus_studies[:1], patient_last_name="Viewer",
                                 include_viewer=True, viewer_dir=viewer))
    root = extract(data, tmp_path / "out")
    assert (root / "IHE_PDI" / "index.html").read_bytes() == (viewer / "index.html").read_bytes()
    assert (root / "IHE_PDI" / "assets" / "viewer-bundle.min.js").is_file()
    assert not (root / "IHE_PDI" / ".cache").exists()
    index = (root / "INDEX.HTM").read_text()
    assert 'href="IHE_PDI/index.html"' in index
    assert "<script" not in index
    sums = (root / "SHA256SUMS").read_text()
    assert "IHE_PDI/assets/viewer-bundle.min.js" in sums and "INDEX.HTM" in sums


def bare_file(path: Path, name: str, **extra) -> Path:
    """An MR instance with nothing but its UIDs, a name and ``extra``."""
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = name
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


def test_files_lacking_type_1_keys_still_get_a_record(facility, tmp_path):
    """Files with no Patient ID, Study ID, study date, Modality, series or instance
    numbers (all type 1 in PS3.3 F.5): they go on the media untouched and their records
    carry derived keys; a study date comes from the series date when there is one."""
    for path in (bare_file(tmp_path / "a.dcm", "Aaa^Nobody"),
                 bare_file(tmp_path / "b.dcm", "Bbb^Nobody", SeriesDate="20240305",
                           SeriesTime="141500")):
        outcome = ingest_file(facility=facility, path=path, source=IngestSource.IMPORT)
        assert outcome.ok, outcome.reason

    root = extract(download(zip_response(studies=Study.objects.filter(facility=facility),
                                         patient_last_name="Nobody", include_viewer=False)),
                   tmp_path / "out")
    fileset = FileSet(root / "DICOMDIR")
    first, second = sorted(fileset, key=lambda item: str(item.PatientName))
    # A FileInstance answers with its own record's keys and then its ancestors'.
    assert (first.PatientID, second.PatientID) == ("NOID1", "NOID2")
    assert (first.StudyDate, first.StudyTime) == ("19000101", "000000")
    assert (second.StudyDate, second.StudyTime) == ("20240305", "141500")
    assert first.StudyID and second.StudyID
    assert (first.Modality, first.SeriesNumber, first.InstanceNumber) == ("OT", 1, 1)
    for item in (first, second):
        archived = Instance.objects.get(sop_instance_uid=item.SOPInstanceUID)
        assert Path(item.path).read_bytes() == Path(archived.file.path).read_bytes()


def test_reports_and_waveforms_get_their_own_record_types(facility, testdata_dir, tmp_path):
    ingest_folder(facility, testdata_dir / "encapsulation_variants" / "deflate")
    root = extract(download(zip_response(studies=Study.objects.filter(facility=facility),
                                         patient_last_name="Deflate", include_viewer=False)),
                   tmp_path / "out")
    fileset = FileSet(root / "DICOMDIR")
    kinds = sorted(item.DirectoryRecordType for item in fileset)
    assert kinds == ["IMAGE", "SR DOCUMENT", "WAVEFORM"]
    for item in fileset:
        assert Path(item.path).is_file()


def test_leaf_record_type_follows_the_sop_class():
    assert leaf_record_type("1.2.840.10008.5.1.4.1.1.88.22") == "SR DOCUMENT"
    assert leaf_record_type("1.2.840.10008.5.1.4.1.1.9.1.1") == "WAVEFORM"
    assert leaf_record_type("1.2.840.10008.5.1.4.1.1.11.1") == "PRESENTATION"
    assert leaf_record_type("1.2.840.10008.5.1.4.1.1.481.2") == "RT DOSE"
    assert leaf_record_type("1.2.840.10008.5.1.4.1.1.88.59") == "KEY OBJECT DOC"
    assert leaf_record_type("1.2.840.10008.5.1.4.1.1.104.1") == "ENCAP DOC"
    assert leaf_record_type("1.2.840.10008.5.1.4.1.1.2") == "IMAGE"
    assert leaf_record_type("1.2.3.4.5.6.private") == "IMAGE"


# --- The record encoder against pydicom's ---------------------------------------------


def pydicom_encoding(**elements) -> bytes:
    ds = Dataset()
    ds.OffsetOfTheNextDirectoryRecord = 0
    ds.RecordInUseFlag = 0xFFFF
    ds.OffsetOfReferencedLowerLevelDirectoryEntity = 0
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def sample_instance(number: int = 7) -> PlannedInstance:
    return PlannedInstance(
        instance_id=1, storage_name="x", size=10, sha256="0" * 64,
        sop_class_uid=MRImageStorage, sop_instance_uid="1.2.826.0.1.3680043.8.498.1234567",
        transfer_syntax_uid="1.2.840.10008.1.2.4.70", instance_number=number,
        path=f"IMAGES/DICOMS/IM{number}")


def test_records_are_encoded_as_pydicom_encodes_them():
    patient = PlannedPatient(name="ﾌﾙﾊｼ^ﾀｲﾁ=古橋^大地", display_name="", patient_id="0000110231",
                             birth_date="19800101", sex="M")
    assert patient_record(patient)[8:] == pydicom_encoding(
        DirectoryRecordType="PATIENT", SpecificCharacterSet="ISO_IR 192",
        PatientName="ﾌﾙﾊｼ^ﾀｲﾁ=古橋^大地", PatientID="0000110231", PatientBirthDate="19800101",
        PatientSex="M")
    latin = PlannedPatient(name="Gagné^Étienne", display_name="", patient_id="2206184",
                           birth_date="", sex="")
    assert patient_record(latin)[8:] == pydicom_encoding(
        DirectoryRecordType="PATIENT", SpecificCharacterSet="ISO_IR 100",
        PatientName="Gagné^Étienne", PatientID="2206184")
    study = PlannedStudy(study_pk=1, study_instance_uid="1.2.3.4", date="20180107",
                         time="110526", description="IRM CERVEAU", accession_number="",
                         study_id="4871", modalities="MR")
    assert study_record(study)[8:] == pydicom_encoding(
        DirectoryRecordType="STUDY", StudyDate="20180107", StudyTime="110526",
        AccessionNumber="", StudyDescription="IRM CERVEAU", StudyInstanceUID="1.2.3.4",
        StudyID="4871")
    series = PlannedSeries(series_instance_uid="1.2.3.4.5", modality="MR", series_number=12,
                           description="T2 SAG")
    assert series_record(series)[8:] == pydicom_encoding(
        DirectoryRecordType="SERIES", Modality="MR", SeriesDescription="T2 SAG",
        SeriesInstanceUID="1.2.3.4.5", SeriesNumber=12)
    for number in (7, 10):  # odd and even lengths, so both paddings are checked
        instance = sample_instance(number)
        instance.sop_instance_uid += "1" * (number % 2)
        assert image_record(instance)[8:] == pydicom_encoding(
            DirectoryRecordType="IMAGE", ReferencedFileID=["IMAGES", "DICOMS", f"IM{number}"],
            ReferencedSOPClassUIDInFile=instance.sop_class_uid,
            ReferencedSOPInstanceUIDInFile=instance.sop_instance_uid,
            ReferencedTransferSyntaxUIDInFile=instance.transfer_syntax_uid,
            InstanceNumber=number)


def test_file_meta_and_file_set_uid_are_what_pydicom_writes():
    plan = synthetic_plan(3)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    meta.MediaStorageSOPInstanceUID = plan.file_set_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "PH_MEDIA_1"
    buffer = DicomBytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    assert dicomdir_bytes(plan).startswith(buffer.getvalue())
    assert IMPLEMENTATION_CLASS_UID == PYDICOM_IMPLEMENTATION_UID
    sources = ["media file-set", "0123456789abcdef"]
    assert derived_uid(*sources) == generate_uid(entropy_srcs=sources)
    assert len(plan.file_set_uid) <= 64


@pytest.mark.parametrize("count", [1, 2, 249, 250, 251, 1001])
def test_the_dicomdir_is_as_long_as_its_layout_says_before_it_is_encoded(count):
    plan = synthetic_plan(count)
    for n, instance in enumerate(plan.instances):  # odd and even lengths of each value
        instance.sop_instance_uid += "9" * (n % 2)
        instance.instance_number = 10 ** (n % 4)
    assert all(image_record_length(i) == len(image_record(i)) for i in plan.instances)
    dicomdir = Dicomdir(plan)
    data = b"".join(dicomdir.chunks())
    assert len(data) == dicomdir.size
    ds = dcmread(io.BytesIO(data))
    records = ds.DirectoryRecordSequence
    assert len(records) == 2 + len(plan.patients[0].studies[0].series) + count
    # Every offset points at the start of a record (PS3.3 F.3.2.1).
    starts = {record.seq_item_tell for record in records}
    for record in records:
        for offset in (record.OffsetOfTheNextDirectoryRecord,
                       record.OffsetOfReferencedLowerLevelDirectoryEntity):
            assert offset == 0 or offset in starts
    images = [r for r in records if r.DirectoryRecordType == "IMAGE"]
    assert [r.ReferencedSOPInstanceUIDInFile for r in images] == [
        i.sop_instance_uid for i in plan.instances]


# --- Linear time ---------------------------------------------------------------------


def synthetic_plan(count: int, per_series: int = 250) -> MediaPlan:
    instances, series_list = [], []
    for first in range(0, count, per_series):
        series = PlannedSeries(series_instance_uid=f"1.2.826.0.1.3680043.8.498.9.{first}",
                               modality="CT", series_number=first // per_series + 1,
                               description="AX 1.0")
        for n in range(first, min(count, first + per_series)):
            instance = PlannedInstance(
                instance_id=n, storage_name=f"s/{n}.dcm", size=1000, sha256="0" * 64,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                sop_instance_uid=f"1.2.826.0.1.3680043.8.498.{n + 1}.1234567890123456",
                transfer_syntax_uid="1.2.840.10008.1.2.1", instance_number=n + 1,
                path=f"IMAGES/DICOMS/IM{n + 1}")
            series.instances.append(instance)
            instances.append(instance)
        series_list.append(series)
    study = PlannedStudy(study_pk=1, study_instance_uid="1.2.3", date="20240101",
                         time="080000", description="CT", accession_number="A1",
                         study_id="1", modalities="CT", series=series_list)
    patient = PlannedPatient(name="Doe^Jane", display_name="DOE, Jane", patient_id="1",
                             birth_date="", sex="", studies=[study])
    return MediaPlan(patients=[patient], instances=instances, facility_name="X", study_pks=[1])


def best_time(plan: MediaPlan, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        dicomdir_bytes(plan)
        times.append(time.perf_counter() - started)
    return min(times)


def test_dicomdir_of_ten_thousand_images_is_built_in_linear_time(tmp_path):
    ten, twenty = synthetic_plan(10_000), synthetic_plan(20_000)
    ten_seconds, twenty_seconds = best_time(ten), best_time(twenty)
    assert ten_seconds < 1.5, ten_seconds
    # Twice the images, about twice the time (quadratic would be four times).
    assert twenty_seconds < 3 * ten_seconds, (ten_seconds, twenty_seconds)

    path = tmp_path / "DICOMDIR"
    path.write_bytes(dicomdir_bytes(ten))
    dump = subprocess.run(["dcmdump", "-q", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert dump.returncode == 0, dump.stderr[-2000:]
    assert dump.stdout.count('"Directory Record" IMAGE') == 10_000
    ds = dcmread(path)
    records = ds.DirectoryRecordSequence
    assert len(records) == 1 + 1 + 40 + 10_000
    # The last image of the last series ends its chain; the patient starts the root's.
    assert records[-1].OffsetOfTheNextDirectoryRecord == 0
    assert ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity == records[0].seq_item_tell


# --- Streaming -----------------------------------------------------------------------


def test_zip_streams_at_once_in_constant_memory(facility, testdata_dir):
    """Thousands of archived instances (rows pointing at copies of one real file): the
    response is ready before any image is read, and streaming 300 MB holds only a few
    chunks in memory."""
    template = ingest_file(facility=facility, source=IngestSource.IMPORT,
                           path=testdata_dir / "transfer_syntaxes_siemens_trio" / "1.dcm").instance
    series = template.series
    blob = b"\0" * 128 + b"DICM" + bytes(1024 * 1024 - 132)
    name = template.file.storage.save("big/blob.dcm", ContentFile(blob))
    digest = hashlib.sha256(blob).hexdigest()
    Instance.objects.bulk_create(
        Instance(facility=facility, series=series, sop_instance_uid=f"1.2.3.{n}",
                 sop_class_uid=MRImageStorage, transfer_syntax_uid=ExplicitVRLittleEndian,
                 instance_number=100 + n, file=name, size=len(blob), sha256=digest,
                 source=IngestSource.IMPORT)
        for n in range(300))
    studies = list(Study.objects.filter(facility=facility))

    started = time.perf_counter()
    response = zip_response(studies=studies, patient_last_name="Big", include_viewer=False)
    first = next(iter(response.streaming_content))
    assert first.startswith(b"PK\x03\x04")
    assert time.perf_counter() - started < 1.0

    tracemalloc.start()
    streamed = len(first)
    for chunk in response.streaming_content:
        streamed += len(chunk)
    _current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert streamed == int(response["Content-Length"])
    assert streamed > 300 * 1024 * 1024
    assert peak < 16 * 1024 * 1024, peak


def test_the_images_go_first_and_the_dicomdir_after_them(corpus_studies):
    """Nothing but the plan stands before the first image: the DICOMDIR, which is encoded
    from it, follows the images; SHA256SUMS, which counts the DICOMDIR's digest as it
    goes out, comes last."""
    data = download(zip_response(studies=corpus_studies[:1], patient_last_name="Order",
                                 include_viewer=False))
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = [info.filename.split("/", 1)[1] for info in archive.infolist()]
        sums = archive.read("IMAGES_Order/SHA256SUMS").decode()
        dicomdir = archive.read("IMAGES_Order/DICOMDIR")
    images = [n for n in names if n.startswith("IMAGES/DICOMS/IM")]
    assert names == ["README.TXT", *images, "DICOMDIR", "SHA256SUMS"]
    assert f"{hashlib.sha256(dicomdir).hexdigest()}  DICOMDIR" in sums


def test_the_download_side_loads_neither_pydicom_nor_numpy():
    """A web process that streams ZIPs (and pages of the inbox) holds no DICOM toolkit,
    numpy, PDF renderer or DIMSE stack: those load where DICOM is read, a PDF rendered or
    a PACS asked."""
    probe = ("import sys, django; django.setup(); "
             "import dicomgw.media, dicomgw.media_views, dicomgw.views, sharing.views, "
             "sharing.recipient_views; "
             # Every URL of the site resolved, as a web process does at its first request.
             "from django.urls import get_resolver; get_resolver().url_patterns; "
             "from django.urls import resolve; resolve('/view/dicomweb/studies'); "
             "print(sorted(m for m in ('pydicom', 'numpy', 'weasyprint', 'pynetdicom') "
             "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            cwd=settings.BASE_DIR, timeout=120,
                            env={**os.environ, "DJANGO_SETTINGS_MODULE": "pockethealth.settings"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout


def test_a_zip_stops_rather_than_send_a_file_that_changed_size(facility, testdata_dir):
    outcome = ingest_file(facility=facility, source=IngestSource.IMPORT,
                          path=testdata_dir / "transfer_syntaxes_siemens_trio" / "1.dcm")
    with open(outcome.instance.file.path, "ab") as fh:
        fh.write(b"tampered")
    response = zip_response(studies=Study.objects.filter(facility=facility),
                            patient_last_name="X", include_viewer=False)
    with pytest.raises(MediaError):
        download(response)


def test_plan_orders_by_patient_study_series_and_instance(facility):
    from dicomgw.services import patient_identity_key

    patient = Patient.objects.create(
        facility=facility, patient_id="P1", name="Doe^Jane", name_search="doe jane",
        identity_key=patient_identity_key(patient_id="P1", issuer="", name="Doe^Jane",
                                          birth_date=None))
    studies = []
    for day, uid in ((date(2024, 5, 1), "1.1"), (date(2020, 1, 1), "1.2")):
        study = Study.objects.create(facility=facility, patient=patient, study_instance_uid=uid,
                                     study_date=day, study_time=dtime(9, 30))
        studies.append(study)
        for number in (2, None, 1):
            series = Series.objects.create(study=study, series_instance_uid=f"{uid}.{number}",
                                           modality="CT", series_number=number)
            for instance_number in (3, 1, None):
                Instance.objects.create(
                    facility=facility, series=series,
                    sop_instance_uid=f"{uid}.{number}.{instance_number}",
                    sop_class_uid=MRImageStorage, transfer_syntax_uid=ExplicitVRLittleEndian,
                    instance_number=instance_number, file="x.dcm", size=1, sha256="0" * 64,
                    source=IngestSource.IMPORT)
    plan = media_plan(studies=studies)
    [planned_patient] = plan.patients
    assert [s.study_instance_uid for s in planned_patient.studies] == ["1.2", "1.1"]
    first = planned_patient.studies[0]
    assert [s.series_number for s in first.series] == [1, 2, 3]
    assert [i.instance_number for i in first.series[0].instances] == [1, 3, 4]
    assert [i.path for i in plan.instances[:3]] == [
        "IMAGES/DICOMS/IM1", "IMAGES/DICOMS/IM2", "IMAGES/DICOMS/IM3"]
    assert first.time == "093000"


# --- The announced length ----------------------------------------------------------------


def fake_files(sizes, prefix="IMAGES/DICOMS/IM") -> list[MediaFile]:
    return [MediaFile(path=f"{prefix}{n}", size=size, sha256="0" * 64, storage_name="x")
            for n, size in enumerate(sizes, start=1)]


def zipstream_length(entries) -> int:
    """zipstream-ng's own count for the same entries (it reads nothing to count)."""
    stream = ZipStream(sized=True)
    for name, size in entries:
        stream.add(iter(()), name, size=size)
    return len(stream)


@pytest.mark.parametrize("sizes", [
    [0, 1, 2, 525_000],
    [2_200_000_000],  # one file past 2 GiB: ZIP64 sizes in its headers
    [900_000_000] * 6,  # the later files start past 4 GiB: ZIP64 offsets
    [10] * 70_000,  # more entries than the classic end record can count
])
def test_zip_length_is_what_zipstream_writes(sizes):
    files = fake_files(sizes)
    files.append(MediaFile(path="IHE_PDI/écran d'accueil.html", size=5, sha256="0" * 64,
                           data=b"hello"))
    entries = zip_entries(files=files, root="IMAGES_Test")
    assert zip_length(entries) == zipstream_length(entries)


def test_a_zip_past_4_gib_is_as_long_as_announced(monkeypatch):
    zeros = bytes(8 << 20)

    def fake_read(media_file):
        remaining = media_file.size
        while remaining:
            chunk = zeros[:min(len(zeros), remaining)]
            remaining -= len(chunk)
            yield chunk

    monkeypatch.setattr("dicomgw.media._read_chunks", fake_read)
    files = fake_files([1_100_000_000] * 4)
    streamed, tail = 0, b""
    for chunk in zip_chunks(files=files, root="IMAGES_Big"):
        streamed += len(chunk)
        tail = (tail + chunk[-200:])[-200:]
    assert streamed == zip_length(zip_entries(files=files, root="IMAGES_Big"))
    assert b"PK\x06\x06" in tail and b"PK\x06\x07" in tail  # the ZIP64 end records


def test_a_zip_of_many_small_files_reads_back():
    files = [MediaFile(path=f"IMAGES/DICOMS/IM{n}", size=3, sha256="0" * 64, data=b"abc")
             for n in range(1, 66_001)]
    data = b"".join(zip_chunks(files=files, root="IMAGES_Many"))
    assert len(data) == zip_length(zip_entries(files=files, root="IMAGES_Many"))
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert len(archive.infolist()) == 66_001
        assert archive.read("IMAGES_Many/IMAGES/DICOMS/IM66000") == b"abc"
