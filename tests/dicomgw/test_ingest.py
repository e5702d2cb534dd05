"""The one ingest service: what it archives, what it refuses and why, and what the index
says afterwards. Runs every file of the public corpus, of pydicom's test files and of
pydicom-data through it."""

import hashlib
import io
import logging
import random
import stat
import tracemalloc
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import data_store
import pydicom
import pytest
from django.conf import settings
from django.db import connection
from django.db.models import QuerySet
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from dicomgw import services
from dicomgw.models import (
    IngestSource,
    Instance,
    InstanceConflict,
    Patient,
    Series,
    Study,
    archive_storage,
)
from dicomgw.services import (
    DicomGatewayError,
    IngestBatch,
    IngestStatus,
    ingest_file,
    ingest_files,
    name_search_key,
)

PYDICOM_DATA = Path(pydicom.__file__).parent / "data"
DATA_STORE = Path(data_store.__file__).parent / "data"
JAPANESE_CD = "cd_ihe_pdi_hitachi_mr_jp"
JAPANESE_NAME = "ﾌﾙﾊｼ^ﾀｲﾁ=古橋^大地"
JAPANESE_PATIENT_ID = "0000110231"

# pydicom's own test files that the archive refuses, and the reason it gives.
PYDICOM_REJECTED = {
    # Data sets written without the Part 10 preamble, "DICM" and File Meta (PS3.10 7.1).
    "test_files/no_meta.dcm": "not a DICOM Part 10 file",
    "test_files/ExplVR_BigEndNoMeta.dcm": "not a DICOM Part 10 file",
    "test_files/ExplVR_LitEndNoMeta.dcm": "not a DICOM Part 10 file",
    "test_files/rtstruct.dcm": "not a DICOM Part 10 file",
    # File Meta without the Transfer Syntax UID: the encoding would be a guess.
    "test_files/meta_missing_tsyntax.dcm": "no Transfer Syntax UID",
    # Cut short in a defined-length element.
    "test_files/MR_truncated.dcm": "incomplete or damaged",
    "test_files/rtplan_truncated.dcm": "incomplete or damaged",
    # Disc indexes, not images.
    "test_files/dicomdirtests/DICOMDIR": "DICOMDIR",
    "test_files/dicomdirtests/DICOMDIR-bigEnd": "DICOMDIR",
    "test_files/dicomdirtests/DICOMDIR-empty.dcm": "DICOMDIR",
    "test_files/dicomdirtests/DICOMDIR-implicit": "DICOMDIR",
    "test_files/dicomdirtests/DICOMDIR-nooffset": "DICOMDIR",
    "test_files/dicomdirtests/DICOMDIR-nopatient": "DICOMDIR",
    "test_files/dicomdirtests/DICOMDIR-reordered": "DICOMDIR",
    "test_files/dicomdirtests/TINY_ALPHA/DICOMDIR": "DICOMDIR",
    # Pixel-codec fixtures stripped down to the image: no study or series to file under.
    "test_files/JPEGLSNearLossless_08.dcm": "no Study Instance UID",
    "test_files/JPEGLSNearLossless_16.dcm": "no Study Instance UID",
    "test_files/SC_rgb_jls_lossy_line.dcm": "no Study Instance UID",
    "test_files/SC_rgb_jls_lossy_sample.dcm": "no Study Instance UID",
    # Parser fixtures of a handful of elements, no SOP Class at all.
    "test_files/UN_sequence.dcm": "no SOP Class UID",
    "test_files/empty_charset_LEI.dcm": "no SOP Class UID",
    "test_files/no_meta_group_length.dcm": "no SOP Class UID",
    "test_files/priv_SQ.dcm": "no SOP Class UID",
    "charset_files/chrSQEncoding.dcm": "no SOP Class UID",
    "charset_files/chrSQEncoding1.dcm": "no SOP Class UID",
    # Two bytes of Pixel Data and no Rows, Columns or Bits Allocated.
    "test_files/nested_priv_SQ.dcm": "no valid Rows, Columns and Bits Allocated",
    # Not DICOM at all.
    "test_files/README.txt": "text file",
    "test_files/dicomdirtests/README.txt": "text file",
    "test_files/dicomdirtests/TINY_ALPHA/README": "text file",
    "test_files/rtplan.dump": "text file",
    "test_files/rtstruct.dump": "text file",
    "test_files/test1.json": "text file",
    "test_files/test_PN.json": "text file",
    "test_files/crayons.icc": "not a DICOM Part 10 file",
    "test_files/zipMR.gz": "gzip",
    "charset_files/FileInfo.txt": "text file",
}

# pydicom-data files that the archive refuses, and the reason it gives.
DATA_STORE_REJECTED = {
    # An ACR-NEMA style data set: no preamble, "DICM" or File Meta.
    "OT-PAL-8-face.dcm": "not a DICOM Part 10 file",
    # Its SOP Instance, Study and Series "UIDs" are 64-character hex digests.
    "bad_sequence.dcm": "SOP Instance UID is malformed",
    # The JPEG 2000 Pixel Data stops before its sequence delimiter.
    "emri_small_jpeg_2k_lossless_too_short.dcm": "incomplete or damaged",
}


# --- helpers -------------------------------------------------------------------------


def as_stored(data: bytes) -> bytes:
    """What the archive must keep of ``data``: the preamble zeroed, nothing else."""
    return bytes(128) + data[128:]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stored_files() -> list[Path]:
    root = Path(archive_storage().location)
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def row_counts(facility) -> tuple:
    return (
        Patient.objects.filter(facility=facility).count(),
        Study.objects.filter(facility=facility).count(),
        Series.objects.filter(study__facility=facility).count(),
        Instance.objects.filter(facility=facility).count(),
        InstanceConflict.objects.filter(facility=facility).count(),
        len(stored_files()),
    )


