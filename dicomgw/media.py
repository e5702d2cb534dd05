"""Media for recipients: the DICOMDIR, the streamed ZIP and the ISO 9660 disc image.

What goes on the media is decided once, up front, by ``media_plan`` from the archive
index: patients, studies, series and instances in order, each instance with its file
ID (``IMAGES/DICOMS/IM1``…), its size and its SHA-256. Everything after that is
written from the plan without asking the database again:

- the DICOMDIR (PS3.10 7.2, PS3.3 Annex F), laid out in one linear pass that gives its
  size, then encoded record by record as it is written (``Dicomdir``); pydicom's
  ``FileSet`` does the same job in quadratic time;
- a ZIP streamed with zipstream-ng in STORE mode, its length known before the first
  byte, the images first and the DICOMDIR after them (``zip_response``);
- an ISO 9660 image with Joliet names, laid out as IHE PDI asks of media (RAD-47,
  "Distribute Imaging Information on Media"), written by a Celery task into storage with
  progress on a ``MediaJob`` row (``iso_job_start``, ``iso_build``), served by
  ``dicomgw.media_views`` and removed when it expires (``media_jobs_purge``).

The DICOM files themselves are copied byte for byte from the archive: nothing here
opens an image to change it. pydicom is imported only to read the header of a file
whose record needs more than the index holds (a report, a waveform, a study without a
date): a web process streaming ZIPs of images never loads it, nor numpy."""

import contextlib
import datetime
import functools
import gc
import hashlib
import logging
import os
import re
import struct
import tempfile
import textwrap
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from zipfile import ZIP64_LIMIT, ZIP_FILECOUNT_LIMIT

from django.conf import settings
from django.core.files import File
from django.core.files.storage import default_storage
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.http import StreamingHttpResponse
from django.template.loader import render_to_string
from django.utils import timezone, translation
from django.utils.translation import gettext as _
from zipstream import ZIP_STORED, ZipStream
from zipstream.ng import ZIP64_ESTIMATE_FACTOR

from .models import Instance, MediaJob, Patient, Series, Study, archive_storage
from .services import DicomGatewayError, quiet_pydicom_reading

log = logging.getLogger(__name__)


class MediaError(DicomGatewayError):
    """Media cannot be made of what was asked (no images, too many, a bad viewer)."""


# --- Names ---------------------------------------------------------------------------

# PS3.10 8.2 / PS3.12: a component of a File ID is 1-8 characters from A-Z 0-9 and _.
FILE_ID_COMPONENT = re.compile(r"[A-Z0-9_]{1,8}")
IMAGE_FOLDER = ("IMAGES", "DICOMS")
# "IM" and up to six digits fit the eight characters of a component.
MAX_INSTANCES = 999_999


def ascii_fold(text: str) -> str:
    """``text`` with accents removed and anything else outside ASCII dropped."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).encode(
        "ascii", "ignore").decode()


def media_name(prefix: str, last_name: str) -> str:
    """``<prefix>_<Lastname>`` for a file or folder name: the name folded to ASCII,
    spaces as underscores, nothing but letters, digits, "-" and "_" ("Gagné" →
    "Gagne", "O'Brien" → "OBrien"); "Patient" when nothing is left."""
    folded = "_".join(ascii_fold(last_name).split())
    safe = re.sub(r"[^A-Za-z0-9_-]", "", folded).strip("_-")[:40]
    return f"{prefix}_{safe or 'Patient'}"


def family_name(person_name: str) -> str:
    """The family name of a DICOM PN value ("Family^Given=…"), from the first name group
    that has one."""
    for group in person_name.split("="):
        family = group.split("^")[0].strip()
        if family:
            return family
    return ""


# --- The plan ------------------------------------------------------------------------


@dataclass(slots=True)
class PlannedInstance:
    """One archived file on the media; it is also the media's file for it (see
    ``MediaFile``)."""

    instance_id: int
    storage_name: str
    size: int
    sha256: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    # As written in the DICOMDIR: the file's own number, or one made up when it has none.
    instance_number: int
    # Relative to the DICOMDIR, with "/": IMAGES/DICOMS/IM<n>.
    path: str = ""
    # As a MediaFile: the bytes come from the archive.
    data = None
    local_path = None
    chunks = None

    @property
    def file_id(self) -> tuple[str, ...]:
        """The Referenced File ID's components (PS3.10 8.2)."""
        return tuple(self.path.split("/"))


@dataclass(slots=True)
class PlannedSeries:
    series_instance_uid: str
    modality: str
    series_number: int
    description: str
    instances: list[PlannedInstance] = field(default_factory=list)


@dataclass(slots=True)
class PlannedStudy:
    study_pk: int
    study_instance_uid: str
    # DA and TM strings (PS3.5 6.2); never empty: see ``media_plan``.
    date: str
    time: str
    description: str
    accession_number: str
    study_id: str
    modalities: str
    series: list[PlannedSeries] = field(default_factory=list)

    @property
    def num_instances(self) -> int:
        return sum(len(series.instances) for series in self.series)

    @property
    def display_date(self) -> str:
        if self.date == UNKNOWN_DATE:
            return ""
        return f"{self.date[:4]}-{self.date[4:6]}-{self.date[6:8]}"


@dataclass(slots=True)
class PlannedPatient:
    name: str
    display_name: str
    # As written in the DICOMDIR: the archive's, or "NOID<n>" when it has none.
    patient_id: str
    birth_date: str
    sex: str
    studies: list[PlannedStudy] = field(default_factory=list)
    archived_patient_id: str = ""

    @property
    def display_birth_date(self) -> str:
        d = self.birth_date
        return f"{d[:4]}-{d[4:6]}-{d[6:8]}" if d else ""


@dataclass(slots=True)
class MediaPlan:
    """What goes on the media, in order (patient, study, series, instance), with every
    size known before anything is written."""

    patients: list[PlannedPatient]
    instances: list[PlannedInstance]
    facility_name: str
    study_pks: list[int]

    @property
    def total_bytes(self) -> int:
        return sum(instance.size for instance in self.instances)

    @property
    def studies(self) -> list[PlannedStudy]:
        return [study for patient in self.patients for study in patient.studies]

    @property
    def file_set_uid(self) -> str:
        """A UID for the file-set that depends only on its instances, so the same
        selection gives the same DICOMDIR, byte for byte."""
        uids = "".join([f"{instance.sop_instance_uid}/" for instance in self.instances])
        return derived_uid("media file-set", hashlib.sha256(uids.encode()).hexdigest())


# The root under which the file-set UIDs are derived, and the Implementation Class UID of
# the DICOMDIR's File Meta Information (PS3.10 7.1): pydicom's, so that the DICOMDIR is
# byte for byte what pydicom writes for the same keys (the tests hold it to that).
UID_ROOT = "1.2.826.0.1.3680043.8.498."
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.1"
IMPLEMENTATION_VERSION_NAME = "PH_MEDIA_1"
MEDIA_STORAGE_DIRECTORY_STORAGE = "1.2.840.10008.1.3.10"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"


def derived_uid(*sources: str) -> str:
    """A UID under UID_ROOT that the same ``sources`` always give (the digits of their
    SHA-512, cut to the 64 characters of PS3.5 9.1), as pydicom's ``generate_uid`` with
    ``entropy_srcs`` derives one."""
    digest = hashlib.sha512("".join(sources).encode("utf-8")).hexdigest()
    return f"{UID_ROOT}{int(digest, 16)}"[:64]


# PS3.3 F.5.2 makes Study Date and Time type 1. When neither the index nor the file
# knows them we write these, as dcmtk's dcmmkdir does in its "invent" mode: plainly
# placeholders to anyone reading the index, and the image files are not touched.
UNKNOWN_DATE = "19000101"
UNKNOWN_TIME = "000000"
# Tried, in this order, when a study has no date in the index (PS3.3 C.7.3.1, C.7.6.1).
FALLBACK_DATE_TAGS = (("SeriesDate", "SeriesTime"), ("AcquisitionDate", "AcquisitionTime"),
                      ("ContentDate", "ContentTime"),
                      ("InstanceCreationDate", "InstanceCreationTime"))


