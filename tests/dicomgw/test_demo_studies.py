"""The demo imaging a new installation starts with: what the generator writes, and what
``manage.py demo_studies`` puts in the archive."""

from collections import defaultdict
from datetime import date
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
from django.core.management import CommandError, call_command
from pydicom import dcmread
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
)

from dicomgw import demo
from dicomgw.models import Instance, InstanceConflict, Patient, Series, Study

VIEWER_ATTRIBUTES = [
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
    "StudyDate", "StudyTime", "StudyDescription", "AccessionNumber", "ReferringPhysicianName",
    "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "Modality", "BodyPartExamined",
    "Manufacturer", "InstitutionName", "SOPClassUID", "SOPInstanceUID", "InstanceNumber",
    "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated", "BitsStored",
    "PixelRepresentation", "WindowCenter", "WindowWidth",
]
DEMO_NAMES = ["Tremblay", "Okafor", "Nguyen", "Gagné", "Gagne"]
ANCHOR = date(2025, 6, 2)


def run_demo_studies(*args) -> str:
    out = StringIO()
    call_command("demo_studies", *args, stdout=out)
    return out.getvalue()


@pytest.fixture(scope="module")
def default_ct(tmp_path_factory) -> list[Path]:
    """The demo CT at its default size, written once for the tests that read it."""
    out_dir = tmp_path_factory.mktemp("ct")
    return list(demo.iter_ct_study(out_dir, demo.DEMO_STUDIES[0], seed=demo.DEFAULT_SEED,
                                   anchor=ANCHOR))


def test_default_ct_is_at_least_200_slices_of_512_square_signed_16_bit(default_ct):
    assert demo.DEFAULT_CT_SLICES >= 200
    assert len(default_ct) == demo.DEFAULT_CT_SLICES
    for path in default_ct:
        ds = dcmread(path, force=False)
        assert ds.SOPClassUID == CTImageStorage
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert (ds.Rows, ds.Columns) == (512, 512)
        assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (16, 16, 1)
        assert (float(ds.RescaleIntercept), float(ds.RescaleSlope)) == (-1024, 1)
        pixels = ds.pixel_array
        assert pixels.dtype == np.int16
        assert pixels.min() != pixels.max()


def test_default_ct_geometry_is_one_evenly_spaced_axial_stack(default_ct):
    headers = [dcmread(path, stop_before_pixels=True) for path in default_ct]
    assert [ds.InstanceNumber for ds in headers] == list(range(1, len(headers) + 1))
    assert {tuple(map(float, ds.ImageOrientationPatient)) for ds in headers} == {
        (1, 0, 0, 0, 1, 0)}
    assert len({tuple(map(float, ds.ImagePositionPatient[:2])) for ds in headers}) == 1
    assert {tuple(map(float, ds.PixelSpacing)) for ds in headers} == {(0.78125, 0.78125)}
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in headers])
    assert np.allclose(z, [float(ds.SliceLocation) for ds in headers])
    steps = -np.diff(z)  # head first: each slice is further towards the feet
    assert np.allclose(steps, float(headers[0].SliceThickness))
    assert float(headers[0].SliceThickness) > 0
    # One study, one series, one frame of reference; a UID of its own for each slice.
    for attribute in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert len({ds[attribute].value for ds in headers}) == 1
    uids = [ds.SOPInstanceUID for ds in headers]
    assert len(set(uids)) == len(uids)
    assert all(uid.is_valid for uid in uids + [headers[0].StudyInstanceUID])
    assert all(ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID for ds in headers)