def read_stored(field_file) -> bytes:
    with field_file.open("rb") as fh:
        return fh.read()


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def ingest_and_check(facility, root: Path, paths: list[Path]) -> tuple[dict, list[str]]:
    """Ingest ``paths`` one by one and check each outcome against an independent
    reading of the file. Returns the rejected files (path relative to ``root`` ->
    reason) and the problems found."""
    problems = []
    rejected = {}
    archived: dict[str, str] = {}  # SOP Instance UID -> hash of the archived copy
    kept_aside: set[tuple[str, str]] = set()
    for path in paths:
        name = path.relative_to(root).as_posix()
        data = path.read_bytes()
        expected = as_stored(data)
        before = row_counts(facility)
        outcome = ingest_file(facility=facility, path=path, source=IngestSource.IMPORT)

        if outcome.status == IngestStatus.REJECTED:
            rejected[name] = outcome.reason
            if not outcome.reason:
                problems.append(f"{name}: rejected without a reason")
            if row_counts(facility) != before:
                problems.append(f"{name}: a rejection changed rows or stored files")
            continue

        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID).strip("\0 ")
        if outcome.sop_instance_uid != uid:
            problems.append(f"{name}: indexed as {outcome.sop_instance_uid}, file says {uid}")
        if outcome.sha256 != sha256(expected):
            problems.append(f"{name}: outcome hash differs from the zeroed-preamble bytes")
        if outcome.status == IngestStatus.STORED:
            instance = outcome.instance
            if uid in archived:
                problems.append(f"{name}: stored although its SOP instance was archived")
            archived[uid] = outcome.sha256
            if (instance.sha256, instance.size) != (sha256(expected), len(data)):
                problems.append(f"{name}: indexed with the wrong hash or size")
            if read_stored(instance.file) != expected:
                problems.append(f"{name}: stored copy differs from the received bytes")
        elif outcome.status == IngestStatus.DUPLICATE:
            if archived.get(uid) != outcome.sha256:
                problems.append(f"{name}: duplicate of nothing archived")
            if row_counts(facility) != before:
                problems.append(f"{name}: a duplicate changed rows or stored files")
        elif outcome.status == IngestStatus.CONFLICT:
            if uid not in archived or archived[uid] == outcome.sha256:
                problems.append(f"{name}: conflict without a differing archived copy")
            conflict = InstanceConflict.objects.filter(
                existing=outcome.instance, sha256=outcome.sha256).first()
            if conflict is None or read_stored(conflict.file) != expected:
                problems.append(f"{name}: conflicting copy not kept aside intact")
            repeat = (uid, outcome.sha256) in kept_aside
            if (row_counts(facility)[4] - before[4]) != (0 if repeat else 1):
                problems.append(f"{name}: conflict rows wrong")
            kept_aside.add((uid, outcome.sha256))
    return rejected, problems