def media_plan(*, studies: Iterable[Study]) -> MediaPlan:
    """Plan the media of ``studies``: every archived instance of them, ordered by
    patient (name), study (date), series (number) and instance (number), numbered
    IM1…IMn under IMAGES/DICOMS.

    The DICOMDIR's keys come from the archive index. Where the index lacks a key that
    PS3.3 Annex F makes type 1, one is derived: Patient ID "NOID<n>", Study ID from the
    accession number or a counter, Study Date and Time from the first image's series,
    acquisition or content date (else 19000101 000000), Modality "OT", series and
    instance numbers following the highest ones present. Raises ``MediaError`` when
    the studies hold no image."""
    study_pks = sorted({study.pk for study in studies})
    study_rows = list(Study.objects.filter(pk__in=study_pks).select_related("facility"))
    if not study_rows:
        raise MediaError(_("there are no studies to put on it"))
    patient_rows = {p.pk: p for p in Patient.objects.filter(
        pk__in={s.patient_id for s in study_rows})}
    series_rows = list(Series.objects.filter(study_id__in=study_pks).values_list(
        "pk", "study_id", "series_instance_uid", "modality", "series_number", "description"))
    # One query in media order within each series (an index scan on the series), read
    # in chunks and turned into the plan's objects as it comes; a SOP class or transfer
    # syntax UID is kept once however many instances share it.
    by_series: dict[int, list[PlannedInstance]] = {}
    shared: dict[str, str] = {}
    rows = (Instance.objects.filter(series__study_id__in=study_pks)
            .order_by("series_id", F("instance_number").asc(nulls_last=True), "pk")
            .values_list("pk", "series_id", "file", "size", "sha256", "sop_class_uid",
                         "sop_instance_uid", "transfer_syntax_uid", "instance_number"))
    for (instance_pk, series_pk, name, size, sha256, sop_class, sop_instance, syntax,
         instance_number) in rows.iterator(chunk_size=5000):
        planned = by_series.get(series_pk)
        if planned is None:
            planned = by_series[series_pk] = []
        # Numbered (its path) below, once the patients are in order.
        planned.append(PlannedInstance(
            instance_pk, name, size, sha256, shared.setdefault(sop_class, sop_class),
            sop_instance, shared.setdefault(syntax, syntax), instance_number))
    if not by_series:
        raise MediaError(_("the studies hold no images yet"))
    total = sum(len(planned) for planned in by_series.values())
    if total > MAX_INSTANCES:
        raise MediaError(_("more than %(count)s images do not fit on one disc or ZIP")
                         % {"count": MAX_INSTANCES})

    series_by_study: dict[int, list[tuple]] = {}
    for row in series_rows:
        if row[0] in by_series:  # a series without images gets no record
            series_by_study.setdefault(row[1], []).append(row)

    def study_order(study: Study):
        return (study.study_date is None, study.study_date or datetime.date.min,
                study.study_time or datetime.time.min, study.pk)

    planned_patients: dict[int, PlannedPatient] = {}
    study_counter = 0
    for study in sorted(study_rows, key=study_order):
        if study.pk not in series_by_study:
            continue
        patient = planned_patients.get(study.patient_id)
        if patient is None:
            row = patient_rows[study.patient_id]
            patient = planned_patients[study.patient_id] = PlannedPatient(
                name=row.name, display_name=row.display_name, patient_id=row.patient_id,
                birth_date=row.birth_date.strftime("%Y%m%d") if row.birth_date else "",
                sex=row.sex, archived_patient_id=row.patient_id)
        study_counter += 1
        planned_study = PlannedStudy(
            study_pk=study.pk, study_instance_uid=study.study_instance_uid,
            date=study.study_date.strftime("%Y%m%d") if study.study_date else "",
            time=_tm(study.study_time) if study.study_time else "",
            description=study.description, accession_number=study.accession_number,
            study_id=study.study_id or study.accession_number[:16] or str(study_counter),
            modalities=study.modalities.replace("\\", ", "))
        patient.studies.append(planned_study)
        series_list = sorted(series_by_study[study.pk],
                             key=lambda r: (r[4] is None, r[4] or 0, r[0]))
        next_series_number = _after_highest(r[4] for r in series_list)
        for pk, _study, uid, modality, number, description in series_list:
            if number is None:
                number, next_series_number = next_series_number, next_series_number + 1
            planned_series = PlannedSeries(
                series_instance_uid=uid, modality=_cs(modality) or "OT",
                series_number=number, description=description)
            planned_study.series.append(planned_series)
            planned_series.instances = by_series[pk]
            next_number = _after_highest(i.instance_number for i in planned_series.instances)
            for instance in planned_series.instances:  # those without come last
                if instance.instance_number is None:
                    instance.instance_number, next_number = next_number, next_number + 1
        if not planned_study.date:
            planned_study.date, fallback_time = _date_from_file(
                planned_study.series[0].instances[0].storage_name)
            planned_study.time = planned_study.time or fallback_time
        planned_study.time = planned_study.time or UNKNOWN_TIME

    patients = sorted(planned_patients.values(),
                      key=lambda p: (p.display_name.casefold(), p.birth_date, p.patient_id))
    unidentified = (p for p in patients if not p.patient_id)
    for number, patient in enumerate(unidentified, start=1):
        patient.patient_id = f"NOID{number}"
    instances = [i for p in patients for s in p.studies for r in s.series for i in r.instances]
    folder = "/".join(IMAGE_FOLDER)
    for number, instance in enumerate(instances, start=1):
        instance.path = f"{folder}/IM{number}"
    facility = study_rows[0].facility
    return MediaPlan(patients=patients, instances=instances, facility_name=facility.name,
                     study_pks=[s.study_pk for p in patients for s in p.studies])


def _after_highest(numbers: Iterable[int | None]) -> int:
    present = [n for n in numbers if n is not None]
    return max(present) + 1 if present else 1


def _tm(value: datetime.time) -> str:
    text = value.strftime("%H%M%S")
    return f"{text}.{value.microsecond:06d}" if value.microsecond else text


def _cs(value: str) -> str:
    """A Code String (PS3.5 6.2): upper case, digits, space and "_", 16 at most."""
    return re.sub(r"[^A-Z0-9 _]", "", value.upper()).strip()[:16]


def _date_from_file(storage_name: str) -> tuple[str, str]:
    """A study date and time read from one of its images, for a study the index has no
    date for; (19000101, "") when the file has none either."""
    from pydicom import dcmread

    quiet_pydicom_reading()
    tags = [tag for pair in FALLBACK_DATE_TAGS for tag in pair]
    try:
        with archive_storage().open(storage_name, "rb") as fh:
            ds = dcmread(fh, stop_before_pixels=True, specific_tags=tags)
    except Exception:  # a file we cannot read still goes on the media
        log.warning("media: no date could be read from an archived file")
        return UNKNOWN_DATE, ""
    for date_tag, time_tag in FALLBACK_DATE_TAGS:
        date = re.sub(r"\D", "", str(ds.get(date_tag) or ""))[:8]
        if len(date) == 8:
            moment = re.sub(r"[^\d.]", "", str(ds.get(time_tag) or ""))[:13]
            return date, moment if moment[:2].isdigit() else ""
    return UNKNOWN_DATE, ""


# --- The DICOMDIR --------------------------------------------------------------------
#
# The Basic Directory IOD (PS3.3 F.3) is written in Explicit VR Little Endian (PS3.10
# 8.6). ``Dicomdir`` lays it out first: every record's length is known from its keys
# (the few PATIENT, STUDY and SERIES records are encoded then, an IMAGE record is
# counted from its parts), so the file's size and every offset follow without writing
# anything. The records are then encoded one after another as the file is read, each
# with its offsets filled in: the whole job is linear in the number of records, and
# nothing per image is held but the plan.
#
# Records of the common kinds (PATIENT, STUDY, SERIES, IMAGE) are encoded by the small
# encoder below, which the tests hold to pydicom's encoding of the same Dataset; other
# leaf records (SR, waveform, presentation state, RT…) are built by pydicom's
# DIRECTORY_RECORDERS from the file's header and encoded by pydicom.

ITEM = (0xFFFE, 0xE000)
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                      b"UR", b"UT", b"UV"})
# A record begins with its item header, then (0004,1400) UL the offset of the next
# record, (0004,1410) US the in-use flag, (0004,1420) UL the offset of the first record
# of the level below (PS3.3 F.3.2.2): three numbers between constant bytes.
RECORD_START = struct.Struct("<4sL8sL18sL")
ITEM_TAG = struct.pack("<HH", *ITEM)
NEXT_OFFSET_HEAD = struct.pack("<HH2sH", 0x0004, 0x1400, b"UL", 4)
IN_USE_AND_LOWER_OFFSET_HEAD = (struct.pack("<HH2sHH", 0x0004, 0x1410, b"US", 2, 0xFFFF)
                                + struct.pack("<HH2sH", 0x0004, 0x1420, b"UL", 4))
FILE_SET_ID = "IMAGES"


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian data element (PS3.5 7.1.2), the value padded to an
    even length: with NUL for UI and binary VRs, with a space for text."""
    if len(value) & 1:
        value += b"\0" if vr in (b"UI", b"OB", b"UN") else b" "
    if vr in LONG_VRS:
        return struct.pack("<HH2s2xL", group, element, vr, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _ul(group: int, element: int, value: int) -> bytes:
    return _element(group, element, b"UL", struct.pack("<L", value))


def _record_start(content_length: int, next_offset: int, lower_offset: int) -> bytes:
    return RECORD_START.pack(ITEM_TAG, content_length, NEXT_OFFSET_HEAD, next_offset,
                             IN_USE_AND_LOWER_OFFSET_HEAD, lower_offset)


# What follows the item header in a record's first three elements.
RECORD_HEAD_LENGTH = RECORD_START.size - 8
RECORD_TYPES = {}


def _record_type_element(record_type: str) -> bytes:
    encoded = RECORD_TYPES.get(record_type)
    if encoded is None:
        encoded = RECORD_TYPES[record_type] = _element(0x0004, 0x1430, b"CS",
                                                       record_type.encode())
    return encoded


def _record(record_type: str, body: bytes) -> bytes:
    content = _record_type_element(record_type) + body
    return _record_start(RECORD_HEAD_LENGTH + len(content), 0, 0) + content


def _linked(record: bytes, next_offset: int, lower_offset: int) -> bytes:
    """An encoded record with its offsets set (an offset is a 4-byte UL, so no length
    changes)."""
    return _record_start(len(record) - 8, next_offset, lower_offset) + record[RECORD_START.size:]


# The character sets a record may declare (PS3.3 C.12.1.1.2), tried in this order.
CHARACTER_SETS = (("", "ascii"), ("ISO_IR 100", "latin_1"), ("ISO_IR 192", "utf_8"))


def _character_set(texts: Iterable[str]) -> tuple[str, str]:
    """The narrowest character set that encodes every text: none (the default
    repertoire), Latin-1, else UTF-8. PS3.3 F.5: Specific Character Set is 1C, required
    when a key uses more than the default repertoire."""
    joined = "".join(texts)
    for term, codec in CHARACTER_SETS:
        try:
            joined.encode(codec)
        except UnicodeEncodeError:
            continue
        return term, codec
    return CHARACTER_SETS[-1]


def _keys(elements: list[tuple[int, int, bytes, str]], codec: str, charset: str) -> bytes:
    """Encode record keys given as (group, element, VR, text), in tag order."""
    if charset:
        elements.append((0x0008, 0x0005, b"CS", charset))
    elements.sort()
    out = []
    for group, element, vr, text in elements:
        if vr == b"UI":
            out.append(_element(group, element, vr, text.encode("ascii")))
        elif vr in (b"PN", b"LO", b"SH", b"LT", b"ST", b"UT", b"UC"):
            out.append(_element(group, element, vr, text.encode(codec)))
        else:
            out.append(_element(group, element, vr, text.encode("ascii", "replace")))
    return b"".join(out)


def _lo(text: str, limit: int = 64) -> str:
    """A LO/SH/PN value cut to the VR's length, without "\\" (PS3.5 6.2)."""
    return text.replace("\\", " ").strip()[:limit]