def test_default_ct_pixels_are_hounsfield_units_a_window_preset_shows(default_ct):
    chest = dcmread(default_ct[len(default_ct) * 3 // 10])  # heart level
    hu = chest.pixel_array.astype(np.int32) * int(chest.RescaleSlope) + int(chest.RescaleIntercept)
    assert hu.min() != hu.max()
    def aerated(hu):
        """Lung-like values above the couch (whose foam core is lung-like too); air outside
        the patient is lower."""
        above_couch = hu[:400]
        return (above_couch > -950) & (above_couch < -700)

    lung = aerated(hu)
    assert np.count_nonzero(lung) > 0.05 * hu.size
    assert np.count_nonzero((hu > -150) & (hu < 250)) > 0.15 * hu.size  # fat, muscle, blood
    assert np.count_nonzero(hu > 500) > 100  # cortical bone: spine, ribs, sternum
    corner = hu[200:260, 10:40]  # air beside the patient
    assert abs(float(np.median(corner)) + 1000) < 40
    # The lungs end at the diaphragm: low in the scan there is next to no lung.
    pelvis = dcmread(default_ct[-5])
    pelvis_hu = pelvis.pixel_array.astype(np.int32) - 1024
    assert np.count_nonzero(aerated(pelvis_hu)) < np.count_nonzero(lung) / 10


def test_every_demo_file_reads_back_strictly_with_real_pixels(tmp_path):
    paths = demo.generate_demo_files(tmp_path, ct_slices=6, anchor=ANCHOR)
    by_modality: dict[str, list] = {}
    for path in paths:
        ds = dcmread(path, force=False)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        missing = [name for name in VIEWER_ATTRIBUTES if name not in ds]
        assert not missing, (path, missing)
        pixels = ds.pixel_array
        assert pixels.shape == (ds.Rows, ds.Columns)
        assert pixels.min() != pixels.max(), path
        by_modality.setdefault(ds.Modality, []).append(ds)
    assert {ds.SOPClassUID for ds in by_modality["CT"]} == {CTImageStorage}
    assert {ds.SOPClassUID for ds in by_modality["MR"]} == {MRImageStorage}
    assert {ds.SOPClassUID for ds in by_modality["CR"]} == {ComputedRadiographyImageStorage}
    assert {(ds.Rows, ds.Columns, ds.BitsStored) for ds in by_modality["MR"]} == {(256, 256, 12)}
    assert {ds.BitsStored for ds in by_modality["CR"]} == {12}
    assert {ds.PhotometricInterpretation for ds in by_modality["CR"]} == {
        "MONOCHROME1", "MONOCHROME2"}
    assert {ds.ViewPosition for ds in by_modality["CR"]} == {"PA", "LL"}
    assert all(ds.Rows >= 1024 and ds.Columns >= 1024 for ds in by_modality["CR"])
    mr_series = {(ds.StudyInstanceUID, ds.SeriesNumber) for ds in by_modality["MR"]}
    assert len(mr_series) == 5
    assert all(16 <= sum(1 for ds in by_modality["MR"]
                         if (ds.StudyInstanceUID, ds.SeriesNumber) == s) <= 30
               for s in mr_series)


def test_study_dates_count_back_from_the_anchor_newest_a_few_weeks_old(tmp_path):
    paths = demo.generate_demo_files(tmp_path, ct_slices=2, anchor=ANCHOR)
    dates = {}
    for path in paths:
        ds = dcmread(path, stop_before_pixels=True)
        dates[ds.StudyInstanceUID] = date.fromisoformat(
            f"{ds.StudyDate[:4]}-{ds.StudyDate[4:6]}-{ds.StudyDate[6:]}")
    ages = sorted((ANCHOR - day).days for day in dates.values())
    assert len(ages) == len(demo.DEMO_STUDIES)
    assert 7 <= ages[0] <= 45
    assert ages[-1] > 3 * 365


def test_same_seed_writes_the_same_bytes_and_another_seed_new_uids(tmp_path):
    study = next(s for s in demo.DEMO_STUDIES if s.modality == "CR")
    first = list(demo.iter_cr_study(tmp_path / "a", study, seed=7, anchor=ANCHOR,
                                    photometric="MONOCHROME2"))
    again = list(demo.iter_cr_study(tmp_path / "b", study, seed=7, anchor=ANCHOR,
                                    photometric="MONOCHROME2"))
    other = list(demo.iter_cr_study(tmp_path / "c", study, seed=8, anchor=ANCHOR,
                                    photometric="MONOCHROME2"))
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    uids = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in first}
    other_uids = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in other}
    assert uids.isdisjoint(other_uids)


def test_accented_name_is_written_in_latin_1_and_reads_back_intact(tmp_path):
    study = next(s for s in demo.DEMO_STUDIES if s.patient is demo.GAGNE)
    path = next(demo.iter_mr_study(tmp_path, study, [("T2", demo.SeriesSpec(2, "AX T2", 5))],
                                   seed=1, anchor=ANCHOR, slices=16, field_tesla=1.5))
    assert "Gagn\xe9^\xc9tienne".encode("latin-1") in path.read_bytes()
    ds = dcmread(path, force=False)
    assert ds.SpecificCharacterSet == "ISO_IR 100"
    assert str(ds.PatientName) == "Gagné^Étienne"


@pytest.mark.django_db
def test_command_archives_ct_mr_and_cr_studies_of_the_demo_patients(facility):
    output = run_demo_studies("--ct-slices", "5")

    studies = defaultdict(list)
    for study in Study.objects.filter(facility=facility):
        studies[study.modalities].append(study)
    assert sorted((m, len(s)) for m, s in studies.items()) == [("CR", 2), ("CT", 1), ("MR", 2)]
    assert studies["CT"][0].num_instances == 5
    assert sorted(s.num_series for s in studies["MR"]) == [2, 3]
    assert sorted(s.num_instances for s in studies["MR"]) == [40, 72]
    assert all(s.num_instances == 2 for s in studies["CR"])
    assert all(s.accession_number and s.description and s.referring_physician
               for s in Study.objects.filter(facility=facility))
    assert set(Series.objects.filter(study__facility=facility)
               .values_list("body_part", flat=True)) == {"CHESTABDPELVIS", "HEAD", "CHEST"}

    patients = {p.name: p for p in Patient.objects.filter(facility=facility)}
    assert set(patients) == {p.name for p in demo.DEMO_PATIENTS}
    assert patients["Gagné^Étienne"].birth_date == date(1954, 9, 30)
    assert all(p.birth_date and p.sex and p.patient_id for p in patients.values())
    assert set(Instance.objects.filter(facility=facility).values_list("source", flat=True)) == {
        "demo"}

    assert "4 patients, 5 studies, 121 images" in output
    assert "121 stored, 0 already archived" in output
    assert not any(name in output for name in DEMO_NAMES)