def make_dicom(path: Path, *, transfer_syntax=ExplicitVRLittleEndian, pixel_data=None,
               preamble: bytes | None = None, **attributes) -> Path:
    """A small Part 10 Secondary Capture image; ``attributes`` override or, when None,
    remove data set elements."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "MRN-1"
    ds.PatientBirthDate = "19800101"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.Modality = "OT"
    ds.Rows = 4
    ds.Columns = 4
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(16) if pixel_data is None else pixel_data
    with pydicom.config.disable_value_validation():
        for keyword, value in attributes.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
    if transfer_syntax.is_encapsulated:
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    instance_uid = ds.get("SOPInstanceUID")
    ds.file_meta.MediaStorageSOPInstanceUID = (
        instance_uid if isinstance(instance_uid, str) else generate_uid())
    if preamble is not None:
        ds.preamble = preamble
    with pydicom.config.disable_value_validation():
        ds.save_as(path, enforce_file_format=True)
    return path


def patch_bytes(path: Path, old: bytes, new: bytes) -> Path:
    data = path.read_bytes()
    assert len(old) == len(new) and data.count(old) == 1
    path.write_bytes(data.replace(old, new))
    return path


# --- whole corpora -------------------------------------------------------------------


def test_every_file_of_the_public_corpus_is_indexed_or_rejected(facility, testdata_dir):
    paths = [p for p in files_under(testdata_dir)
             if p.name not in ("MANIFEST.md",) and "LICENSES" not in p.parts]
    non_dicom = {p.relative_to(testdata_dir).as_posix() for p in paths
                 if p.read_bytes()[128:132] != b"DICM"}
    assert (len(paths), len(non_dicom)) == (351, 181)  # MANIFEST.md

    rejected, problems = ingest_and_check(facility, testdata_dir, paths)

    assert problems == []
    assert set(rejected) == non_dicom | {f"{JAPANESE_CD}/DICOMDIR"}
    assert "DICOMDIR (disc index), not an image" in rejected[f"{JAPANESE_CD}/DICOMDIR"]
    assert Instance.objects.filter(facility=facility).count() == len({
        str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths
        if p.relative_to(testdata_dir).as_posix() not in rejected
    })


def test_pydicom_test_files_are_indexed_except_the_known_broken_ones(facility):
    paths = [p for folder in ("test_files", "charset_files")
             for p in files_under(PYDICOM_DATA / folder)]

    rejected, problems = ingest_and_check(facility, PYDICOM_DATA, paths)

    assert problems == []
    assert set(rejected) == set(PYDICOM_REJECTED)
    wrong_reasons = {name: reason for name, reason in rejected.items()
                     if PYDICOM_REJECTED[name] not in reason}
    assert wrong_reasons == {}


def test_pydicom_data_files_are_indexed_except_the_known_broken_ones(facility):
    rejected, problems = ingest_and_check(facility, DATA_STORE, files_under(DATA_STORE))

    assert problems == []
    assert set(rejected) == set(DATA_STORE_REJECTED)
    wrong_reasons = {name: reason for name, reason in rejected.items()
                     if DATA_STORE_REJECTED[name] not in reason}
    assert wrong_reasons == {}


def test_the_index_reads_each_element_as_pydicom_reads_it(tmp_path, testdata_dir):
    """What the index keeps is converted straight from the elements read, not through
    pydicom's Dataset: for every accepted file of the three corpora (implicit and big
    endian, deflated, ISO 2022 names, private and UN elements among them), the values
    equal those of the same elements read the Dataset way."""
    from pydicom.uid import UID

    roots = (testdata_dir, PYDICOM_DATA / "test_files", PYDICOM_DATA / "charset_files",
             DATA_STORE)
    paths = [p for root in roots for p in files_under(root) if p.read_bytes()[128:132] == b"DICM"]
    spool_path = tmp_path / "spool.dcm"
    compared, differences = 0, []
    for path in paths:
        with open(spool_path, "w+b") as spool:
            received = services._receive(spool, spool_path, path=path, fileobj=None)
            try:
                header = services._check_and_read(received)
            except services._Rejected:
                continue
        ds = dcmread(path)
        expected = services._read_header(
            lambda tag, ds=ds: ds[tag].value if tag in ds else None,
            UID(header.transfer_syntax_uid))
        if header != expected:
            differences.append(path.name)
        compared += 1

    assert differences == []
    assert compared > 300


# --- the Japanese patient CD ---------------------------------------------------------


def test_japanese_cd_is_one_patient_one_study_five_series_67_images(facility, testdata_dir):
    cd = testdata_dir / JAPANESE_CD
    outcomes = ingest_files(facility=facility, paths=files_under(cd),
                            source=IngestSource.UPLOAD)

    assert sum(o.status == IngestStatus.STORED for o in outcomes) == 67
    assert sum(o.status == IngestStatus.REJECTED for o in outcomes) == 182
    patient = Patient.objects.get(facility=facility)
    study = Study.objects.get(facility=facility)
    assert study.patient == patient
    assert (study.num_series, study.num_instances, study.modalities) == (5, 67, "MR")
    assert study.total_bytes == sum(p.stat().st_size for p in (cd / "DCMDT").iterdir())
    assert sorted(study.series.values_list("num_instances", flat=True)) == [11, 11, 11, 17, 17]
    for series in study.series.all():
        assert series.total_bytes == sum(i.size for i in series.instances.all())
        assert series.modality == "MR"
    assert study.study_date.isoformat() == "2018-01-07"
    assert study.study_time.isoformat() == "11:05:26"
    assert Instance.objects.filter(facility=facility, source="upload").count() == 67


def test_japanese_names_are_decoded_through_the_character_set(facility, testdata_dir):
    ingest_file(facility=facility, path=testdata_dir / JAPANESE_CD / "DCMDT" / "D0000000",
                source=IngestSource.UPLOAD)

    patient = Patient.objects.get(facility=facility)
    assert patient.name == JAPANESE_NAME
    assert patient.display_name == "ﾌﾙﾊｼ, ﾀｲﾁ (古橋, 大地)"
    assert patient.name_search == name_search_key(JAPANESE_NAME) == "フルハシ タイチ 古橋 大地"
    assert patient.patient_id == JAPANESE_PATIENT_ID
    assert patient.birth_date.isoformat() == "1975-03-29"
    assert patient.sex == "M"
    assert Study.objects.get().referring_physician == "UNKNOWN^UNKNOWN"


def test_ingesting_the_japanese_cd_logs_no_patient_details(facility, testdata_dir, caplog):
    caplog.set_level(logging.DEBUG)
    cd = testdata_dir / JAPANESE_CD
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ingest_files(facility=facility, paths=files_under(cd), source=IngestSource.UPLOAD)
        ingest_files(facility=facility, paths=files_under(cd / "DCMDT")[:3],
                     source=IngestSource.UPLOAD)

    logged = [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]
    assert any("ingest stored" in line for line in logged)
    phi = ["ﾌﾙﾊｼ", "ﾀｲﾁ", "古橋", "大地", JAPANESE_PATIENT_ID, "19750329", "1975-03-29",
           str(cd), "DCMDT", "D0000", "LBLPRINT", "README.TXT"]
    assert [line for line in logged if any(secret in line for secret in phi)] == []


def test_non_conformant_values_are_accepted_without_echoing_them_to_the_log(
        facility, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    path = make_dicom(tmp_path / "odd.dcm", PatientName="Furuhashi^Taichi",
                      PatientBirthDate="29/03/1975", PatientID="MRN-0042",
                      InstanceNumber="17", StudyDate="2018-13-45")
    patch_bytes(path, b"\x20\x00\x13\x00IS\x02\x0017", b"\x20\x00\x13\x00IS\x02\x001A")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outcome = ingest_file(facility=facility, path=path, source=IngestSource.UPLOAD)

    assert outcome.status == IngestStatus.STORED
    instance = outcome.instance
    assert instance.instance_number is None
    assert instance.series.study.study_date is None
    assert instance.series.study.patient.birth_date is None
    logged = [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]
    secrets = ["Furuhashi", "Taichi", "29/03/1975", "MRN-0042", "1A", str(tmp_path)]
    assert [line for line in logged if any(s in line for s in secrets)] == []


# --- characters and names ------------------------------------------------------------


@pytest.mark.parametrize("filename, name", [
    ("chrX1.dcm", "Wang^XiaoDong=王^小東"),
    ("chrX2.dcm", "Wang^XiaoDong=王^小东"),
    ("chrFren.dcm", "Buc^Jérôme"),
    ("chrGerm.dcm", "Äneas^Rüdiger"),
    ("chrGreek.dcm", "Διονυσιος"),
    ("chrRuss.dcm", "Люкceмбypг"),
    ("chrArab.dcm", "قباني^لنزار"),
    ("chrHbrw.dcm", "שרון^דבורה"),
    ("chrI2.dcm", "Hong^Gildong=洪^吉洞=홍^길동"),
    ("chrKoreanMulti.dcm", "김희중"),
    ("chrH31.dcm", "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    ("chrH32.dcm", "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"),
    ("chrJapMulti.dcm", "やまだ^たろう"),
])
def test_patient_names_round_trip_through_every_character_set(facility, filename, name):
    outcome = ingest_file(facility=facility, path=PYDICOM_DATA / "charset_files" / filename,
                          source=IngestSource.IMPORT)

    assert outcome.status == IngestStatus.STORED
    patient = outcome.instance.series.study.patient
    patient.refresh_from_db()
    assert patient.name == name
    assert patient.name_search == name_search_key(name)
    assert Patient.objects.get(name_search=name_search_key(name)) == patient


def test_a_misspelt_character_set_is_accepted(facility, testdata_dir):
    # SpecificCharacterSet "ISO-IR 100" (hyphen instead of underscore) from an ACUSON US.
    path = (testdata_dir / "encapsulation_variants" / "multi-frame"
            / "IM00001.fragmented_no_bot_jpeg_baseline.50.dcm")

    outcome = ingest_file(facility=facility, path=path, source=IngestSource.IMPORT)

    assert outcome.status == IngestStatus.STORED
    assert outcome.instance.number_of_frames == 8


def test_display_name_puts_the_family_name_first_and_other_groups_in_brackets(
        facility, tmp_path):
    path = make_dicom(tmp_path / "a.dcm", PatientName="Doe^Jane^Q^Dr^PhD")

    patient = ingest_file(facility=facility, path=path,
                          source=IngestSource.UPLOAD).instance.series.study.patient

    assert patient.name == "Doe^Jane^Q^Dr^PhD"
    assert patient.display_name == "Dr DOE, Jane Q PhD"


def test_trailing_empty_name_components_are_dropped(facility, tmp_path):
    path = make_dicom(tmp_path / "a.dcm", PatientName="Doe^Jane^^^=")

    patient = ingest_file(facility=facility, path=path,
                          source=IngestSource.UPLOAD).instance.series.study.patient

    assert patient.name == "Doe^Jane"


# --- duplicates, conflicts, preamble -------------------------------------------------


def test_the_same_bytes_again_are_a_duplicate_and_change_nothing(facility, testdata_dir):
    path = testdata_dir / "transfer_syntaxes_siemens_trio" / "1.dcm"
    first = ingest_file(facility=facility, path=path, source=IngestSource.SCP)
    before = row_counts(facility)
    study_before = Study.objects.values().get()

    again = ingest_file(facility=facility, path=path, source=IngestSource.UPLOAD)

    assert first.status == IngestStatus.STORED and first.ok
    assert again.status == IngestStatus.DUPLICATE and again.ok
    assert again.instance == first.instance
    assert again.sha256 == first.sha256
    assert row_counts(facility) == before
    assert Study.objects.values().get() == study_before


def test_different_bytes_under_an_archived_sop_instance_uid_are_kept_aside(
        facility, testdata_dir, tmp_path):
    original = testdata_dir / "transfer_syntaxes_siemens_trio" / "1.dcm"
    first = ingest_file(facility=facility, path=original, source=IngestSource.SCP)
    archived_bytes = read_stored(first.instance.file)
    ds = dcmread(original)
    ds.StudyDescription = "EDITED AFTER ARCHIVING"
    edited = tmp_path / "edited.dcm"
    ds.save_as(edited)
    counts_before = row_counts(facility)

    outcome = ingest_file(facility=facility, path=edited, source=IngestSource.UPLOAD)

    assert outcome.status == IngestStatus.CONFLICT and not outcome.ok
    assert "already archived with different content" in outcome.reason
    assert outcome.instance == first.instance
    conflict = InstanceConflict.objects.get()
    assert conflict.existing == first.instance
    assert conflict.sha256 == outcome.sha256 == sha256(as_stored(edited.read_bytes()))
    assert read_stored(conflict.file) == as_stored(edited.read_bytes())
    assert (conflict.source, conflict.resolved) == ("upload", False)
    assert conflict.file.name != first.instance.file.name
    first.instance.refresh_from_db()
    assert read_stored(first.instance.file) == archived_bytes
    assert first.instance.sha256 == first.sha256
    assert Study.objects.get().description != "EDITED AFTER ARCHIVING"
    assert row_counts(facility)[:4] == counts_before[:4]

    repeat = ingest_file(facility=facility, path=edited, source=IngestSource.UPLOAD)

    assert repeat.status == IngestStatus.CONFLICT
    assert InstanceConflict.objects.count() == 1
    assert len(stored_files()) == 2


def test_the_preamble_is_zeroed_and_a_different_preamble_is_a_duplicate(facility, tmp_path):
    # A polyglot: the preamble starts like a PNG and a ZIP (CVE-2019-11687).
    junk = (b"\x89PNG\r\n\x1a\n" + b"PK\x03\x04" + bytes(range(116)))[:128]
    polyglot = make_dicom(tmp_path / "polyglot.dcm", preamble=junk)
    data = polyglot.read_bytes()
    assert data[:4] == b"\x89PNG"

    outcome = ingest_file(facility=facility, path=polyglot, source=IngestSource.UPLOAD)

    assert outcome.status == IngestStatus.STORED
    stored = read_stored(outcome.instance.file)
    assert stored[:128] == bytes(128)
    assert stored[128:] == data[128:]
    assert outcome.sha256 == sha256(stored) == outcome.instance.sha256
    plain = tmp_path / "plain.dcm"
    plain.write_bytes(b"\xff" * 128 + data[128:])

    again = ingest_file(facility=facility, path=plain, source=IngestSource.UPLOAD)

    assert again.status == IngestStatus.DUPLICATE
    assert again.instance == outcome.instance


def test_a_file_with_a_short_first_read_still_has_its_whole_preamble_zeroed(
        facility, tmp_path):
    class Trickle(io.BytesIO):
        def read(self, size=-1):
            return super().read(min(size, 50) if size and size > 0 else 50)

    data = make_dicom(tmp_path / "a.dcm", preamble=b"\x01" * 128).read_bytes()

    outcome = ingest_file(facility=facility, fileobj=Trickle(data), source=IngestSource.SCP)

    assert read_stored(outcome.instance.file) == as_stored(data)


def test_the_same_file_for_two_facilities_gives_two_independent_records(
        facility, other_facility, testdata_dir):
    path = testdata_dir / "transfer_syntaxes_siemens_trio" / "1.dcm"

    mine = ingest_file(facility=facility, path=path, source=IngestSource.SCP)
    theirs = ingest_file(facility=other_facility, path=path, source=IngestSource.SCP)

    assert mine.status == theirs.status == IngestStatus.STORED
    assert mine.instance.pk != theirs.instance.pk
    assert mine.instance.file.name != theirs.instance.file.name
    assert mine.instance.file.name.startswith(f"{facility.pk}/")
    assert theirs.instance.file.name.startswith(f"{other_facility.pk}/")
    assert mine.instance.series.study.patient != theirs.instance.series.study.patient
    assert theirs.instance.series.study.patient.facility == other_facility
    assert Study.objects.filter(facility=facility).get().num_instances == 1
    assert Study.objects.filter(facility=other_facility).get().num_instances == 1


def test_the_storage_name_owes_nothing_to_the_file_or_the_client(facility, tmp_path):
    path = make_dicom(tmp_path / "..%2F..%2Fetc%2Fpasswd.dcm")

    outcome = ingest_file(facility=facility, path=path, source=IngestSource.UPLOAD)

    name = outcome.instance.file.name
    facility_id, fan_out, filename = name.split("/")
    assert facility_id == str(facility.pk)
    assert len(filename) == 36 and filename.startswith(fan_out) and filename.endswith(".dcm")
    assert outcome.sop_instance_uid not in name


# --- index contents ------------------------------------------------------------------


def test_study_modalities_are_the_sorted_set_of_its_series_modalities(facility, tmp_path):
    study_uid = generate_uid()
    for index, modality in enumerate(["MR", "CT", "MR", "SR"]):
        path = make_dicom(tmp_path / f"{index}.dcm", StudyInstanceUID=study_uid,
                          Modality=modality)
        ingest_file(facility=facility, path=path, source=IngestSource.SCP)

    study = Study.objects.get()
    assert study.modalities == "CT\\MR\\SR"
    assert study.updated_at > study.created_at
    assert study.modality_list == ["CT", "MR", "SR"]
    assert (study.num_series, study.num_instances) == (4, 4)


def test_instances_of_a_study_spelling_the_patient_differently_stay_in_that_study(
        facility, tmp_path):
    study_uid = generate_uid()
    first = make_dicom(tmp_path / "a.dcm", StudyInstanceUID=study_uid, PatientName="Doe^Jane")
    second = make_dicom(tmp_path / "b.dcm", StudyInstanceUID=study_uid, PatientName="DOE^JANE")

    ingest_files(facility=facility, paths=[first, second], source=IngestSource.SCP)

    assert Patient.objects.count() == 1
    assert Study.objects.get().num_instances == 2


def test_people_sharing_an_mrn_are_not_merged(facility, tmp_path):
    first = make_dicom(tmp_path / "a.dcm", PatientName="Doe^Jane", PatientID="123")
    second = make_dicom(tmp_path / "b.dcm", PatientName="Roe^Richard", PatientID="123")

    ingest_files(facility=facility, paths=[first, second], source=IngestSource.SCP)

    assert Patient.objects.filter(facility=facility, patient_id="123").count() == 2


def test_the_index_records_the_instance_details(facility, testdata_dir):
    path = (testdata_dir / "mr_vendor_series" / "enhanced_multiframe"
            / "philips_achieva_dstream" / "IM_0027_fMAP.dcm")
    ds = dcmread(path, stop_before_pixels=True)

    outcome = ingest_file(facility=facility, path=path, source=IngestSource.RETRIEVE)

    instance = Instance.objects.get(pk=outcome.instance.pk)
    assert instance.sop_class_uid == ds.SOPClassUID
    assert instance.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
    assert instance.number_of_frames == 64
    assert (instance.rows, instance.columns) == (ds.Rows, ds.Columns)
    assert instance.instance_number == ds.InstanceNumber
    assert instance.size == path.stat().st_size
    assert instance.source == "retrieve"
    assert outcome.study_instance_uid == ds.StudyInstanceUID


def test_dates_and_times_are_read_leniently(facility, tmp_path):
    legacy = make_dicom(tmp_path / "a.dcm", StudyDate="2018.01.07", StudyTime="11:05:26.5",
                        PatientBirthDate="19750329")
    broken = make_dicom(tmp_path / "b.dcm", StudyDate="yesterday", StudyTime="25",
                        PatientBirthDate="19750231", PatientName="Roe^R")

    outcomes = ingest_files(facility=facility, paths=[legacy, broken],
                            source=IngestSource.SCP)

    assert [o.status for o in outcomes] == [IngestStatus.STORED, IngestStatus.STORED]
    legacy_study = outcomes[0].instance.series.study
    assert legacy_study.study_date.isoformat() == "2018-01-07"
    assert legacy_study.study_time.isoformat() == "11:05:26.500000"
    broken_study = outcomes[1].instance.series.study
    assert (broken_study.study_date, broken_study.study_time) == (None, None)
    assert broken_study.patient.birth_date is None


def test_values_longer_than_their_columns_are_cut_not_refused(facility, tmp_path):
    path = make_dicom(tmp_path / "a.dcm", StudyID="S" * 40, Modality="M" * 30,
                      StudyDescription="D" * 300)

    outcome = ingest_file(facility=facility, path=path, source=IngestSource.SCP)

    assert outcome.status == IngestStatus.STORED
    study = outcome.instance.series.study
    assert (study.study_id, study.description) == ("S" * 16, "D" * 200)
    assert outcome.instance.series.modality == "M" * 16


def test_a_non_numeric_number_of_frames_is_accepted_as_one_frame(facility):
    # badVR.dcm: Number of Frames "1A" (IS).
    outcome = ingest_file(facility=facility, path=PYDICOM_DATA / "test_files" / "badVR.dcm",
                          source=IngestSource.IMPORT)

    assert outcome.status == IngestStatus.STORED
    assert outcome.instance.number_of_frames == 1


def test_a_header_naming_another_sop_instance_is_indexed_by_the_data_set_uid(
        facility, testdata_dir):
    # The File Meta's Media Storage SOP Instance UID differs from the data set's.
    path = testdata_dir / "bits12_siemens_trio" / "12bitUnsigned.dcm"
    ds = dcmread(path, stop_before_pixels=True)
    assert ds.file_meta.MediaStorageSOPInstanceUID != ds.SOPInstanceUID

    outcome = ingest_file(facility=facility, path=path, source=IngestSource.IMPORT)

    assert outcome.status == IngestStatus.STORED
    assert outcome.instance.sop_instance_uid == ds.SOPInstanceUID
    assert read_stored(outcome.instance.file) == as_stored(path.read_bytes())


# --- rejections ----------------------------------------------------------------------


@pytest.mark.parametrize("relative_path, reason", [
    (f"{JAPANESE_CD}/LBLPRINT.JPG", "not a DICOM Part 10 file: it looks like a JPEG picture"),
    (f"{JAPANESE_CD}/AUTORUN.INF", "not a DICOM Part 10 file: it looks like a text file"),
    (f"{JAPANESE_CD}/README.TXT", "not a DICOM Part 10 file: it looks like a text file"),
    (f"{JAPANESE_CD}/DICOMDIR", "it is a DICOMDIR (disc index), not an image"),
])
def test_files_from_a_disc_that_are_not_images_are_rejected_with_a_reason(
        facility, testdata_dir, relative_path, reason):
    outcome = ingest_file(facility=facility, path=testdata_dir / relative_path,
                          source=IngestSource.UPLOAD)

    assert outcome.status == IngestStatus.REJECTED and not outcome.ok
    assert outcome.reason.startswith(reason)
    assert outcome.instance is None
    assert row_counts(facility) == (0, 0, 0, 0, 0, 0)


def test_jpeg_is_rejected_with_a_reason(facility, testdata_dir):
    jpeg = next((testdata_dir / JAPANESE_CD / "IHE_PDI" / "IMAGE").iterdir())

    outcome = ingest_file(facility=facility, path=jpeg, source=IngestSource.UPLOAD)

    assert outcome.status == IngestStatus.REJECTED
    assert outcome.reason == "not a DICOM Part 10 file: it looks like a JPEG picture"


@pytest.mark.parametrize("content, reason", [
    (b"", "the file is empty"),
    (b"<!DOCTYPE html><html><body>Index</body></html>", "it looks like a web page"),
    (b"[autorun]\r\nshellexecute=Index.htm\r\n", "it looks like a text file"),
    (b"%PDF-1.7\n" + bytes(300), "it looks like a PDF document"),
    (b"PK\x03\x04" + bytes(300), "it looks like a ZIP archive"),
    (b"\x00" * 131, "not a DICOM Part 10 file"),
    (bytes(128) + b"DICM", "File Meta Information has no Transfer Syntax UID"),
    (bytes(128) + b"DICM" + b"\x02\x00\x01\x00OB\x00\x00\x02", "File Meta Information header"),
    (bytes(128) + b"DICM" + b"\x02\x00\x10\x00UI\xff\x7f", "no Transfer Syntax UID"),
])
def test_unusable_content_is_rejected_with_a_reason(facility, content, reason):
    outcome = ingest_file(facility=facility, fileobj=io.BytesIO(content),
                          source=IngestSource.UPLOAD)

    assert outcome.status == IngestStatus.REJECTED
    assert reason in outcome.reason
    assert row_counts(facility) == (0, 0, 0, 0, 0, 0)


def test_files_held_in_memory_and_files_spooled_to_disc_are_stored_alike(
        facility, tmp_path, settings, monkeypatch):
    small = make_dicom(tmp_path / "a.dcm", SOPInstanceUID="1.2.826.0.1.3680043.2.1.1")
    large = make_dicom(tmp_path / "b.dcm", SOPInstanceUID="1.2.826.0.1.3680043.2.1.2")

    held = ingest_file(facility=facility, path=small, source=IngestSource.UPLOAD)
    monkeypatch.setattr(services, "MEMORY_FILE_BYTES", 100)  # b.dcm is larger
    spooled = ingest_file(facility=facility, path=large, source=IngestSource.UPLOAD)

    for outcome, path in ((held, small), (spooled, large)):
        assert outcome.status == IngestStatus.STORED
        stored = Path(archive_storage().path(outcome.instance.file.name))
        assert stored.read_bytes() == as_stored(path.read_bytes())
        # The storage's modes (STORAGES["archive"]), whichever way the file was written.
        assert stat.S_IMODE(stored.stat().st_mode) == 0o640
        assert stat.S_IMODE(stored.parent.stat().st_mode) == 0o750
    assert [p for p in Path(settings.SPOOL_DIR).rglob("*") if p.is_file()] == []


def test_a_file_over_the_size_limit_is_rejected(facility, tmp_path, settings):
    settings.INGEST_MAX_FILE_BYTES = 1000
    path = make_dicom(tmp_path / "a.dcm", pixel_data=bytes(4096), Rows=64, Columns=64)

    outcome = ingest_file(facility=facility, path=path, source=IngestSource.UPLOAD)

    assert outcome.status == IngestStatus.REJECTED
    assert outcome.reason.startswith("the file is larger than the 1000")
    assert row_counts(facility) == (0, 0, 0, 0, 0, 0)


def test_a_deflated_file_that_would_inflate_past_the_size_limit_is_rejected(
        facility, testdata_dir, settings):
    path = testdata_dir / "encapsulation_variants" / "deflate" / "image_dfl"
    settings.INGEST_MAX_FILE_BYTES = 20_000
    assert path.stat().st_size < 20_000

    outcome = ingest_file(facility=facility, path=path, source=IngestSource.UPLOAD)

    assert outcome.status == IngestStatus.REJECTED
    assert "inflate beyond" in outcome.reason


@pytest.mark.parametrize("attributes, reason", [
    ({"SOPInstanceUID": None}, "it has no SOP Instance UID"),
    ({"SOPClassUID": None}, "it has no SOP Class UID"),
    ({"StudyInstanceUID": None}, "it has no Study Instance UID"),
    ({"SeriesInstanceUID": None}, "it has no Series Instance UID"),
    ({"SOPInstanceUID": "1.2.840.abc"}, "its SOP Instance UID is malformed"),
    ({"StudyInstanceUID": "1." + "2" * 64}, "its Study Instance UID is malformed"),
    ({"SeriesInstanceUID": "1..2"}, "its Series Instance UID is malformed"),
    ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7."}, "its SOP Class UID is malformed"),
    ({"SOPInstanceUID": ["1.2.3", "1.2.4"]}, "its SOP Instance UID holds more than one"),
])
def test_missing_or_malformed_uids_are_rejected(facility, tmp_path, attributes, reason):
    path = make_dicom(tmp_path / "a.dcm", **attributes)

    outcome = ingest_file(facility=facility, path=path, source=IngestSource.SCP)

    assert outcome.status == IngestStatus.REJECTED
    assert outcome.reason.startswith(reason)


def test_an_unknown_or_malformed_transfer_syntax_is_rejected(facility, tmp_path):
    explicit = ExplicitVRLittleEndian.encode() + b"\0"
    unknown = patch_bytes(make_dicom(tmp_path / "a.dcm"), explicit, b"1.2.3.4.5.6.7.8.9.10")
    malformed = patch_bytes(make_dicom(tmp_path / "b.dcm"), explicit, b"1.2.840.10008.1.2.X\0")

    outcomes = ingest_files(facility=facility, paths=[unknown, malformed],
                            source=IngestSource.SCP)

    assert [o.reason for o in outcomes] == [
        "it uses a transfer syntax this archive cannot read",
        "its Transfer Syntax UID is malformed",
    ]


def test_the_uncompressed_image_must_hold_rows_times_columns_pixels(facility, tmp_path):
    short = make_dicom(tmp_path / "short.dcm", Rows=5)  # 16 bytes for 5 x 4 pixels
    frames = make_dicom(tmp_path / "frames.dcm", NumberOfFrames=2)
    ybr = make_dicom(tmp_path / "ybr.dcm", SamplesPerPixel=3, PixelData=bytes(32),
                     PhotometricInterpretation="YBR_FULL_422")
    padded = make_dicom(tmp_path / "padded.dcm", PixelData=bytes(18))
    bits = make_dicom(tmp_path / "bits.dcm", BitsAllocated=1, Rows=8, Columns=16,
                      PixelData=bytes(16))

    outcomes = ingest_files(facility=facility, paths=[short, frames, ybr, padded, bits],
                            source=IngestSource.SCP)

    assert [o.status for o in outcomes] == [IngestStatus.REJECTED, IngestStatus.REJECTED,
                                            IngestStatus.STORED, IngestStatus.STORED,
                                            IngestStatus.STORED]
    assert outcomes[0].reason.startswith("its image data is shorter than the image size")


def test_a_cut_short_file_is_rejected_even_when_its_image_is_left_on_disc(
        facility, tmp_path):
    # 2 MiB of Pixel Data: more than the service loads into memory while checking.
    whole = make_dicom(tmp_path / "big.dcm", Rows=1024, Columns=1024, BitsAllocated=16,
                       BitsStored=16, HighBit=15, PixelData=bytes(2 * 1024 * 1024))
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(whole.read_bytes()[:-1000])
    small_cut = tmp_path / "small_cut.dcm"
    small_cut.write_bytes(make_dicom(tmp_path / "small.dcm").read_bytes()[:-5])

    outcomes = ingest_files(facility=facility, paths=[cut, small_cut, whole],
                            source=IngestSource.SCP)

    assert [o.reason for o in outcomes[:2]] == [services.TRUNCATED, services.TRUNCATED]
    assert outcomes[2].status == IngestStatus.STORED


def test_compressed_image_data_is_checked_for_its_fragments_not_decoded(facility, tmp_path):
    frame = b"\xff\xd8" + b"not really a JPEG" + b"\xff\xd9"
    fine = make_dicom(tmp_path / "fine.dcm", transfer_syntax=JPEGBaseline8Bit,
                      pixel_data=encapsulate([frame]))
    no_fragment = make_dicom(tmp_path / "none.dcm", transfer_syntax=JPEGBaseline8Bit,
                             pixel_data=b"\xfe\xff\x00\xe0\x00\x00\x00\x00")
    bad_item = make_dicom(tmp_path / "bad.dcm", transfer_syntax=JPEGBaseline8Bit,
                          pixel_data=b"\xfe\xff\x00\xe0\x00\x00\x00\x00"
                          + b"\x12\x34\x56\x78\x04\x00\x00\x00abcd")
    overlong = make_dicom(tmp_path / "long.dcm", transfer_syntax=JPEGBaseline8Bit,
                          pixel_data=b"\xfe\xff\x00\xe0\x00\x00\x00\x00"
                          + b"\xfe\xff\x00\xe0\xe8\x03\x00\x00" + frame)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(fine.read_bytes()[:-12])

    outcomes = ingest_files(facility=facility, paths=[fine, no_fragment, bad_item, overlong, cut],
                            source=IngestSource.SCP)

    assert outcomes[0].status == IngestStatus.STORED
    assert [o.reason for o in outcomes[1:]] == [
        "its compressed image data holds no image",
        "its compressed image data is damaged",
        "its compressed image data is damaged or cut short",
        services.TRUNCATED,
    ]


def test_image_data_must_be_encapsulated_exactly_when_the_syntax_is_compressed(
        facility, tmp_path):
    # RLE Lossless and Explicit VR Little Endian UIDs are the same length, so one can be
    # swapped for the other in the File Meta without disturbing the rest of the file.
    rle = RLELossless.encode() + b"\0"
    explicit = ExplicitVRLittleEndian.encode() + b"\0"
    encapsulated_native = patch_bytes(
        make_dicom(tmp_path / "a.dcm", transfer_syntax=RLELossless,
                   pixel_data=encapsulate([bytes(64)])), rle, explicit)
    native_compressed = patch_bytes(make_dicom(tmp_path / "b.dcm"), explicit, rle)

    outcomes = ingest_files(facility=facility, paths=[encapsulated_native, native_compressed],
                            source=IngestSource.SCP)

    assert outcomes[0].reason.startswith("its image data is encapsulated, but")
    assert outcomes[1].reason.startswith("its image data is not encapsulated, but")


def test_a_damaged_element_inside_a_sequence_is_rejected(facility, tmp_path):
    item = Dataset()
    item.CodeValue = "121327"
    item.Rows = 0x4242
    path = make_dicom(tmp_path / "a.dcm", DerivationCodeSequence=[item])
    # Make that Rows one byte long: a US value cannot be.
    data = path.read_bytes()
    rows = b"\x28\x00\x10\x00US\x02\x00\x42\x42"
    assert data.count(rows) == 1
    path.write_bytes(data.replace(rows, b"\x28\x00\x10\x00US\x01\x00\x42"))

    outcome = ingest_file(facility=facility, path=path, source=IngestSource.SCP)

    assert outcome.status == IngestStatus.REJECTED
    assert outcome.reason == services.DAMAGED


# --- the API -------------------------------------------------------------------------


def test_a_file_object_is_read_from_its_position_and_left_open(facility, tmp_path):
    data = make_dicom(tmp_path / "a.dcm").read_bytes()
    upload = io.BytesIO(b"multipart junk" + data)
    upload.seek(len(b"multipart junk"))

    outcome = ingest_file(facility=facility, fileobj=upload, source=IngestSource.UPLOAD)

    assert outcome.status == IngestStatus.STORED
    assert read_stored(outcome.instance.file) == as_stored(data)
    assert not upload.closed


def test_a_path_that_cannot_be_read_is_rejected(facility, tmp_path):
    outcomes = ingest_files(facility=facility, paths=[tmp_path / "missing.dcm", tmp_path],
                            source=IngestSource.IMPORT)

    assert [o.reason for o in outcomes] == ["the file could not be read"] * 2


def test_ingest_files_gives_one_outcome_per_path_in_order(facility, testdata_dir):
    paths = [testdata_dir / JAPANESE_CD / "README.TXT",
             testdata_dir / JAPANESE_CD / "DCMDT" / "D0000000",
             testdata_dir / JAPANESE_CD / "DCMDT" / "D0000000"]

    outcomes = ingest_files(facility=facility, paths=paths, source=IngestSource.UPLOAD)

    assert [o.status for o in outcomes] == ["rejected", "stored", "duplicate"]


@pytest.mark.parametrize("arguments", [
    {"source": "scp"},
    {"source": "scp", "path": "a.dcm", "fileobj": io.BytesIO()},
    {"source": "fax", "fileobj": io.BytesIO()},
])
def test_misuse_raises_the_domain_error(facility, arguments):
    with pytest.raises(DicomGatewayError):
        ingest_file(facility=facility, **arguments)


def test_the_spool_is_left_empty(facility, testdata_dir, settings):
    ingest_files(facility=facility, source=IngestSource.UPLOAD, paths=[
        testdata_dir / JAPANESE_CD / "README.TXT",
        testdata_dir / JAPANESE_CD / "DCMDT" / "D0000000",
    ])

    assert not [p for p in Path(settings.SPOOL_DIR).rglob("*") if p.is_file()]


def test_a_failure_while_indexing_leaves_no_rows_and_no_file(facility, testdata_dir,
                                                             monkeypatch):
    original_insert = QuerySet.bulk_create

    def insert_then_fail(self, *args, **kwargs):
        original_insert(self, *args, **kwargs)
        raise RuntimeError("database went away")

    monkeypatch.setattr(QuerySet, "bulk_create", insert_then_fail)

    with pytest.raises(RuntimeError):
        ingest_file(facility=facility, path=testdata_dir / JAPANESE_CD / "DCMDT" / "D0000000",
                    source=IngestSource.SCP)

    assert row_counts(facility) == (0, 0, 0, 0, 0, 0)


def test_losing_the_race_to_store_an_instance_ends_as_a_duplicate(facility, testdata_dir,
                                                                  monkeypatch):
    """Another process archives the instance between our look-up and our insert: the
    unique constraint fails ours, and the retry finds theirs."""
    path = testdata_dir / JAPANESE_CD / "DCMDT" / "D0000000"
    real_store = services._store
    raced = []

    def store_after_a_rival_stored_it(*args):
        if not raced:
            raced.append(None)
            raced[0] = ingest_file(facility=facility, path=path, source=IngestSource.SCP)
        return real_store(*args)

    monkeypatch.setattr(services, "_store", store_after_a_rival_stored_it)

    outcome = ingest_file(facility=facility, path=path, source=IngestSource.UPLOAD)

    assert raced[0].status == IngestStatus.STORED
    assert outcome.status == IngestStatus.DUPLICATE
    assert outcome.instance == raced[0].instance
    assert row_counts(facility) == (1, 1, 1, 1, 0, 1)
    assert Study.objects.get().num_instances == 1


def test_a_batch_archives_like_one_file_at_a_time(facility, testdata_dir, tmp_path,
                                                 django_assert_max_num_queries):
    """Files added to one batch (30 images, in queries not growing with their number) end
    as ingesting each on its own would leave them: the
    same outcomes in order (a file sent twice, a rejected one, one archived before),
    the same rows and counters, the bytes moved from the spool into the archive."""
    images = files_under(testdata_dir / JAPANESE_CD / "DCMDT")[:30]
    not_dicom = tmp_path / "AUTORUN.INF"
    not_dicom.write_text("[autorun]\nopen=viewer.exe\n")
    ingest_file(facility=facility, path=images[0], source=IngestSource.SCP)
    work = [*images, not_dicom, images[5]]

    with django_assert_max_num_queries(25), IngestBatch(
            facility=facility, source=IngestSource.UPLOAD) as batch:
        for path in work:
            batch.add(path=path)
        outcomes = batch.archive()

    assert [o.status for o in outcomes] == (
        [IngestStatus.DUPLICATE] + [IngestStatus.STORED] * 29
        + [IngestStatus.REJECTED, IngestStatus.DUPLICATE])
    assert "text file" in outcomes[30].reason
    assert outcomes[31].instance == outcomes[5].instance
    assert [o.sop_instance_uid for o in outcomes[:30]] == [
        str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in images]
    for outcome, path in zip(outcomes[1:30], images[1:], strict=True):
        assert outcome.instance.pk is not None
        with outcome.instance.file.open("rb") as fh:
            assert fh.read() == as_stored(path.read_bytes())
    study = Study.objects.get(facility=facility)
    assert study.num_instances == 30 == Instance.objects.filter(facility=facility).count()
    assert study.total_bytes == sum(p.stat().st_size for p in images)
    assert study.num_series == study.series.count()
    assert study.modalities == "MR"
    for series in study.series.all():
        assert series.num_instances == series.instances.count()
        assert series.total_bytes == sum(i.size for i in series.instances.all())
    assert len(stored_files()) == 30
    assert not [p for p in Path(settings.SPOOL_DIR).rglob("*") if p.is_file()]


def test_a_batch_spread_over_studies_counts_each_one(facility, tmp_path):
    """Three new studies, two series each, in one batch: every counter exact."""
    paths = []
    for study in range(3):
        study_uid = generate_uid()
        for series in range(2):
            series_uid = generate_uid()
            for image in range(3):
                paths.append(make_dicom(
                    tmp_path / f"{study}-{series}-{image}.dcm", StudyInstanceUID=study_uid,
                    SeriesInstanceUID=series_uid, Modality=("CT", "SR")[series],
                    PatientID=f"P{study}"))

    outcomes = ingest_files(facility=facility, paths=paths, source=IngestSource.UPLOAD)

    assert {o.status for o in outcomes} == {IngestStatus.STORED}
    assert row_counts(facility) == (3, 3, 6, 18, 0, 18)
    for study in Study.objects.filter(facility=facility):
        assert (study.num_series, study.num_instances, study.modalities) == (2, 6, "CT\\SR")
        assert study.total_bytes == sum(i.size for i in Instance.objects.filter(
            series__study=study))


@pytest.mark.django_db(transaction=True)
def test_concurrent_ingests_keep_one_row_per_instance_and_exact_counters(facility,
                                                                        testdata_dir):
    images = files_under(testdata_dir / JAPANESE_CD / "DCMDT")[:24]
    work = images + images[:4]  # four files sent twice

    def ingest(path):
        try:
            return ingest_file(facility=facility, path=path, source=IngestSource.SCP)
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(ingest, work))

    assert sum(o.status == IngestStatus.DUPLICATE for o in outcomes) == 4
    assert Instance.objects.filter(facility=facility).count() == 24
    assert len(stored_files()) == 24
    study = Study.objects.get(facility=facility)
    expected_series = {str(dcmread(p, stop_before_pixels=True).SeriesInstanceUID)
                       for p in images}
    assert study.num_series == len(expected_series) == study.series.count()
    assert study.num_instances == 24
    assert study.total_bytes == sum(p.stat().st_size for p in images)
    for series in study.series.all():
        assert series.num_instances == series.instances.count()
    assert Patient.objects.filter(facility=facility).count() == 1


def test_a_large_file_is_copied_and_checked_in_bounded_memory(facility, tmp_path):
    size = 3 * 2048 * 2048 * 2  # three frames of 2048 x 2048 16-bit pixels: 24 MiB
    path = make_dicom(tmp_path / "big.dcm", Rows=2048, Columns=2048, NumberOfFrames=3,
                      BitsAllocated=16, BitsStored=16, HighBit=15, PixelData=bytes(size))

    tracemalloc.start()
    try:
        outcome = ingest_file(facility=facility, path=path, source=IngestSource.UPLOAD)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert outcome.status == IngestStatus.STORED
    assert peak < 8 * 1024 * 1024
    assert outcome.instance.number_of_frames == 3
    with outcome.instance.file.open("rb") as fh:
        digest = hashlib.sha256()
        while chunk := fh.read(1024 * 1024):
            digest.update(chunk)
    assert digest.hexdigest() == outcome.sha256 == sha256(as_stored(path.read_bytes()))



def test_a_large_text_element_is_read_from_disc_and_checked(facility, tmp_path):
    # 2 MiB of Text Value (UT): left on disc while parsing, then read back to convert.
    path = make_dicom(tmp_path / "a.dcm", TextValue="x" * (2 * 1024 * 1024))
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(path.read_bytes()[:1024 * 1024])

    outcomes = ingest_files(facility=facility, paths=[path, cut], source=IngestSource.SCP)

    assert outcomes[0].status == IngestStatus.STORED
    assert outcomes[1].reason == services.TRUNCATED


def test_damaged_copies_of_a_file_are_stored_or_refused_but_never_raise(facility, tmp_path):
    original = (PYDICOM_DATA / "test_files" / "MR_small.dcm").read_bytes()
    rng = random.Random(11687)
    damaged = [original[:cut] for cut in range(0, len(original), 97)]
    for _copy in range(150):
        data = bytearray(original)
        for _flip in range(rng.randint(1, 4)):
            position = rng.randrange(128, 1400)  # File Meta and the data set's header
            data[position] = rng.randrange(256)
        damaged.append(bytes(data))

    outcomes = [ingest_file(facility=facility, fileobj=io.BytesIO(data),
                            source=IngestSource.UPLOAD) for data in damaged]

    refused = [o for o in outcomes if o.status == IngestStatus.REJECTED]
    assert refused and all(o.reason for o in refused)
    assert Instance.objects.filter(facility=facility).count() <= len(outcomes) - len(refused)
    assert not [p for p in Path(settings.SPOOL_DIR).rglob("*") if p.is_file()]