def _pn(name: str) -> str:
    return "=".join(group[:64] for group in name.replace("\\", " ").split("="))


def patient_record(patient: PlannedPatient) -> bytes:
    """PS3.3 F.5.1: Patient's Name (2), Patient ID (1), with birth date and sex (3)."""
    name, patient_id = _pn(patient.name), _lo(patient.patient_id)
    charset, codec = _character_set((name, patient_id))
    elements = [(0x0010, 0x0010, b"PN", name), (0x0010, 0x0020, b"LO", patient_id)]
    if patient.birth_date:
        elements.append((0x0010, 0x0030, b"DA", patient.birth_date))
    if patient.sex:
        elements.append((0x0010, 0x0040, b"CS", _cs(patient.sex)))
    return _record("PATIENT", _keys(elements, codec, charset))


def study_record(study: PlannedStudy) -> bytes:
    """PS3.3 F.5.2: Study Date, Time, ID (1), Description, Accession Number (2), Study
    Instance UID (1C, always given)."""
    description, accession = _lo(study.description), _lo(study.accession_number, 16)
    study_id = _lo(study.study_id, 16)
    charset, codec = _character_set((description, accession, study_id))
    return _record("STUDY", _keys([
        (0x0008, 0x0020, b"DA", study.date), (0x0008, 0x0030, b"TM", study.time),
        (0x0008, 0x0050, b"SH", accession), (0x0008, 0x1030, b"LO", description),
        (0x0020, 0x000D, b"UI", study.study_instance_uid), (0x0020, 0x0010, b"SH", study_id),
    ], codec, charset))


def series_record(series: PlannedSeries) -> bytes:
    """PS3.3 F.5.3: Modality, Series Instance UID, Series Number (1); the description
    (3) helps a reader choose."""
    description = _lo(series.description)
    charset, codec = _character_set((description,))
    elements = [(0x0008, 0x0060, b"CS", series.modality),
                (0x0020, 0x000E, b"UI", series.series_instance_uid),
                (0x0020, 0x0011, b"IS", str(series.series_number))]
    if description:
        elements.append((0x0008, 0x103E, b"LO", description))
    return _record("SERIES", _keys(elements, codec, charset))


@functools.lru_cache(maxsize=256)
def _shared_uid_element(element: int, uid: str) -> bytes:
    """A (0004,xxxx) UI element whose value most records share (SOP class, syntax)."""
    return _element(0x0004, element, b"UI", uid.encode())


def _referenced_file(instance: PlannedInstance) -> bytes:
    """PS3.3 F.3.2.2: Referenced File ID, and the SOP Class, SOP Instance and Transfer
    Syntax UIDs of the file (1C: required in a record that references a file)."""
    return (_element(0x0004, 0x1500, b"CS", instance.path.replace("/", "\\").encode())
            + _shared_uid_element(0x1510, instance.sop_class_uid)
            + _element(0x0004, 0x1511, b"UI", instance.sop_instance_uid.encode())
            + _shared_uid_element(0x1512, instance.transfer_syntax_uid))


IMAGE_TYPE = _record_type_element("IMAGE")
FILE_ID_TAG = struct.pack("<HH2s", 0x0004, 0x1500, b"CS")
SOP_INSTANCE_TAG = struct.pack("<HH2s", 0x0004, 0x1511, b"UI")
INSTANCE_NUMBER_TAG = struct.pack("<HH2s", 0x0020, 0x0013, b"IS")
# An IMAGE record without its values: its start, type and the headers of its File ID,
# SOP Instance UID and Instance Number elements.
IMAGE_RECORD_FIXED = RECORD_START.size + len(IMAGE_TYPE) + 3 * 8
_pack_length = struct.Struct("<H").pack


def _even(length: int) -> int:
    return length + (length & 1)


def image_record(instance: PlannedInstance, *, at: int = 0, last: bool = True) -> bytes:
    """PS3.3 F.5.4: Instance Number (1). The one record there is thousands of, so it is
    put together from its parts in one go (the same bytes as ``_record`` and
    ``_referenced_file`` would give, which the tests check against pydicom). Unless it
    is the ``last`` of its series, the next record follows it: starting ``at`` an
    offset, it points there."""
    file_id = instance.path.replace("/", "\\").encode()
    if len(file_id) & 1:
        file_id += b" "
    uid = instance.sop_instance_uid.encode()
    if len(uid) & 1:
        uid += b"\0"
    number = str(instance.instance_number).encode()
    if len(number) & 1:
        number += b" "
    sop_class = _shared_uid_element(0x1510, instance.sop_class_uid)
    syntax = _shared_uid_element(0x1512, instance.transfer_syntax_uid)
    length = (IMAGE_RECORD_FIXED + len(file_id) + len(sop_class) + len(uid) + len(syntax)
              + len(number))
    return b"".join((
        _record_start(length - 8, 0 if last else at + length, 0),
        IMAGE_TYPE,
        FILE_ID_TAG, _pack_length(len(file_id)), file_id,
        sop_class,
        SOP_INSTANCE_TAG, _pack_length(len(uid)), uid,
        syntax,
        INSTANCE_NUMBER_TAG, _pack_length(len(number)), number,
    ))


@functools.lru_cache(maxsize=256)
def _image_record_base(sop_class_uid: str, transfer_syntax_uid: str) -> int:
    """The length of an IMAGE record less its three values of its own."""
    return (IMAGE_RECORD_FIXED + len(_shared_uid_element(0x1510, sop_class_uid))
            + len(_shared_uid_element(0x1512, transfer_syntax_uid)))


def image_record_length(instance: PlannedInstance) -> int:
    """The length of ``image_record(instance)``, counted without encoding it."""
    return (_image_record_base(instance.sop_class_uid, instance.transfer_syntax_uid)
            + _even(len(instance.path)) + _even(len(instance.sop_instance_uid))
            + _even(len(str(instance.instance_number))))


# The leaf record of the SOP classes that are not images (PS3.3 F.4, F.5; PS3.4 B.5).
# Every other SOP class gets an IMAGE record, as an unknown class is most likely one.
SOP_CLASS_RECORD_TYPES = {
    "1.2.840.10008.5.1.4.1.1.481.2": "RT DOSE",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT STRUCTURE SET",
    "1.2.840.10008.5.1.4.1.1.481.4": "RT TREAT RECORD",
    "1.2.840.10008.5.1.4.1.1.481.5": "RT PLAN",
    "1.2.840.10008.5.1.4.1.1.481.6": "RT TREAT RECORD",
    "1.2.840.10008.5.1.4.1.1.481.7": "RT TREAT RECORD",
    "1.2.840.10008.5.1.4.1.1.481.8": "RT PLAN",
    "1.2.840.10008.5.1.4.1.1.481.9": "RT TREAT RECORD",
    "1.2.840.10008.5.1.4.1.1.11.1": "PRESENTATION",
    "1.2.840.10008.5.1.4.1.1.11.2": "PRESENTATION",
    "1.2.840.10008.5.1.4.1.1.11.3": "PRESENTATION",
    "1.2.840.10008.5.1.4.1.1.11.4": "PRESENTATION",
    "1.2.840.10008.5.1.4.1.1.11.5": "PRESENTATION",
    "1.2.840.10008.5.1.4.1.1.11.6": "PRESENTATION",
    "1.2.840.10008.5.1.4.1.1.11.7": "PRESENTATION",
    "1.2.840.10008.5.1.4.1.1.11.8": "PRESENTATION",
    "1.2.840.10008.5.1.4.1.1.11.9": "PRESENTATION",
    "1.2.840.10008.5.1.4.1.1.11.10": "PRESENTATION",
    "1.2.840.10008.5.1.4.1.1.11.11": "PRESENTATION",
    "1.2.840.10008.5.1.4.1.1.66": "RAW DATA",
    "1.2.840.10008.5.1.4.1.1.66.1": "REGISTRATION",
    "1.2.840.10008.5.1.4.1.1.66.2": "FIDUCIAL",
    "1.2.840.10008.5.1.4.1.1.66.3": "REGISTRATION",
    "1.2.840.10008.5.1.4.1.1.66.5": "SURFACE",
    "1.2.840.10008.5.1.4.1.1.67": "VALUE MAP",
    "1.2.840.10008.5.1.4.1.1.4.2": "SPECTROSCOPY",
    "1.2.840.10008.5.1.4.1.1.104.1": "ENCAP DOC",
    "1.2.840.10008.5.1.4.1.1.104.2": "ENCAP DOC",
    "1.2.840.10008.5.1.4.1.1.104.3": "ENCAP DOC",
    "1.2.840.10008.5.1.4.1.1.104.4": "ENCAP DOC",
    "1.2.840.10008.5.1.4.1.1.104.5": "ENCAP DOC",
    "1.2.840.10008.5.1.4.1.1.88.59": "KEY OBJECT DOC",
}
# Every SOP class under these roots is of the one kind: waveforms (PS3.4 B.5, "…9.x.y")
# and structured reports ("…88.x").
SOP_CLASS_ROOT_RECORD_TYPES = (("1.2.840.10008.5.1.4.1.1.9.", "WAVEFORM"),
                               ("1.2.840.10008.5.1.4.1.1.88.", "SR DOCUMENT"))


@functools.lru_cache(maxsize=256)
def leaf_record_type(sop_class_uid: str) -> str:
    found = SOP_CLASS_RECORD_TYPES.get(sop_class_uid)
    if found:
        return found
    for root, record_type in SOP_CLASS_ROOT_RECORD_TYPES:
        if sop_class_uid.startswith(root):
            return record_type
    return "IMAGE"