@pytest.mark.django_db
def test_command_default_archives_a_ct_of_at_least_200_images(facility):
    run_demo_studies()

    ct = Study.objects.get(facility=facility, modalities="CT")
    assert ct.num_instances >= 200
    assert ct.series.get().num_instances == demo.DEFAULT_CT_SLICES


@pytest.mark.django_db
def test_second_run_adds_nothing(facility):
    run_demo_studies("--ct-slices", "3")
    counts = (Patient.objects.count(), Study.objects.count(), Series.objects.count(),
              Instance.objects.count())

    output = run_demo_studies("--ct-slices", "3")

    assert (Patient.objects.count(), Study.objects.count(), Series.objects.count(),
            Instance.objects.count()) == counts
    assert not InstanceConflict.objects.exists()
    assert f"0 stored, {counts[3]} already archived" in output


@pytest.mark.django_db
def test_rerun_on_a_later_day_keeps_the_first_runs_dates_and_adds_nothing(facility):
    first = demo.demo_studies_load(facility=facility, ct_slices=2, today=date(2025, 1, 10))
    dates = dict(Study.objects.values_list("study_instance_uid", "study_date"))

    later = demo.demo_studies_load(facility=facility, ct_slices=2, today=date(2025, 4, 1))

    assert later.outcomes == {"duplicate": first.files}
    assert dict(Study.objects.values_list("study_instance_uid", "study_date")) == dates
    assert not InstanceConflict.objects.exists()


@pytest.mark.django_db
def test_another_seed_loads_a_second_set_of_studies(facility):
    run_demo_studies("--ct-slices", "2", "--seed", "11")
    run_demo_studies("--ct-slices", "2", "--seed", "12")

    assert Study.objects.filter(facility=facility).count() == 2 * len(demo.DEMO_STUDIES)


@pytest.mark.django_db
def test_facility_must_be_named_when_there_are_several(facility, other_facility):
    with pytest.raises(CommandError, match="--facility"):
        run_demo_studies("--ct-slices", "2")
    assert not Study.objects.exists()

    run_demo_studies("--ct-slices", "2", "--facility", other_facility.short_name)

    assert Study.objects.filter(facility=other_facility).count() == len(demo.DEMO_STUDIES)
    assert not Study.objects.filter(facility=facility).exists()


@pytest.mark.django_db
def test_missing_or_unknown_facility_is_a_clear_error():
    with pytest.raises(CommandError, match="no facility yet"):
        run_demo_studies("--ct-slices", "2")
    with pytest.raises(CommandError, match="No facility with the short name 'nowhere'"):
        run_demo_studies("--ct-slices", "2", "--facility", "nowhere")


@pytest.mark.django_db
def test_testdata_loads_the_corpus_including_the_japanese_cd(facility, testdata_dir):
    output = run_demo_studies("--ct-slices", "2", "--testdata")

    cd_study = Study.objects.get(facility=facility, patient__name__contains="古橋")
    assert cd_study.num_instances == 67
    assert cd_study.num_series == 5
    assert Study.objects.filter(facility=facility).count() > len(demo.DEMO_STUDIES) + 1
    cd_line = next(line for line in output.splitlines()
                   if line.strip().startswith("cd_ihe_pdi_hitachi_mr_jp:"))
    assert "67 stored" in cd_line
    assert "181 skipped (not DICOM)" in cd_line
    # The disc is a real patient's: his name never reaches the terminal.
    assert "古橋" not in output and "ﾌﾙﾊｼ" not in output and "Furuhashi" not in output


@pytest.mark.django_db
def test_testdata_folder_reports_stored_duplicate_and_skipped_counts(facility, tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "disc").mkdir(parents=True)
    study = demo.DEMO_STUDIES[0]
    images = demo.iter_ct_study(tmp_path / "generated", study, seed=99, anchor=ANCHOR, slices=2)
    for number, path in enumerate(images):
        (corpus / "disc" / f"IM{number}").write_bytes(path.read_bytes())
    (corpus / "disc" / "README.TXT").write_text("Insert the disc and run the viewer.\n")
    run_demo_studies("--ct-slices", "2", "--testdata", str(corpus))

    output = run_demo_studies("--ct-slices", "2", "--testdata", str(corpus))

    assert "  disc: 0 stored, 2 already archived, 1 skipped (not DICOM)" in output


@pytest.mark.django_db
def test_missing_testdata_folder_is_a_clear_error(facility, tmp_path):
    with pytest.raises(CommandError, match="Test data folder not found"):
        run_demo_studies("--ct-slices", "2", "--testdata", str(tmp_path / "absent"))