def leaf_record(instance: PlannedInstance) -> bytes:
    """The directory record of one instance: IMAGE from the index alone; any other kind
    from the keys in the file's header (pydicom's recorder for that kind). A file that
    lacks a key its kind requires still goes into the DICOMDIR, as an IMAGE record
    (PS3.3 F.5: the record that needs nothing but an instance number)."""
    record_type = leaf_record_type(instance.sop_class_uid)
    if record_type == "IMAGE":
        return image_record(instance)
    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO
    from pydicom.fileset import DIRECTORY_RECORDERS
    from pydicom.filewriter import write_dataset

    quiet_pydicom_reading()
    try:
        with archive_storage().open(instance.storage_name, "rb") as fh:
            ds = dcmread(fh, stop_before_pixels=True)
        keys = DIRECTORY_RECORDERS[record_type](ds)
        # The whole content tree of a report would double it on the media; the record
        # names it by its title and dates (PS3.3 F.5.24: Content Sequence is 1C).
        keys.pop("ContentSequence", None)
        if "SpecificCharacterSet" in ds:
            keys.SpecificCharacterSet = ds.SpecificCharacterSet
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
        write_dataset(buffer, keys)
        return _record(record_type, _referenced_file(instance) + buffer.getvalue())
    except Exception:  # a missing key or an odd header costs the record its kind only
        log.info("media: %s record not possible for instance %s; IMAGE record instead",
                 record_type, instance.instance_id)
        return image_record(instance)


class Dicomdir:
    """The DICOMDIR file (PS3.10 7.2, Basic Directory IOD PS3.3 F.3) of a plan: one
    PATIENT → STUDY → SERIES → leaf hierarchy, records depth-first.

    Made, it knows its ``size``; ``chunks()`` then encodes it in order, a few dozen
    kilobytes at a time. PS3.3 F.3.2.1: offsets count from the first byte of the file
    (the preamble's), and 0 means "none". Depth-first, a record's first child is the
    record right after it, and its next sibling comes after everything below it."""

    CHUNK = 64 * 1024

    def __init__(self, plan: MediaPlan):
        self.plan = plan
        # Encoded now: PATIENT, STUDY and SERIES records, and leaf records other than
        # IMAGE (they need the file's header); with the length of each container's
        # records and everything below them. Keyed by id() of the planned object.
        self._encoded: dict[int, bytes] = {}
        self._extent: dict[int, int] = {}
        records_length = sum(self._lay_out(patient, patient_record(patient), (
            (study, study_record(study), (
                (series, series_record(series), None) for series in study.series))
            for study in patient.studies)) for patient in plan.patients)
        head = (_file_meta(plan.file_set_uid)
                + _element(0x0004, 0x1130, b"CS", FILE_SET_ID.encode()))
        # Then (0004,1200) and (0004,1202) UL, the first and last record of the root
        # directory entity; (0004,1212) US, consistent; (0004,1220) SQ, the records.
        header_length = len(head) + 12 + 12 + 10 + 12
        first = last = 0
        if plan.patients:
            first = header_length
            last = header_length + records_length - self._extent[id(plan.patients[-1])]
        self.header = (head + _ul(0x0004, 0x1200, first) + _ul(0x0004, 0x1202, last)
                       + _element(0x0004, 0x1212, b"US", struct.pack("<H", 0))
                       + struct.pack("<HH2s2xL", 0x0004, 0x1220, b"SQ", records_length))
        self.size = header_length + records_length

    def _lay_out(self, node, record: bytes, children) -> int:
        """Keep ``node``'s encoded record and return the length of it and everything
        below it; ``children`` is None for a series, whose leaves are counted."""
        self._encoded[id(node)] = record
        extent = len(record)
        if children is None:
            for instance in node.instances:
                if leaf_record_type(instance.sop_class_uid) == "IMAGE":
                    extent += image_record_length(instance)
                else:
                    leaf = self._encoded[id(instance)] = leaf_record(instance)
                    extent += len(leaf)
        else:
            extent += sum(self._lay_out(child, child_record, grandchildren)
                          for child, child_record, grandchildren in children)
        self._extent[id(node)] = extent
        return extent

    def chunks(self) -> Iterator[bytes]:
        position = len(self.header)
        pending = [self.header]
        pending_size = position

        def container(node, last: bool) -> bytes:
            record = self._encoded[id(node)]
            following = 0 if last else position + self._extent[id(node)]
            return _linked(record, following, position + len(record))

        patients = self.plan.patients
        for p_index, patient in enumerate(patients):
            for s_index, study in enumerate(patient.studies):
                for r_index, series in enumerate(study.series):
                    records = []
                    if r_index == 0:
                        if s_index == 0:
                            records.append(container(patient, p_index == len(patients) - 1))
                            position += len(records[-1])
                        records.append(container(study, s_index == len(patient.studies) - 1))
                        position += len(records[-1])
                    records.append(container(series, r_index == len(study.series) - 1))
                    position += len(records[-1])
                    pending.extend(records)
                    pending_size += sum(len(r) for r in records)
                    last_leaf = len(series.instances) - 1
                    for i_index, instance in enumerate(series.instances):
                        leaf = self._encoded.get(id(instance))
                        if leaf is None:
                            leaf = image_record(instance, at=position,
                                                last=i_index == last_leaf)
                        elif i_index != last_leaf:
                            leaf = _linked(leaf, position + len(leaf), 0)
                        position += len(leaf)
                        pending.append(leaf)
                        pending_size += len(leaf)
                        if pending_size >= self.CHUNK:
                            yield b"".join(pending)
                            pending, pending_size = [], 0
        if position != self.size:  # the layout and the encoding disagree
            raise MediaError(_("the disc index could not be written"))
        if pending:
            yield b"".join(pending)


def _file_meta(file_set_uid: str) -> bytes:
    """The preamble, "DICM" and the File Meta Information of a DICOMDIR (PS3.10 7.1)."""
    elements = b"".join((
        _element(0x0002, 0x0001, b"OB", b"\0\1"),  # File Meta Information Version
        _element(0x0002, 0x0002, b"UI", MEDIA_STORAGE_DIRECTORY_STORAGE.encode()),
        _element(0x0002, 0x0003, b"UI", file_set_uid.encode()),
        _element(0x0002, 0x0010, b"UI", EXPLICIT_VR_LITTLE_ENDIAN.encode()),
        _element(0x0002, 0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode()),
        _element(0x0002, 0x0013, b"SH", IMPLEMENTATION_VERSION_NAME.encode()),
    ))
    return b"\0" * 128 + b"DICM" + _ul(0x0002, 0x0000, len(elements)) + elements


def dicomdir_bytes(plan: MediaPlan) -> bytes:
    """The whole DICOMDIR of ``plan`` (see ``Dicomdir``)."""
    return b"".join(Dicomdir(plan).chunks())


# --- What goes on the media besides the images --------------------------------------


@dataclass(frozen=True, slots=True)
class MediaFile:
    """One file of the media: ``path`` relative to the media's root ("/"-separated),
    its bytes from ``data``, an archived file (``storage_name``), a file of the viewer
    (``local_path``) or ``chunks()``, generated as it is written (the DICOMDIR; its
    ``sha256`` is then empty, counted as it goes out)."""

    path: str
    size: int
    sha256: str
    data: bytes | None = None
    storage_name: str | None = None
    local_path: Path | None = None
    chunks: Callable[[], Iterable[bytes]] | None = None


# A file of the media: generated or from the viewer (MediaFile), or archived
# (PlannedInstance, which has the same attributes).
MediaEntry = MediaFile | PlannedInstance


def _generated(path: str, data: bytes) -> MediaFile:
    return MediaFile(path=path, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                     data=data)


@dataclass(frozen=True)
class ViewerFiles:
    files: tuple[tuple[str, Path, int, str], ...]  # (relative path, file, size, sha256)
    entry: str | None  # the page INDEX.HTM opens, relative to the viewer folder


def viewer_files(viewer_dir: Path) -> ViewerFiles:
    """The files of an offline viewer folder (hidden ones left out), hashed once per
    process for as long as the folder does not change."""
    viewer_dir = Path(viewer_dir)
    if not viewer_dir.is_dir():
        raise MediaError(_("the viewer folder does not exist"))
    found = sorted(
        (path for path in viewer_dir.rglob("*")
         if path.is_file() and not any(part.startswith(".")
                                       for part in path.relative_to(viewer_dir).parts)),
        key=lambda p: p.relative_to(viewer_dir).as_posix())
    signature = tuple((p.relative_to(viewer_dir).as_posix(), p.stat().st_size,
                       p.stat().st_mtime_ns) for p in found)
    return _viewer_files(str(viewer_dir), signature)


@functools.lru_cache(maxsize=8)
def _viewer_files(viewer_dir: str, signature: tuple) -> ViewerFiles:
    files = []
    for relative, size, _mtime in signature:
        path = Path(viewer_dir, relative)
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        files.append((relative, path, size, digest.hexdigest()))
    names = {relative.lower(): relative for relative, *_rest in files}
    entry = next((names[n] for n in ("index.html", "index.htm") if n in names), None)
    if entry is None:
        entry = next((r for r, *_rest in files
                      if "/" not in r and r.lower().endswith((".html", ".htm"))), None)
    return ViewerFiles(files=tuple(files), entry=entry)


def _default_viewer_dir() -> Path | None:
    configured = getattr(settings, "MEDIA_VIEWER_DIR", None)
    return Path(configured) if configured else None


def media_files(*, plan: MediaPlan, include_viewer: bool, viewer_dir: Path | None,
                disc: bool) -> list[MediaEntry]:
    """Every file of the media in the order they are written: on a disc README.TXT,
    DICOMDIR, INDEX.HTM, the viewer under IHE_PDI/, then the images; in a ZIP
    README.TXT, the images, then DICOMDIR, INDEX.HTM and the viewer (when included), so
    that the images start at once while the DICOMDIR is written from the plan after
    them (``zip_stream`` adds SHA256SUMS). ``viewer_dir`` defaults to
    settings.MEDIA_VIEWER_DIR; with no viewer there, ``include_viewer`` adds nothing."""
    if include_viewer and viewer_dir is None:
        viewer_dir = _default_viewer_dir()
    viewer = viewer_files(viewer_dir) if include_viewer and viewer_dir else None
    created = timezone.localdate()
    context = {
        "plan": plan, "viewer": viewer, "created": created,
        "product_name": settings.PRODUCT_NAME, "site_url": settings.SITE_URL,
        "support_phone": settings.SUPPORT_PHONE, "support_email": settings.SUPPORT_EMAIL,
        "num_studies": len(plan.studies), "num_instances": len(plan.instances),
        "disc": disc, "with_index": disc or viewer is not None,
    }
    readme = _wrapped(ascii_fold(render_to_string("media/README.TXT", context)))
    # README.TXT is plain ASCII text, lines ending in CR LF so that the simplest Windows
    # editor shows them.
    readme_bytes = readme.replace("\n", "\r\n").encode()
    dicomdir = Dicomdir(plan)
    index_files = [MediaFile(path="DICOMDIR", size=dicomdir.size, sha256="",
                             chunks=dicomdir.chunks)]
    if context["with_index"]:
        index_files.append(_generated("INDEX.HTM", render_to_string("media/INDEX.HTM", context)
                                      .encode("utf-8")))
    if viewer is not None:
        index_files.extend(MediaFile(path=f"IHE_PDI/{relative}", size=size, sha256=sha256,
                                     local_path=path)
                           for relative, path, size, sha256 in viewer.files)
    readme_file = _generated("README.TXT", readme_bytes)
    if disc:
        return [readme_file, *index_files, *plan.instances]
    return [readme_file, *plan.instances, *index_files]


def _wrapped(text: str, width: int = 78) -> str:
    """Long lines folded at ``width``, continuation lines indented as the first."""
    lines = []
    for line in text.replace("\r\n", "\n").split("\n"):
        indent = line[:len(line) - len(line.lstrip())]
        lines.append(textwrap.fill(line, width, initial_indent="", subsequent_indent=indent,
                                   break_on_hyphens=False) if len(line) > width else line)
    return "\n".join(lines)


SHA256_HEX_LENGTH = 64


def sha256sums(files: Iterable[MediaEntry],
               counted: dict[str, str] | None = None) -> Iterator[bytes]:
    """SHA256SUMS in GNU coreutils' format, so ``sha256sum -c SHA256SUMS`` checks the
    folder, a few dozen kilobytes at a time. ``counted`` holds the digests of generated
    files (path → hex), counted as they were written."""
    counted = counted or {}
    lines: list[str] = []
    for media_file in files:
        lines.append(f"{media_file.sha256 or counted[media_file.path]}  {media_file.path}\n")
        if len(lines) == 512:
            yield "".join(lines).encode("utf-8")
            lines = []
    yield "".join(lines).encode("utf-8")


def sha256sums_size(files: Iterable[MediaEntry]) -> int:
    return sum(SHA256_HEX_LENGTH + 2 + len(f.path.encode()) + 1 for f in files)


# --- Reading the files ---------------------------------------------------------------

READ_CHUNK = 1 << 20


def _archive_path(storage_name: str) -> str | None:
    """The file's path when the archive is on a local file system, else None."""
    try:
        return archive_storage().path(storage_name)
    except NotImplementedError:
        return None


def _read_chunks(media_file: MediaEntry) -> Iterator[bytes]:
    """The file's bytes in chunks; opened when first read, closed when done. A file that
    is not the size the plan says stops the stream: the length announced to the client
    would be wrong."""
    if media_file.data is not None:
        yield media_file.data
        return
    if media_file.chunks is not None:
        written = 0
        for chunk in media_file.chunks():
            written += len(chunk)
            yield chunk
        if written != media_file.size:
            raise MediaError(_("the disc index could not be written"))
        return
    if media_file.local_path is not None:
        fh = open(media_file.local_path, "rb")
    else:
        path = _archive_path(media_file.storage_name)
        fh = open(path, "rb") if path else archive_storage().open(media_file.storage_name, "rb")
    read = 0
    with fh:
        while chunk := fh.read(READ_CHUNK):
            read += len(chunk)
            yield chunk
    if read != media_file.size:
        raise MediaError(_("an archived image is not the size the archive recorded"))


# --- ZIP -----------------------------------------------------------------------------
#
# zipstream-ng writes the archive: a local header, the STORED data and a data
# descriptor per file (so the CRC-32 is computed as the data goes out), then the
# central directory. Entries are handed to it one at a time while it streams, so that
# nothing per file is queued before the first byte; the length the response announces
# is computed by ``zip_length`` from the names and sizes alone (APPNOTE.TXT 4.3, 4.4 and
# the ZIP64 records of 4.3.14-4.3.15 and 4.5.3, decided as zipstream-ng decides them).

COALESCE_BYTES = 256 * 1024
LOCAL_HEADER = 30
CENTRAL_HEADER = 46
END_RECORD = 22
ZIP64_END_RECORDS = 56 + 20  # ZIP64 end of central directory record and locator


def _zip_name(name: str) -> bytes:
    try:
        return name.encode("ascii")
    except UnicodeEncodeError:
        return name.encode("utf-8")  # with the language encoding flag (APPNOTE 4.4.4)


def zip_length(entries: Iterable[tuple[str, int]]) -> int:
    """The exact size of the STORE-mode archive zipstream-ng writes for these (name,
    size) entries, in this order."""
    files_size = central_size = count = 0
    for name, size in entries:
        name_length = len(name) if name.isascii() else len(_zip_name(name))
        zip64 = size * ZIP64_ESTIMATE_FACTOR > ZIP64_LIMIT
        extras = (1 if files_size > ZIP64_LIMIT else 0) + (2 if size > ZIP64_LIMIT else 0)
        files_size += (LOCAL_HEADER + name_length + (20 if zip64 else 0) + size
                       + (24 if zip64 else 16))
        central_size += CENTRAL_HEADER + name_length + (4 + 8 * extras if extras else 0)
        count += 1
    end = END_RECORD
    if count >= ZIP_FILECOUNT_LIMIT or files_size > ZIP64_LIMIT or central_size > ZIP64_LIMIT:
        end += ZIP64_END_RECORDS
    return files_size + central_size + end


def _coalesced(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Zip headers and descriptors are a few dozen bytes each: gather small pieces into
    writes of about COALESCE_BYTES, pass big ones through as they are."""
    pending: list[bytes] = []
    pending_size = 0
    for chunk in chunks:
        if len(chunk) >= COALESCE_BYTES:
            if pending:
                yield b"".join(pending)
                pending, pending_size = [], 0
            yield chunk
            continue
        pending.append(chunk)
        pending_size += len(chunk)
        if pending_size >= COALESCE_BYTES:
            yield b"".join(pending)
            pending, pending_size = [], 0
    if pending:
        yield b"".join(pending)


def zip_entries(*, files: list[MediaEntry], root: str) -> list[tuple[str, int]]:
    """(name in the archive, size) of every entry: the files under ``root``, then
    SHA256SUMS, whose length is counted here and its text written at the end."""
    return [*((f"{root}/{f.path}", f.size) for f in files),
            (f"{root}/SHA256SUMS", sha256sums_size(files))]


def _counted(chunks: Iterable[bytes], path: str, counted: dict[str, str]) -> Iterator[bytes]:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
        yield chunk
    counted[path] = digest.hexdigest()


def zip_chunks(*, files: list[MediaEntry], root: str) -> Iterator[bytes]:
    """The archive of ``files`` under the folder ``root`` with SHA256SUMS last, generated
    as it is read: each file is queued and written in turn, then the central
    directory."""
    stream = ZipStream(compress_type=ZIP_STORED)
    counted: dict[str, str] = {}
    for media_file in files:
        name = f"{root}/{media_file.path}"
        if media_file.data is not None:
            stream.add(media_file.data, name)
        else:
            chunks = _read_chunks(media_file)
            if not media_file.sha256:
                chunks = _counted(chunks, media_file.path, counted)
            stream.add(chunks, name, size=media_file.size)
        yield from stream.file()
    stream.add(sha256sums(files, counted), f"{root}/SHA256SUMS", size=sha256sums_size(files))
    yield from stream.file()
    yield from stream.footer()


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Planning makes a few small objects per image, none in a cycle; a full run of the
    cyclic garbage collector in the middle would walk every object of the process
    (about a fifth of the time to the first byte of a 10,000-image ZIP, measured).
    Reference counting still frees everything; the collector resumes afterwards."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def zip_response(*, studies: Iterable[Study], patient_last_name: str, include_viewer: bool,
                 viewer_dir: Path | None = None) -> StreamingHttpResponse:
    """The studies as ``IMAGES_<Lastname>.zip``, streamed as it is built.

    It extracts to ``IMAGES_<Lastname>/`` holding DICOMDIR, README.TXT, SHA256SUMS and
    IMAGES/DICOMS/IM1…, plus INDEX.HTM and IHE_PDI/ when the viewer is included. Every
    entry is STORED (the images are already as small as their transfer syntax makes
    them) and every DICOM file is the archive's, byte for byte. Before the first byte
    only the plan is read and the length counted; the DICOMDIR is encoded once the
    images have gone, from the plan. Memory does not depend on the bytes sent (the
    plan holds a few hundred bytes per image). Raises ``MediaError`` when there is
    nothing to put in it."""
    with _collector_paused():
        plan = media_plan(studies=studies)
        root = media_name("IMAGES", patient_last_name)
        files = media_files(plan=plan, include_viewer=include_viewer, viewer_dir=viewer_dir,
                            disc=False)
        length = zip_length(zip_entries(files=files, root=root))
    response = StreamingHttpResponse(_coalesced(zip_chunks(files=files, root=root)),
                                     content_type="application/zip")
    response["Content-Length"] = str(length)
    response["Content-Disposition"] = f'attachment; filename="{root}.zip"'
    response["Cache-Control"] = "no-store"
    log.info("media zip: studies=%s instances=%s bytes=%s", len(plan.study_pks),
             len(plan.instances), length)
    return response


# --- ISO 9660 ------------------------------------------------------------------------
#
# ECMA-119 (ISO 9660) at interchange level 1 (names 8.3 of A-Z 0-9 _, which the
# DICOM file IDs are already, PS3.12), with a Joliet supplementary volume descriptor
# (UCS-2 names up to 64 characters) for the viewer's own file names. Layout: the
# system area (sectors 0-15), the primary and Joliet volume descriptors and the
# terminator, the four path tables, the primary directories, the Joliet directories,
# then each file's data from a sector boundary, in plan order; both directory trees
# point at the same file extents. Metadata is built in memory (it grows with the
# number of files, not their size); the data is copied by the kernel
# (copy_file_range) from the archive straight into the image.

SECTOR = 2048
SYSTEM_AREA_SECTORS = 16
# Trailing zero sectors that CD writers and old Linux read-ahead expect (mkisofs -pad).
PAD_SECTORS = 150
MAX_DEPTH = 8  # ECMA-119 6.8.2.1
D_CHARACTERS = re.compile(r"[^A-Z0-9_]")
JOLIET_MAX = 64
JOLIET_FORBIDDEN = re.compile(r"[\x00-\x1f*/:;?\\]")


@dataclass(eq=False)
class _Node:
    name: str  # as given (the Joliet name before it is made safe)
    parent: "_Node | None"
    media_file: MediaEntry | None = None
    children: dict[str, "_Node"] = field(default_factory=dict)
    iso_name: bytes = b""
    joliet_name: bytes = b""
    # Directories: extent and length of each tree's directory; files: of the data.
    iso_extent: int = 0
    iso_size: int = 0
    joliet_extent: int = 0
    joliet_size: int = 0
    iso_number: int = 0
    joliet_number: int = 0

    @property
    def is_dir(self) -> bool:
        return self.media_file is None

    @property
    def depth(self) -> int:
        return 1 if self.parent is None else self.parent.depth + 1


def _both16(value: int) -> bytes:
    return struct.pack("<H", value) + struct.pack(">H", value)


def _both32(value: int) -> bytes:
    return struct.pack("<L", value) + struct.pack(">L", value)


def _sectors(size: int) -> int:
    return -(-size // SECTOR)


def _iso_file_name(name: str, is_dir: bool, taken: set[bytes]) -> bytes:
    """An interchange-level-1 identifier (ECMA-119 7.5, 7.6): up to 8 d-characters, for
    a file "." up to 3 more and ";1"; made unique in its directory by a numeric tail."""
    stem, dot, extension = name.rpartition(".") if not is_dir and "." in name[1:] else (
        name, "", "")
    stem = D_CHARACTERS.sub("_", ascii_fold(stem).upper())[:8] or "_"
    extension = D_CHARACTERS.sub("_", ascii_fold(extension).upper())[:3]
    counter = 0
    while True:
        tail = f"_{counter}" if counter else ""
        candidate = stem[:8 - len(tail)] + tail
        identifier = candidate if is_dir else f"{candidate}.{extension};1"
        encoded = identifier.encode("ascii")
        if encoded not in taken:
            taken.add(encoded)
            return encoded
        counter += 1


def _joliet_name(name: str, taken: set[bytes]) -> bytes:
    """A Joliet identifier: the real name in UCS-2 big-endian, forbidden characters and
    those beyond UCS-2 replaced, at most 64 characters, unique in its directory."""
    safe = "".join("_" if ord(c) > 0xFFFF else c for c in JOLIET_FORBIDDEN.sub("_", name))
    counter = 0
    while True:
        tail = f"_{counter}" if counter else ""
        stem, dot, extension = safe.rpartition(".") if "." in safe[1:] else (safe, "", "")
        room = JOLIET_MAX - len(tail) - len(dot) - len(extension)
        candidate = f"{stem[:max(room, 1)]}{tail}{dot}{extension}"[:JOLIET_MAX]
        encoded = candidate.encode("utf-16-be")
        if encoded not in taken:
            taken.add(encoded)
            return encoded
        counter += 1


def _identifier_order(identifier: bytes) -> tuple[bytes, bytes]:
    """ECMA-119 9.3: directory records in order of name, then extension (the version
    is always 1 here); comparing unpadded strings of characters above 0x20 gives the
    standard's space-padded order."""
    name, _dot, rest = identifier.partition(b".")
    return name, rest


def _directory_record(identifier: bytes, extent: int, size: int, is_dir: bool,
                      recorded: bytes) -> bytes:
    """ECMA-119 9.1: one directory record, padded to an even length."""
    length = 33 + len(identifier) + (0 if len(identifier) % 2 else 1)
    return (struct.pack("<BB", length, 0) + _both32(extent) + _both32(size) + recorded
            + struct.pack("<BBB", 2 if is_dir else 0, 0, 0) + _both16(1)
            + struct.pack("<B", len(identifier)) + identifier
            + (b"" if len(identifier) % 2 else b"\0"))


def _record_size(identifier: bytes) -> int:
    return 33 + len(identifier) + (0 if len(identifier) % 2 else 1)


def _directory_size(identifiers: Iterable[bytes]) -> int:
    """Bytes of a directory's records, none crossing a sector boundary (ECMA-119 6.8.1.1);
    always whole sectors."""
    used = 0
    for identifier in (b"\0", b"\1", *identifiers):
        size = _record_size(identifier)
        if used % SECTOR + size > SECTOR:
            used += SECTOR - used % SECTOR
        used += size
    return _sectors(used) * SECTOR


def _iso_time(moment: datetime.datetime) -> bytes:
    """ECMA-119 9.1.5: seven bytes, in UTC."""
    return struct.pack("<BBBBBBb", moment.year - 1900, moment.month, moment.day, moment.hour,
                       moment.minute, moment.second, 0)


def _volume_time(moment: datetime.datetime | None) -> bytes:
    """ECMA-119 8.4.26.1: digits and a zone offset; all zeros means "not specified"."""
    if moment is None:
        return b"0" * 16 + b"\0"
    return moment.strftime("%Y%m%d%H%M%S").encode() + b"00" + b"\0"


class IsoLayout:
    """Where every structure and file of the image goes, computed before a byte is
    written."""

    def __init__(self, files: list[MediaEntry], *, volume_id: str,
                 now: datetime.datetime):
        self.files = files
        self.volume_id = D_CHARACTERS.sub("_", volume_id.upper())[:32]
        self.now = now.astimezone(datetime.UTC)
        self.root = _Node(name="", parent=None)
        for media_file in files:
            self._insert(media_file)
        self._name(self.root)
        self.iso_dirs = self._numbered(lambda n: n.iso_name, "iso_number")
        self.joliet_dirs = self._numbered(lambda n: n.joliet_name, "joliet_number")
        self._allocate()

    def _insert(self, media_file: MediaEntry) -> None:
        parts = media_file.path.split("/")
        node = self.root
        for part in parts[:-1]:
            child = node.children.get(part)
            if child is None:
                child = node.children[part] = _Node(name=part, parent=node)
            elif not child.is_dir:
                raise MediaError(_("%(name)s is both a file and a folder") % {"name": part})
            node = child
        if parts[-1] in node.children:
            raise MediaError(_("two files have the same name"))
        leaf = node.children[parts[-1]] = _Node(name=parts[-1], parent=node,
                                                media_file=media_file)
        if leaf.depth > MAX_DEPTH + 1:  # a file may sit in a directory at the 8th level
            raise MediaError(_("the viewer's folders are nested too deeply for a disc"))

    def _name(self, directory: _Node) -> None:
        iso_taken: set[bytes] = set()
        joliet_taken: set[bytes] = set()
        # Names that are already valid level-1 identifiers (the DICOM file-set) go
        # first, so a mangled name can never take one of them.
        for child in sorted(directory.children.values(),
                            key=lambda c: (not FILE_ID_COMPONENT.fullmatch(c.name), c.name)):
            child.iso_name = _iso_file_name(child.name, child.is_dir, iso_taken)
            child.joliet_name = _joliet_name(child.name, joliet_taken)
            if child.is_dir:
                self._name(child)

    def _numbered(self, name_of: Callable[[_Node], bytes], attribute: str) -> list[_Node]:
        """The directories in path-table order (ECMA-119 6.9.1: by level, then by the
        parent's number, then by identifier), numbered from 1."""
        ordered = [self.root]
        setattr(self.root, attribute, 1)
        index = 0
        while index < len(ordered):
            directory = ordered[index]
            for child in sorted((c for c in directory.children.values() if c.is_dir),
                                key=lambda c: _identifier_order(name_of(c))):
                ordered.append(child)
                setattr(child, attribute, len(ordered))
            index += 1
        return ordered

    @staticmethod
    def _path_table(directories: list[_Node], name_of, number_of, extent_of,
                    big_endian: bool) -> bytes:
        """ECMA-119 9.4: one path table, type L (little-endian) or M (big-endian)."""
        order = ">" if big_endian else "<"
        out = []
        for directory in directories:
            identifier = b"\0" if directory.parent is None else name_of(directory)
            parent = 1 if directory.parent is None else number_of(directory.parent)
            out.append(struct.pack(f"{order}BBLH", len(identifier), 0, extent_of(directory),
                                   parent) + identifier + (b"\0" if len(identifier) % 2
                                                           else b""))
        return b"".join(out)

    def _allocate(self) -> None:
        for directory in self.iso_dirs:
            directory.iso_size = _directory_size(c.iso_name for c in directory.children.values())
        for directory in self.joliet_dirs:
            directory.joliet_size = _directory_size(
                c.joliet_name for c in directory.children.values())
        # The path tables' sizes do not depend on where the directories go.
        self.iso_path_table_size = len(self._path_table(
            self.iso_dirs, lambda n: n.iso_name, lambda n: n.iso_number, lambda n: 0, False))
        self.joliet_path_table_size = len(self._path_table(
            self.joliet_dirs, lambda n: n.joliet_name, lambda n: n.joliet_number,
            lambda n: 0, False))
        sector = SYSTEM_AREA_SECTORS + 3  # PVD, Joliet SVD, terminator
        iso_table_sectors = _sectors(self.iso_path_table_size)
        joliet_table_sectors = _sectors(self.joliet_path_table_size)
        self.iso_l_table, sector = sector, sector + iso_table_sectors
        self.iso_m_table, sector = sector, sector + iso_table_sectors
        self.joliet_l_table, sector = sector, sector + joliet_table_sectors
        self.joliet_m_table, sector = sector, sector + joliet_table_sectors
        for directory in self.iso_dirs:
            directory.iso_extent, sector = sector, sector + directory.iso_size // SECTOR
        for directory in self.joliet_dirs:
            directory.joliet_extent, sector = sector, sector + directory.joliet_size // SECTOR
        self.data_start = sector
        self.leaves: list[_Node] = []
        by_file = {}
        for directory in self.iso_dirs:
            for child in directory.children.values():
                if not child.is_dir:
                    by_file[id(child.media_file)] = child
        for media_file in self.files:
            leaf = by_file[id(media_file)]
            leaf.iso_extent = leaf.joliet_extent = sector
            leaf.iso_size = leaf.joliet_size = media_file.size
            sector += _sectors(media_file.size)
            self.leaves.append(leaf)
        self.total_sectors = sector + PAD_SECTORS

    @property
    def size(self) -> int:
        return self.total_sectors * SECTOR

    def _directory(self, directory: _Node, joliet: bool) -> bytes:
        name_of = (lambda n: n.joliet_name) if joliet else (lambda n: n.iso_name)
        extent_of = (lambda n: n.joliet_extent) if joliet else (lambda n: n.iso_extent)
        size_of = (lambda n: n.joliet_size) if joliet else (lambda n: n.iso_size)
        recorded = _iso_time(self.now)
        parent = directory.parent or directory
        entries = [(b"\0", directory), (b"\1", parent)] + sorted(
            ((name_of(c), c) for c in directory.children.values()),
            key=lambda pair: _identifier_order(pair[0]))
        out = bytearray()
        for identifier, node in entries:
            record = _directory_record(identifier, extent_of(node), size_of(node),
                                       node.is_dir, recorded)
            if len(out) % SECTOR + len(record) > SECTOR:
                out += bytes(SECTOR - len(out) % SECTOR)
            out += record
        out += bytes(size_of(directory) - len(out))
        return bytes(out)

    def _volume_descriptor(self, joliet: bool) -> bytes:
        """ECMA-119 8.4 (primary) or 8.5 with the Joliet escape sequence (supplementary)."""
        def text(value: str, length: int) -> bytes:
            if joliet:
                encoded = value.encode("utf-16-be")[:length]
                padded = encoded + b"\0 " * ((length - len(encoded)) // 2)
                return padded.ljust(length, b" ")
            return value.encode("ascii", "replace")[:length].ljust(length, b" ")

        root = self.root
        extent, size = ((root.joliet_extent, root.joliet_size) if joliet
                        else (root.iso_extent, root.iso_size))
        table_size = self.joliet_path_table_size if joliet else self.iso_path_table_size
        l_table, m_table = ((self.joliet_l_table, self.joliet_m_table) if joliet
                            else (self.iso_l_table, self.iso_m_table))
        application = ascii_fold(f"{settings.PRODUCT_NAME} media writer")
        created = _volume_time(self.now)
        descriptor = b"".join([
            struct.pack("<B5sBB", 2 if joliet else 1, b"CD001", 1, 0),
            text("", 32),  # system identifier
            text(self.volume_id, 32),
            bytes(8),
            _both32(self.total_sectors),
            (b"%/E" + bytes(29)) if joliet else bytes(32),  # UCS-2 level 3 (Joliet)
            _both16(1), _both16(1), _both16(SECTOR),  # set size, sequence, block size
            _both32(table_size),
            struct.pack("<L", l_table), struct.pack("<L", 0),
            struct.pack(">L", m_table), struct.pack(">L", 0),
            _directory_record(b"\0", extent, size, True, _iso_time(self.now)),
            text("", 128),  # volume set
            text("", 128),  # publisher
            text("", 128),  # data preparer
            text(application, 128),
            text("", 37), text("", 37), text("", 37),  # copyright, abstract, bibliography
            created, created, _volume_time(None), created,
            struct.pack("<BB", 1, 0),  # file structure version
        ])
        return descriptor.ljust(SECTOR, b"\0")

    def metadata(self) -> Iterator[tuple[int, bytes]]:
        """(byte offset, bytes) of every structure before the file data."""
        yield (SYSTEM_AREA_SECTORS * SECTOR, self._volume_descriptor(joliet=False))
        yield ((SYSTEM_AREA_SECTORS + 1) * SECTOR, self._volume_descriptor(joliet=True))
        yield ((SYSTEM_AREA_SECTORS + 2) * SECTOR,
               struct.pack("<B5sB", 255, b"CD001", 1).ljust(SECTOR, b"\0"))
        for sector, dirs, name_of, number_of, extent_of, big in (
            (self.iso_l_table, self.iso_dirs, lambda n: n.iso_name, lambda n: n.iso_number,
             lambda n: n.iso_extent, False),
            (self.iso_m_table, self.iso_dirs, lambda n: n.iso_name, lambda n: n.iso_number,
             lambda n: n.iso_extent, True),
            (self.joliet_l_table, self.joliet_dirs, lambda n: n.joliet_name,
             lambda n: n.joliet_number, lambda n: n.joliet_extent, False),
            (self.joliet_m_table, self.joliet_dirs, lambda n: n.joliet_name,
             lambda n: n.joliet_number, lambda n: n.joliet_extent, True),
        ):
            yield sector * SECTOR, self._path_table(dirs, name_of, number_of, extent_of, big)
        for directory in self.iso_dirs:
            yield directory.iso_extent * SECTOR, self._directory(directory, joliet=False)
        for directory in self.joliet_dirs:
            yield directory.joliet_extent * SECTOR, self._directory(directory, joliet=True)


COPY_CHUNK = 64 << 20


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _copy_into(fd_out: int, offset: int, media_file: MediaEntry,
               progress: Callable[[int], None]) -> None:
    """Write one file's bytes at ``offset``: by copy_file_range from a local file (the
    kernel moves the data), else chunk by chunk. A file that is not the size the plan
    says fails the image."""
    source = media_file.local_path or (
        _archive_path(media_file.storage_name) if media_file.storage_name else None)
    if media_file.data is not None:
        _pwrite_all(fd_out, media_file.data, offset)
        progress(len(media_file.data))
        return
    written = 0
    if source is not None:
        fd_in = os.open(source, os.O_RDONLY)
        try:
            if os.fstat(fd_in).st_size != media_file.size:
                raise MediaError(_("an archived image is not the size the archive recorded"))
            while written < media_file.size:
                try:
                    copied = os.copy_file_range(fd_in, fd_out,
                                                min(COPY_CHUNK, media_file.size - written),
                                                written, offset + written)
                except OSError:  # no copy_file_range across these file systems
                    break
                if copied == 0:
                    break
                written += copied
                progress(copied)
            while written < media_file.size:
                chunk = os.pread(fd_in, min(READ_CHUNK * 4, media_file.size - written), written)
                if not chunk:
                    break
                _pwrite_all(fd_out, chunk, offset + written)
                written += len(chunk)
                progress(len(chunk))
        finally:
            os.close(fd_in)
    else:
        for chunk in _read_chunks(media_file):
            _pwrite_all(fd_out, chunk, offset + written)
            written += len(chunk)
            progress(len(chunk))
    if written != media_file.size:
        raise MediaError(_("an archived image is not the size the archive recorded"))


def iso_write(*, files: list[MediaEntry], out_path: Path, volume_id: str,
              progress: Callable[[int, int], None] | None = None,
              now: datetime.datetime | None = None) -> int:
    """Write the ISO 9660 + Joliet image of ``files`` to ``out_path``; returns its size.
    ``progress(bytes_written, files_written)`` is called as the data goes in."""
    layout = IsoLayout(files, volume_id=volume_id, now=now or timezone.now())
    done = {"bytes": 0, "files": 0}

    def advance(count: int) -> None:
        done["bytes"] += count
        if progress:
            progress(done["bytes"], done["files"])

    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        # The image is sized first; what is never written (the system area, the tails
        # of sectors, the padding) reads back as zeros.
        os.ftruncate(fd, layout.size)
        for offset, data in layout.metadata():
            _pwrite_all(fd, data, offset)
        for leaf in layout.leaves:
            _copy_into(fd, leaf.iso_extent * SECTOR, leaf.media_file, advance)
            done["files"] += 1
            if progress:
                progress(done["bytes"], done["files"])
    finally:
        os.close(fd)
    return layout.size


# --- ISO jobs ------------------------------------------------------------------------

# Progress goes to the row at most this often (the status fragment polls every second).
PROGRESS_INTERVAL = 0.5
ISO_MAX_ATTEMPTS = 3
# The image is written beside its final name under this suffix, then renamed.
PARTIAL_SUFFIX = ".part"


def _stale_after() -> datetime.timedelta:
    """A RUNNING job whose row has not moved for this long has lost its worker."""
    return datetime.timedelta(seconds=getattr(settings, "MEDIA_JOB_STALE_SECONDS", 300))


def _iso_spec_key(*, studies: list[Study], last_name: str, include_viewer: bool,
                  viewer_dir: str) -> str:
    """What makes two disc images the same: the studies and how many images and bytes
    each holds now (an image arriving later makes a new disc), the name and viewer."""
    parts = [f"{s.pk}:{s.num_instances}:{s.total_bytes}" for s in sorted(studies,
                                                                         key=lambda s: s.pk)]
    parts += [media_name("ISO", last_name), str(include_viewer), viewer_dir]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def iso_job_start(*, studies: Iterable[Study], patient_last_name: str, include_viewer: bool,
                  owner_ref: str, expires_at: datetime.datetime,
                  viewer_dir: Path | None = None) -> MediaJob:
    """A disc image of ``studies`` for ``owner_ref``: the live job (queued, running, or
    ready and not expired) for the same content is returned, its expiry moved later if
    ``expires_at`` is; else a new job is queued for the worker."""
    study_pks = sorted({study.pk for study in studies})
    rows = list(Study.objects.filter(pk__in=study_pks).select_related("facility"))
    if not rows:
        raise MediaError(_("there are no studies to put on it"))
    if include_viewer and viewer_dir is None:
        viewer_dir = _default_viewer_dir()
    viewer = str(Path(viewer_dir).resolve()) if include_viewer and viewer_dir else ""
    key = _iso_spec_key(studies=rows, last_name=patient_last_name,
                        include_viewer=bool(viewer), viewer_dir=viewer)
    live = MediaJob.objects.filter(owner_ref=owner_ref, spec_key=key,
                                   status__in=MediaJob.LIVE_STATUSES)
    now = timezone.now()
    for _attempt in range(3):
        existing = live.first()
        if existing is not None and existing.expires_at <= now:
            _expire(existing)
            existing = None
        if existing is not None:
            if expires_at > existing.expires_at:
                MediaJob.objects.filter(pk=existing.pk).update(expires_at=expires_at)
                existing.expires_at = expires_at
            return existing
        try:
            with transaction.atomic():
                job = MediaJob.objects.create(
                    facility=rows[0].facility, kind=MediaJob.Kind.ISO, owner_ref=owner_ref,
                    spec_key=key, study_ids=study_pks, patient_last_name=patient_last_name,
                    include_viewer=bool(viewer), viewer_dir=viewer, expires_at=expires_at,
                    bytes_total=sum(s.total_bytes for s in rows),
                    language=translation.get_language() or "")
                _enqueue_iso(job.pk)
            return job
        except IntegrityError:
            continue  # another request created it a moment ago: take that one
    return live.get()


def _enqueue_iso(job_id: int) -> None:
    from .tasks import build_media_iso

    build_media_iso.delay_on_commit(job_id)


def _claim(job_id: int) -> bool:
    """Take the job: a queued one, or a running one whose worker is gone (one
    conditional UPDATE, so two workers never both win)."""
    now = timezone.now()
    claimable = Q(status=MediaJob.Status.QUEUED) | Q(status=MediaJob.Status.RUNNING,
                                                      updated_at__lt=now - _stale_after())
    return bool(MediaJob.objects.filter(claimable, pk=job_id, expires_at__gt=now).update(
        status=MediaJob.Status.RUNNING, attempts=F("attempts") + 1, started_at=now,
        finished_at=None, updated_at=now, bytes_done=0, files_done=0, error=""))


def iso_build(*, job_id: int) -> float | None:
    """Build the disc image of MediaJob ``job_id`` into storage (the task's body).

    Claims the job first, so a duplicate or redelivered message does nothing. Writes
    ``ISO_<Lastname>.iso`` beside its final name and renames it once complete, with
    progress on the row as the data goes in. A storage failure is tried again (the
    seconds to wait are returned) up to ISO_MAX_ATTEMPTS runs; anything else fails
    the job with a message for the recipient."""
    if not _claim(job_id):
        return None
    job = MediaJob.objects.get(pk=job_id)
    storage = default_storage
    if job.file:  # a run that died half-way left its name on the row
        _delete_quietly(storage, job.file.name)
        _delete_quietly(storage, job.file.name + PARTIAL_SUFFIX)
    name = f"discs/{uuid.uuid4().hex}/{job.download_name}"
    MediaJob.objects.filter(pk=job.pk).update(file=name)
    with translation.override(job.language or settings.LANGUAGE_CODE):
        return _iso_build(job, storage, name)


def _iso_build(job: MediaJob, storage, name: str) -> float | None:
    """``iso_build`` once the job is claimed and named: plan, write, finish."""
    try:
        plan = media_plan(studies=Study.objects.filter(pk__in=job.study_ids))
        files = media_files(plan=plan, include_viewer=job.include_viewer,
                            viewer_dir=Path(job.viewer_dir) if job.viewer_dir else None,
                            disc=True)
        MediaJob.objects.filter(pk=job.pk).update(
            bytes_total=sum(f.size for f in files), files_total=len(files),
            updated_at=timezone.now())
        size = _write_iso_to_storage(job, files, storage, name)
    except MediaError as exc:
        _fail(job, _("The disc image could not be made: %(reason)s.") % {"reason": exc})
        return None
    except OSError as exc:
        log.warning("media job %s: storage failure (%s)", job.pk, type(exc).__name__)
        _delete_quietly(storage, name)
        if job.attempts < ISO_MAX_ATTEMPTS:
            MediaJob.objects.filter(pk=job.pk, status=MediaJob.Status.RUNNING).update(
                status=MediaJob.Status.QUEUED, updated_at=timezone.now())
            return 30.0 * job.attempts
        _fail(job, _("The disc image could not be written. Please try again later."))
        return None
    except Exception:
        log.exception("media job %s failed", job.pk)
        _delete_quietly(storage, name)
        _fail(job, _("The disc image could not be made. Please try again later."))
        raise
    now = timezone.now()
    finished = MediaJob.objects.filter(pk=job.pk, status=MediaJob.Status.RUNNING).update(
        status=MediaJob.Status.READY, file=name, size=size, bytes_done=F("bytes_total"),
        finished_at=now, updated_at=now)
    if finished:
        log.info("media job %s ready: bytes=%s", job.pk, size)
    else:  # purged or taken over while it ran: the file is nobody's
        _delete_quietly(storage, name)
    return None


def _write_iso_to_storage(job: MediaJob, files: list[MediaEntry], storage, name: str) -> int:
    last_write = [0.0]

    def progress(bytes_done: int, files_done: int) -> None:
        now = time.monotonic()
        if now - last_write[0] >= PROGRESS_INTERVAL:
            last_write[0] = now
            MediaJob.objects.filter(pk=job.pk, status=MediaJob.Status.RUNNING).update(
                bytes_done=bytes_done, files_done=files_done, updated_at=timezone.now())

    volume_id = "DICOM_IMAGES"
    try:
        final_path = Path(storage.path(name))
    except NotImplementedError:
        final_path = None
    if final_path is not None:
        final_path.parent.mkdir(parents=True, exist_ok=True)
        partial = final_path.with_name(final_path.name + PARTIAL_SUFFIX)
        try:
            size = iso_write(files=files, out_path=partial, volume_id=volume_id,
                             progress=progress)
            os.replace(partial, final_path)
        finally:
            partial.unlink(missing_ok=True)
        return size
    # A storage without local paths (object storage): build in the spool, then upload.
    spool = Path(settings.SPOOL_DIR)
    spool.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=spool, prefix="media-", suffix=".iso") as tmp:
        size = iso_write(files=files, out_path=Path(tmp.name), volume_id=volume_id,
                         progress=progress)
        with open(tmp.name, "rb") as fh:
            saved = storage.save(name, File(fh))
        if saved != name:
            storage.delete(saved)
            raise OSError("the storage renamed the disc image")
    return size


def _fail(job: MediaJob, message: str) -> None:
    now = timezone.now()
    MediaJob.objects.filter(pk=job.pk, status=MediaJob.Status.RUNNING).update(
        status=MediaJob.Status.FAILED, error=message[:500], file="", finished_at=now,
        updated_at=now)


def _delete_quietly(storage, name: str) -> None:
    try:
        if name and storage.exists(name):
            storage.delete(name)
    except OSError:
        log.warning("media: a disc image file could not be removed")


def _expire(job: MediaJob) -> bool:
    """Remove the job's file and mark it EXPIRED, unless it is being built; True when
    it was expired."""
    expired = MediaJob.objects.filter(
        pk=job.pk, status__in=[MediaJob.Status.QUEUED, MediaJob.Status.READY,
                               MediaJob.Status.FAILED]).update(
        status=MediaJob.Status.EXPIRED, file="", updated_at=timezone.now())
    if expired and job.file:
        _delete_quietly(default_storage, job.file.name)
        _delete_quietly(default_storage, job.file.name + PARTIAL_SUFFIX)
    return bool(expired)


def media_jobs_purge(*, now: datetime.datetime) -> int:
    """Expire every media job whose ``expires_at`` has passed: its file is deleted from
    storage and the row kept, EXPIRED, for the record. A job still being built is left
    until it ends (its row moves on), then purged on a later run. Returns how many
    were expired."""
    count = 0
    for job in MediaJob.objects.filter(expires_at__lte=now).exclude(
            status__in=[MediaJob.Status.EXPIRED, MediaJob.Status.RUNNING]):
        count += _expire(job)
    if count:
        log.info("media jobs purged: %s", count)
    return count


def media_jobs_recover_stale(*, now: datetime.datetime) -> list[int]:
    """Jobs whose worker died (RUNNING, the row still for ``_stale_after``) or whose
    task message was lost (QUEUED that long): put back in the queue and returned, for
    the caller to send their tasks. The run's claim decides, so sending twice is
    harmless."""
    cutoff = now - _stale_after()
    stale = MediaJob.objects.filter(
        Q(status=MediaJob.Status.RUNNING) | Q(status=MediaJob.Status.QUEUED),
        updated_at__lt=cutoff, expires_at__gt=now)
    recovered = []
    for job in stale:
        if job.attempts >= ISO_MAX_ATTEMPTS and job.status == MediaJob.Status.RUNNING:
            _fail(job, _("The disc image could not be made. Please try again later."))
            continue
        if MediaJob.objects.filter(pk=job.pk, status=job.status,
                                   updated_at=job.updated_at).update(
                status=MediaJob.Status.QUEUED, updated_at=now):
            recovered.append(job.pk)
    return recovered
