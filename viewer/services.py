"""DICOMweb for the browser viewer (PS3.18): search (QIDO-RS), metadata, instances,
frames and bulk data (WADO-RS), read-only and scoped to what the visitor may see.

A ``Scope`` is the set of archived studies one visitor may read: the studies of the
share bound to a recipient's session, or the whole archive of a clerk's facility.
Every look-up starts from it, so a study outside it and a study that does not exist
give the same answer.

Searches are answered from the archive index (``dicomgw.models``) alone. Metadata is
read from the stored files' headers (never their pixels) and kept in the cache per
instance, under the SOP Instance UID and the file's SHA-256. Instances leave as they
were stored, and frames as their stored bytes: compressed frames are passed through,
never decoded or compressed again."""

import base64
import datetime
import functools
import hashlib
import json
import math
import re
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
from django.core.cache import cache
from django.db.models import Q, QuerySet
from django.utils.translation import gettext as _
from pydicom import dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments, get_frame
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from dicomgw.models import Instance, Series, Study, archive_storage
from dicomgw.services import quiet_pydicom_reading
from pockethealth.models import Facility
from pockethealth.services import audit_record
from sharing.models import Share
from sharing.recipient import share_activity_record

from .scopes import CLERK, RECIPIENT, ViewerError

# Files are read with pydicom: quietly (see ``quiet_pydicom_reading``).
quiet_pydicom_reading()


# PS3.5 9.1: digits and dots, at most 64 characters.
UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# QIDO-RS answers at most this many matches per request; the rest are paged with
# ``offset`` (PS3.18 8.3.4.4: a Warning header says so).
QIDO_MAX_RESULTS = 5000
# Binary values larger than this are left out of metadata as a BulkDataURI (PS3.18 F.2.6).
BULK_DATA_THRESHOLD = 1024
# Metadata of an instance stays in the cache this long after it was read.
METADATA_CACHE_SECONDS = 24 * 3600
METADATA_FORMAT = 1
# A study opened again within this time by the same visitor is not audited again.
OPEN_AUDIT_SECONDS = 30 * 60
# An instance found in a scope is found again from the cache for this long (a viewer
# reads a series' metadata, then asks for each of its frames).
INSTANCE_CACHE_SECONDS = 5 * 60

PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel, Float, Double Float
BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
UNDEFINED_LENGTH = 0xFFFFFFFF
# The media type of each compressed transfer syntax (PS3.18 8.7.3.3.2, Table 8.7.3-5).
IMAGE_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.110": "image/jxl",
    "1.2.840.10008.1.2.4.111": "image/jxl",
    "1.2.840.10008.1.2.4.112": "image/jxl",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}
VIDEO_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.100": "video/mpeg2",
    "1.2.840.10008.1.2.4.101": "video/mpeg2",
    "1.2.840.10008.1.2.4.102": "video/mp4",
    "1.2.840.10008.1.2.4.103": "video/mp4",
    "1.2.840.10008.1.2.4.104": "video/mp4",
    "1.2.840.10008.1.2.4.105": "video/mp4",
    "1.2.840.10008.1.2.4.106": "video/mp4",
    "1.2.840.10008.1.2.4.107": "video/H265",
    "1.2.840.10008.1.2.4.108": "video/H265",
}
OCTET_STREAM = "application/octet-stream"


def not_found() -> ViewerError:
    """The one answer for a study, series, instance or frame that does not exist and
    for one that exists outside the visitor's scope."""
    return ViewerError(_("Not found."), status=404)


# --- Scope ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Scope:
    """What one visitor may read, and the absolute URL of the DICOMweb root they use."""

    kind: str
    facility_id: int
    root: str
    share: Share | None = None
    # Who is looking, for auditing an opened study once (a session or a user).
    visitor: str = ""

    def studies(self) -> QuerySet:
        studies = Study.objects.filter(facility_id=self.facility_id)
        if self.share is not None:
            # The share's exams that are in the archive: linked to the share or not yet
            # (a retrieve still arriving), found by Study Instance UID in the share's
            # facility, which is unique there.
            studies = studies.filter(study_instance_uid__in=self.share.share_studies
                                     .values("study_instance_uid"))
        return studies

    def url(self, *segments: str) -> str:
        return "/".join([self.root, *segments])

    @property
    def key(self) -> tuple | None:
        """The scope as one visitor has it (a session's own, random key included), for
        keeping what was found in it; None for a visitor without a session."""
        if not self.visitor:
            return None
        return (self.kind, self.facility_id, self.share.pk if self.share else None,
                self.visitor)


def scope_for_share(*, share: Share, root: str, visitor: str = "") -> Scope:
    return Scope(kind=RECIPIENT, facility_id=share.facility_id, root=root, share=share,
                 visitor=visitor)


def scope_for_facility(*, facility: Facility | int, root: str, visitor: str = "") -> Scope:
    facility_id = facility.pk if isinstance(facility, Facility) else facility
    return Scope(kind=CLERK, facility_id=facility_id, root=root, visitor=visitor)


def _uid(value: str) -> str:
    if not (0 < len(value) <= 64 and UID_PATTERN.match(value)):
        raise not_found()
    return value


def study_get(*, scope: Scope, study_uid: str) -> Study:
    study = (scope.studies().select_related("patient")
             .filter(study_instance_uid=_uid(study_uid)).first())
    if study is None:
        raise not_found()
    return study


def instances_get(*, scope: Scope, study_uid: str, series_uid: str | None = None,
                  sop_uid: str | None = None) -> list[Instance]:
    """The instances of a study, of one of its series, or one instance, in the order a
    viewer shows them; ``ViewerError`` (404) when there are none in the scope.

    A viewer reads a series' metadata, then asks for each instance's frames: the
    instances found are kept in the cache for ``INSTANCE_CACHE_SECONDS``, for the
    visitor's session, and one instance is found there. An archived instance never
    changes, and a share's exams only grow while it lasts; whether the visitor may still
    look (the session, the share revoked or expired) is checked before, every time. What
    is not found is not kept: a retrieve may be bringing it."""
    keep = scope.key is not None
    if keep and sop_uid is not None and series_uid is not None:
        kept = cache.get(_instance_key(scope, study_uid, series_uid, sop_uid))
        if kept is not None:
            return [kept]
    found = _instances_query(scope=scope, study_uid=study_uid, series_uid=series_uid,
                             sop_uid=sop_uid)
    if keep:
        cache.set_many({_instance_key(scope, study_uid, i.series.series_instance_uid,
                                      i.sop_instance_uid): i for i in found},
                       timeout=INSTANCE_CACHE_SECONDS)
    return found


def _instance_key(scope: Scope, study_uid: str, series_uid: str, sop_uid: str) -> str:
    """An instance's key in the cache, as it is asked for in ``scope``."""
    name = "|".join(map(str, (*scope.key, study_uid, series_uid, sop_uid)))
    return f"viewer:instance:{hashlib.sha256(name.encode()).hexdigest()}"


def _instances_query(*, scope: Scope, study_uid: str, series_uid: str | None = None,
                     sop_uid: str | None = None) -> list[Instance]:
    """``instances_get`` from the database, in one query on unique keys."""
    study_uid = _uid(study_uid)
    instances = Instance.objects.filter(facility_id=scope.facility_id).select_related(
        "series__study")
    if scope.share is not None:
        instances = instances.filter(series__study__study_instance_uid__in=scope.share
                                     .share_studies.values("study_instance_uid"))
    if sop_uid is not None:
        instances = instances.filter(sop_instance_uid=_uid(sop_uid))
    else:
        instances = instances.filter(series__study__facility_id=scope.facility_id,
                                     series__study__study_instance_uid=study_uid)
        if series_uid is not None:
            instances = instances.filter(series__series_instance_uid=_uid(series_uid))
        instances = instances.order_by("series__series_number", "series_id",
                                       "instance_number", "id")
    found = [i for i in instances
             if i.series.study.study_instance_uid == study_uid
             and series_uid in (None, i.series.series_instance_uid)]
    if not found:
        raise not_found()
    return found


def instance_url(scope: Scope, instance: Instance) -> str:
    series = instance.series
    return scope.url("studies", series.study.study_instance_uid, "series",
                     series.series_instance_uid, "instances", instance.sop_instance_uid)


# --- Search (QIDO-RS, PS3.18 10.6) ----------------------------------------------------


@dataclass(frozen=True)
class _Key:
    """A matching key: how its value is matched (PS3.4 C.2.2.2), against which field of
    the level's model."""

    match: str  # "uid", "text", "name", "date", "int", "modalities"
    field: str


STUDY_KEYS = {
    "StudyInstanceUID": _Key("uid", "study_instance_uid"),
    "StudyDate": _Key("date", "study_date"),
    "AccessionNumber": _Key("text", "accession_number"),
    "ModalitiesInStudy": _Key("modalities", "modalities"),
    "ReferringPhysicianName": _Key("name", "referring_physician"),
    "StudyDescription": _Key("text", "description"),
    "StudyID": _Key("text", "study_id"),
    "PatientName": _Key("name", "patient__name"),
    "PatientID": _Key("text", "patient__patient_id"),
    "PatientBirthDate": _Key("date", "patient__birth_date"),
    "PatientSex": _Key("text", "patient__sex"),
}
SERIES_KEYS = {
    "SeriesInstanceUID": _Key("uid", "series_instance_uid"),
    "Modality": _Key("text", "modality"),
    "SeriesNumber": _Key("int", "series_number"),
    "SeriesDescription": _Key("text", "description"),
    "BodyPartExamined": _Key("text", "body_part"),
}
INSTANCE_KEYS = {
    "SOPInstanceUID": _Key("uid", "sop_instance_uid"),
    "SOPClassUID": _Key("uid", "sop_class_uid"),
    "InstanceNumber": _Key("int", "instance_number"),
}
# Query parameters that are not matching keys (PS3.18 8.3.4).
CONTROL_PARAMETERS = {"limit", "offset", "fuzzymatching", "includefield"}


@dataclass
class SearchResult:
    """Matches in DICOM JSON, and warnings for the response's Warning header (PS3.18
    8.3.3.1: keys that were not used, results that were cut short)."""

    matches: list[dict]
    warnings: list[str] = field(default_factory=list)


def _keyword(parameter: str) -> str | None:
    """The keyword of a query parameter given as a keyword or as a tag ``0020000D``."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", parameter):
        return keyword_for_tag(int(parameter, 16)) or None
    return parameter if tag_for_keyword(parameter) is not None else None


def _wildcard_regex(value: str, *, any_run: str = ".*", any_one: str = ".") -> str:
    """PS3.4 C.2.2.2.4: "*" matches any run of characters, "?" any single one."""
    return "".join(any_run if c == "*" else any_one if c == "?" else re.escape(c)
                   for c in value)


def _date_range(value: str) -> tuple[datetime.date | None, datetime.date | None]:
    """A DA value or range (PS3.4 C.2.2.2.5): ``D``, ``D1-D2``, ``-D2``, ``D1-``."""
    def day(text: str) -> datetime.date | None:
        if not text:
            return None
        try:
            return datetime.datetime.strptime(text, "%Y%m%d").date()
        except ValueError:
            raise ViewerError(_("Dates are written YYYYMMDD, and ranges as "
                                "YYYYMMDD-YYYYMMDD."), status=400) from None
    first, dash, last = value.partition("-")
    if not dash:
        return day(first), day(first)
    if not first and not last:
        raise ViewerError(_("Dates are written YYYYMMDD, and ranges as YYYYMMDD-YYYYMMDD."),
                          status=400)
    return day(first), day(last)


def _match(queryset: QuerySet, key: _Key, value: str, *, prefix: str,
           fuzzy: bool) -> QuerySet:
    """Narrow ``queryset`` by one key. An empty value, or "*", matches everything
    (PS3.4 C.2.2.2.3)."""
    name = prefix + key.field
    if value in ("", "*"):
        return queryset
    if key.match == "uid":
        uids = [u for u in re.split(r"[,\\]", value) if u]
        if not all(len(u) <= 64 and UID_PATTERN.match(u) for u in uids):
            raise ViewerError(_("A UID has only digits and dots, at most 64 of them."),
                              status=400)
        return queryset.filter(**{f"{name}__in": uids})
    if key.match == "date":
        first, last = _date_range(value)
        if first:
            queryset = queryset.filter(**{f"{name}__gte": first})
        if last:
            queryset = queryset.filter(**{f"{name}__lte": last})
        return queryset
    if key.match == "int":
        try:
            return queryset.filter(**{name: int(value)})
        except ValueError:
            raise ViewerError(_("%(value)s is not a number.") % {"value": value[:20]},
                              status=400) from None
    if key.match == "modalities":
        # One of the listed modalities is among the study's (stored "CT\SR").
        wanted = Q()
        for modality in (m for m in re.split(r"[,\\]", value) if m):
            wanted |= (Q(**{name: modality}) | Q(**{f"{name}__startswith": modality + "\\"})
                       | Q(**{f"{name}__endswith": "\\" + modality})
                       | Q(**{f"{name}__contains": f"\\{modality}\\"}))
        return queryset.filter(wanted)
    if key.match == "name":
        # A person name matches in any of its groups (alphabetic, ideographic, phonetic,
        # PS3.5 6.2.1), whatever the case.
        pattern = _wildcard_regex(value, any_run="[^=]*", any_one="[^=]")
        return queryset.filter(**{f"{name}__iregex": f"(^|=){pattern}(=|$)"})
    if "*" in value or "?" in value:
        lookup = "iregex" if fuzzy else "regex"
        return queryset.filter(**{f"{name}__{lookup}": f"^{_wildcard_regex(value)}$"})
    return queryset.filter(**{f"{name}__iexact" if fuzzy else name: value})


def _paging(query) -> tuple[int, int | None]:
    values = []
    for name in ("offset", "limit"):
        text = query.get(name, "")
        if text == "":
            values.append(None)
            continue
        if not text.isdigit():
            raise ViewerError(_("%(name)s is a whole number.") % {"name": name}, status=400)
        values.append(int(text))
    return values[0] or 0, values[1]


def _search(queryset: QuerySet, query, keys: dict[str, tuple[_Key, str]],
            to_json) -> SearchResult:
    warnings = []
    fuzzy = query.get("fuzzymatching", "").lower() == "true"
    for parameter, values in query.lists():
        if parameter in CONTROL_PARAMETERS:
            continue
        keyword = _keyword(parameter)
        if keyword is None:
            raise ViewerError(_("%(name)s is not a DICOM attribute.")
                              % {"name": parameter[:64]}, status=400)
        if keyword not in keys:
            warnings.append(f"{keyword} is not a matching key here and was ignored")
            continue
        key, prefix = keys[keyword]
        for value in values:
            queryset = _match(queryset, key, value, prefix=prefix, fuzzy=fuzzy)
    offset, limit = _paging(query)
    cap = QIDO_MAX_RESULTS if limit is None else min(limit, QIDO_MAX_RESULTS)
    rows = list(queryset[offset:offset + cap + 1])
    if len(rows) > cap and (limit is None or limit > cap):
        warnings.append("There are more results than one answer holds; ask for the rest "
                        "with offset")
    return SearchResult([to_json(row) for row in rows[:cap]], warnings)


def _keys(*levels: tuple[dict[str, _Key], str]) -> dict[str, tuple[_Key, str]]:
    return {keyword: (key, prefix) for keys, prefix in levels for keyword, key in keys.items()}


def studies_search(*, scope: Scope, query) -> SearchResult:
    """Search for studies (PS3.18 10.6.1, study level)."""
    studies = scope.studies().select_related("patient").order_by(
        "-study_date", "-study_time", "-id")
    return _search(studies, query, _keys((STUDY_KEYS, "")), lambda s: study_json(scope, s))


def series_search(*, scope: Scope, query, study_uid: str | None = None) -> SearchResult:
    """Search for series, of one study or of every study in the scope."""
    series = Series.objects.filter(study__in=scope.studies()).select_related("study")
    if study_uid is not None:
        series = series.filter(study__study_instance_uid=_uid(study_uid))
    series = series.order_by("study_id", "series_number", "id")
    keys = _keys((SERIES_KEYS, ""), (STUDY_KEYS, "study__"))
    return _search(series, query, keys, lambda s: series_json(scope, s))


def instances_search(*, scope: Scope, query, study_uid: str | None = None,
                     series_uid: str | None = None) -> SearchResult:
    """Search for instances, of one series, of one study or of the whole scope."""
    instances = Instance.objects.filter(series__study__in=scope.studies()).select_related(
        "series__study")
    if study_uid is not None:
        instances = instances.filter(series__study__study_instance_uid=_uid(study_uid))
    if series_uid is not None:
        instances = instances.filter(series__series_instance_uid=_uid(series_uid))
    instances = instances.order_by("series__study_id", "series__series_number", "series_id",
                                   "instance_number", "id")
    keys = _keys((INSTANCE_KEYS, ""), (SERIES_KEYS, "series__"),
                 (STUDY_KEYS, "series__study__"))
    return _search(instances, query, keys, lambda i: instance_json(scope, i))


# --- The attributes a search returns (PS3.18 10.6.3.3) -----------------------------------


def _element(vr: str, *values) -> dict:
    present = [v for v in values if v not in (None, "")]
    return {"vr": vr, "Value": present} if present else {"vr": vr}


def _person_name(name: str) -> dict:
    groups = dict(zip(("Alphabetic", "Ideographic", "Phonetic"), name.split("="),
                      strict=False))
    groups = {k: v for k, v in groups.items() if v}
    return {"vr": "PN", "Value": [groups]} if groups else {"vr": "PN"}


def _da(value: datetime.date | None) -> str | None:
    return value.strftime("%Y%m%d") if value else None


def _tm(value: datetime.time | None) -> str | None:
    if value is None:
        return None
    text = value.strftime("%H%M%S")
    return f"{text}.{value.microsecond:06d}" if value.microsecond else text


def study_json(scope: Scope, study: Study) -> dict:
    patient = study.patient
    return {
        "00080005": _element("CS", "ISO_IR 192"),
        "00080020": _element("DA", _da(study.study_date)),
        "00080030": _element("TM", _tm(study.study_time)),
        "00080050": _element("SH", study.accession_number),
        "00080056": _element("CS", "ONLINE"),
        "00080061": _element("CS", *study.modality_list),
        "00080090": _person_name(study.referring_physician),
        "00081030": _element("LO", study.description),
        "00081190": _element("UR", scope.url("studies", study.study_instance_uid)),
        "00100010": _person_name(patient.name),
        "00100020": _element("LO", patient.patient_id),
        "00100030": _element("DA", _da(patient.birth_date)),
        "00100040": _element("CS", patient.sex),
        "0020000D": _element("UI", study.study_instance_uid),
        "00200010": _element("SH", study.study_id),
        "00201206": _element("IS", study.num_series),
        "00201208": _element("IS", study.num_instances),
    }


def series_json(scope: Scope, series: Series) -> dict:
    study_uid = series.study.study_instance_uid
    return {
        "00080005": _element("CS", "ISO_IR 192"),
        "00080056": _element("CS", "ONLINE"),
        "00080060": _element("CS", series.modality),
        "0008103E": _element("LO", series.description),
        "00081190": _element("UR", scope.url("studies", study_uid, "series",
                                             series.series_instance_uid)),
        "00180015": _element("CS", series.body_part),
        "0020000D": _element("UI", study_uid),
        "0020000E": _element("UI", series.series_instance_uid),
        "00200011": _element("IS", series.series_number),
        "00201209": _element("IS", series.num_instances),
    }


def instance_json(scope: Scope, instance: Instance) -> dict:
    series = instance.series
    return {
        "00080016": _element("UI", instance.sop_class_uid),
        "00080018": _element("UI", instance.sop_instance_uid),
        "00080056": _element("CS", "ONLINE"),
        "00081190": _element("UR", instance_url(scope, instance)),
        "00083002": _element("UI", instance.transfer_syntax_uid),
        "0020000D": _element("UI", series.study.study_instance_uid),
        "0020000E": _element("UI", series.series_instance_uid),
        "00200013": _element("IS", instance.instance_number),
        "00280008": _element("IS", instance.number_of_frames),
        "00280010": _element("US", instance.rows),
        "00280011": _element("US", instance.columns),
    }


# --- Reading stored files --------------------------------------------------------------


@contextmanager
def _opened(instance: Instance | str) -> Iterator[BinaryIO]:
    """An archived file (of an instance, or by its storage name), opened for reading."""
    name = instance if isinstance(instance, str) else instance.file.name
    storage = archive_storage()
    try:
        path = storage.path(name)
    except NotImplementedError:
        fh = storage.open(name, "rb")
    else:
        fh = open(path, "rb")
    with fh:
        yield fh


def instance_chunks(instance: Instance, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """The stored file, byte for byte, in chunks; opened when first read."""
    with _opened(instance) as fh:
        while chunk := fh.read(chunk_size):
            yield chunk


@dataclass(frozen=True)
class _PixelElement:
    tag: int
    vr: str
    length: int
    value_offset: int  # in the file; meaningless for a deflated data set


def _pixel_element(fh: BinaryIO, syntax: UID) -> _PixelElement | None:
    """The Pixel Data element's header where ``dcmread(stop_before_pixels=True)`` left
    the file (PS3.5 7.1.2: explicit VR with a 4-byte length for OB/OW/OF/OD, or
    implicit VR with a 4-byte length). None when the data set has no pixel data."""
    endian = "<" if syntax.is_little_endian else ">"
    head = fh.read(8)
    if len(head) < 8:
        return None
    group, element = struct.unpack(endian + "HH", head[:4])
    tag = group << 16 | element
    if tag not in PIXEL_DATA_TAGS:
        return None
    if syntax.is_implicit_VR:
        vr = {0x7FE00008: "OF", 0x7FE00009: "OD"}.get(tag, "OW")
        (length,) = struct.unpack(endian + "L", head[4:])
    else:
        vr = head[4:6].decode("ascii", "replace")
        (length,) = struct.unpack(endian + "L", fh.read(4))
    return _PixelElement(tag, vr, length, fh.tell())


@dataclass(frozen=True)
class _PixelLayout:
    """Where an image's pixel data lies in its file and how it divides into frames."""

    element: _PixelElement
    frame_bits: int = 0
    bits_allocated: int = 0
    big_endian: bool = False
    extended_offsets: tuple[bytes, bytes] | None = None


def _frame_bits(ds: Dataset) -> int:
    """Bits of one native frame (PS3.5 8.1.1; YBR_FULL_422 keeps two samples a pixel,
    PS3.3 C.7.6.3.1.2)."""
    samples = int(ds.get("SamplesPerPixel") or 1)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
        samples = 2
    return int(ds.Rows) * int(ds.Columns) * samples * int(ds.BitsAllocated)


@functools.lru_cache(maxsize=8192)
def _pixel_layout(name: str, sha256: str, syntax: UID) -> _PixelLayout | None:
    """The layout of the pixel data of a stored file (not deflated), read from its
    header once per process: a file's content never changes under its SHA-256, which is
    part of the key, and the header need not be parsed again for each frame."""
    with _opened(name) as fh:
        ds = dcmread(fh, stop_before_pixels=True)
        element = _pixel_element(fh, syntax)
    if element is None:
        return None
    if element.length == UNDEFINED_LENGTH:
        offsets = None
        if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
            offsets = (bytes(ds.ExtendedOffsetTable), bytes(ds.ExtendedOffsetTableLengths))
        return _PixelLayout(element, extended_offsets=offsets)
    try:
        return _PixelLayout(element, frame_bits=_frame_bits(ds),
                            bits_allocated=int(ds.BitsAllocated),
                            big_endian=not syntax.is_little_endian)
    except (AttributeError, TypeError, ValueError):
        return None


def _swap_unit(vr: str, bits_allocated: int) -> int:
    """How many bytes a big endian value swaps as (PS3.5 7.3): OB and UN not at all, OW
    by 16-bit words (8-bit pixels in OW too), the other binary VRs by their width."""
    if vr == "OW":
        return 2 if bits_allocated <= 16 else bits_allocated // 8
    return {"OF": 4, "OL": 4, "OD": 8, "OV": 8}.get(vr, 1)


def _read_little_endian(fh: BinaryIO, offset: int, start: int, end: int, unit: int) -> bytes:
    """Bytes ``start:end`` of a value at ``offset`` as a little endian reader sees them,
    swapping ``unit``-byte words of a big endian value."""
    if unit == 1:
        fh.seek(offset + start)
        return fh.read(end - start)
    first, last = start // unit * unit, -(-end // unit) * unit
    fh.seek(offset + first)
    raw = fh.read(last - first)
    raw = raw[:len(raw) // unit * unit]
    swapped = np.frombuffer(raw, dtype=f">u{unit}").astype(f"<u{unit}").tobytes()
    return swapped[start - first:end - first]


def _native_frames(fh: BinaryIO, layout: _PixelLayout, numbers: list[int]) -> list[bytes]:
    element, bits = layout.element, layout.frame_bits
    unit = _swap_unit(element.vr, layout.bits_allocated) if layout.big_endian else 1
    frames = []
    for number in numbers:
        first_bit = (number - 1) * bits
        start, end = first_bit // 8, -(-(first_bit + bits) // 8)
        if end > element.length:
            raise not_found()
        data = _read_little_endian(fh, element.value_offset, start, end, unit)
        if bits % 8 or first_bit % 8:
            # 1-bit frames need not start on a byte (PS3.5 8.1.1): cut the frame's bits
            # out and pack them from bit 0.
            unpacked = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
            shift = first_bit - start * 8
            data = np.packbits(unpacked[shift:shift + bits], bitorder="little").tobytes()
        frames.append(data)
    return frames


@dataclass(frozen=True)
class PixelParts:
    """Frames (or a video stream) as stored, with the media type and transfer syntax
    that describe them (PS3.18 8.7.3.3.2). Native frames are little endian."""

    media_type: str
    transfer_syntax: str
    parts: list[bytes]


def frames_read(*, instance: Instance, numbers: list[int]) -> PixelParts:
    """Frames ``numbers`` (from 1) of an image, as stored: the bytes of each native
    frame, or each compressed frame's fragments (PS3.5 A.4) without decoding them.
    Only the frames asked for are read (and the header, once)."""
    syntax = UID(instance.transfer_syntax_uid)
    if syntax in VIDEO_MEDIA_TYPES:
        raise ViewerError(_("A video has no separate frames; fetch its bulk data."),
                          status=406)
    if any(not 1 <= n <= instance.number_of_frames for n in numbers):
        raise not_found()
    if syntax == DeflatedExplicitVRLittleEndian:
        with _opened(instance) as fh:
            frames = _deflated_frames(fh, numbers)
        return PixelParts(OCTET_STREAM, ExplicitVRLittleEndian, frames)
    layout = _pixel_layout(instance.file.name, instance.sha256, syntax)
    if layout is None:
        raise not_found()
    with _opened(instance) as fh:
        if layout.element.length != UNDEFINED_LENGTH:
            return PixelParts(OCTET_STREAM, ExplicitVRLittleEndian,
                              _native_frames(fh, layout, numbers))
        frames = []
        for number in numbers:
            fh.seek(layout.element.value_offset)
            frames.append(get_frame(fh, number - 1, number_of_frames=instance.number_of_frames,
                                    extended_offsets=layout.extended_offsets))
    return PixelParts(IMAGE_MEDIA_TYPES.get(syntax, OCTET_STREAM), str(syntax), frames)


def _deflated_frames(fh: BinaryIO, numbers: list[int]) -> list[bytes]:
    """A deflated data set (PS3.5 A.5) is inflated whole; its frames are native."""
    fh.seek(0)
    ds = dcmread(fh)
    for tag in PIXEL_DATA_TAGS:
        if tag in ds:
            value = ds[tag].value
            layout = _PixelLayout(_PixelElement(tag, ds[tag].VR, len(value), 0),
                                  frame_bits=_frame_bits(ds),
                                  bits_allocated=int(ds.BitsAllocated))
            return _native_frames(_BytesReader(value), layout, numbers)
    raise not_found()


class _BytesReader:
    """Enough of a file over bytes for ``_read_little_endian``."""

    def __init__(self, data: bytes):
        self.data, self.position = data, 0

    def seek(self, position: int) -> None:
        self.position = position

    def read(self, size: int) -> bytes:
        chunk = self.data[self.position:self.position + size]
        self.position += len(chunk)
        return chunk


# --- Bulk data --------------------------------------------------------------------------

BULK_PATH = re.compile(r"^[0-9A-Fa-f]{8}(/[0-9]{1,6}/[0-9A-Fa-f]{8})*$")


def bulkdata_read(*, instance: Instance, path: str) -> PixelParts:
    """The value a BulkDataURI of the metadata points at: ``7FE00010`` (the image's
    frames, or the whole stream of a video), or the tags and item numbers down to a
    binary element, e.g. ``54000100/0/54001010``. Big endian values are returned little
    endian (PS3.18 8.7.3.3.2)."""
    if not BULK_PATH.match(path):
        raise not_found()
    steps = path.split("/")
    tags = [int(step, 16) for step in steps[::2]]
    items = [int(step) for step in steps[1::2]]
    if len(tags) == 1 and tags[0] in PIXEL_DATA_TAGS:
        return _pixel_bulkdata(instance)
    with _opened(instance) as fh:
        ds = dcmread(fh, stop_before_pixels=True)
    syntax = UID(instance.transfer_syntax_uid)
    try:
        for tag, item in zip(tags, items, strict=False):
            ds = ds[tag].value[item]
        element = ds[tags[-1]]
    except (KeyError, IndexError, TypeError):
        raise not_found() from None
    value = element.value
    if element.VR not in BINARY_VRS or not isinstance(value, bytes | bytearray):
        raise not_found()
    if not syntax.is_little_endian:
        value = _little_endian(value, element.VR)
    return PixelParts(OCTET_STREAM, ExplicitVRLittleEndian, [bytes(value)])


def _little_endian(value: bytes, vr: str) -> bytes:
    """A binary value of a big endian data set, as little endian."""
    return _read_little_endian(_BytesReader(value), 0, 0, len(value), _swap_unit(vr, 16))


def _pixel_bulkdata(instance: Instance) -> PixelParts:
    syntax = UID(instance.transfer_syntax_uid)
    if syntax not in VIDEO_MEDIA_TYPES:
        return frames_read(instance=instance,
                           numbers=list(range(1, instance.number_of_frames + 1)))
    with _opened(instance) as fh:
        dcmread(fh, stop_before_pixels=True)
        element = _pixel_element(fh, syntax)
        if element is None:
            raise not_found()
        fh.seek(element.value_offset)
        stream = b"".join(generate_fragments(fh))
    return PixelParts(VIDEO_MEDIA_TYPES[syntax], str(syntax), [stream])


# --- Metadata (WADO-RS, PS3.18 10.4.1.1.2) ----------------------------------------------

# Where a BulkDataURI begins in the serialised metadata of one instance. A value can
# never contain it: quotes inside JSON strings are escaped.
BULK_URI_MARK = '"BulkDataURI":"'


def _finite(value):
    """NaN and infinity have no JSON form: an unreadable number is sent as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


# Values converted here straight from their bytes, the way pydicom converts them, for
# speed: most of a header is numbers, codes, dates and UIDs.
_NUMBER_FORMATS = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d",
                   "UV": "Q", "SV": "q"}
_ASCII_VRS = {"AE", "AS", "CS", "DA", "DT", "TM", "UI", "DS", "IS"}


def _plain_json(raw: RawDataElement, endian: str) -> dict | None:
    """The DICOM JSON of a number, code, date, time or UID element, or None when
    pydicom has to convert it (other VRs, undecodable or odd values)."""
    vr, value = raw.VR, raw.value
    if value is None or raw.tag.is_private:
        return None
    if vr is None:  # implicit VR: the dictionary's
        try:
            vr = dictionary_VR(raw.tag)
        except KeyError:
            return None
    if vr in _NUMBER_FORMATS:
        code = _NUMBER_FORMATS[vr]
        size = struct.calcsize("<" + code)
        if len(value) % size:
            return None
        numbers = struct.unpack(f"{endian}{len(value) // size}{code}", value)
        return {"vr": vr, "Value": list(numbers)} if numbers else {"vr": vr}
    if vr not in _ASCII_VRS:
        return None
    try:
        items = value.decode("ascii").rstrip(" \x00").split("\\")
    except UnicodeDecodeError:
        return None
    if items == [""]:
        return {"vr": vr}
    if vr in ("DS", "IS"):
        try:
            kind = float if vr == "DS" else int
            return {"vr": vr, "Value": [kind(v) if v.strip() else None for v in items]}
        except ValueError:
            return None
    return {"vr": vr, "Value": items}


def _element_json(ds: Dataset, tag, path: list[str], endian: str) -> dict:
    raw = ds.get_item(tag)
    if isinstance(raw, RawDataElement):
        plain = _plain_json(raw, endian)
        if plain is not None:
            return plain
    try:
        element = ds[tag]
        if element.VR == "SQ":
            items = [_dataset_json(item, [*path, str(i)], endian)
                     for i, item in enumerate(element.value)]
            return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
        if element.VR in BINARY_VRS and element.value is not None:
            if len(element.value) > BULK_DATA_THRESHOLD:
                return {"vr": element.VR, "BulkDataURI": "bulkdata/" + "/".join(path)}
            if endian == ">" and element.value:
                # Inline binary is little endian, as bulk data is (PS3.18 8.7.3.3.2).
                value = _little_endian(element.value, element.VR)
                return {"vr": element.VR, "InlineBinary": base64.b64encode(value).decode()}
        return element.to_json_dict(None, BULK_DATA_THRESHOLD)
    except (ValueError, TypeError, OverflowError, AttributeError):
        # A value its VR cannot express (a private DS holding text, say): sent as the
        # bytes it was stored as, rather than dropped.
        stored = raw.value if isinstance(raw, RawDataElement) and raw.value else b""
        return ({"vr": "UN", "InlineBinary": base64.b64encode(stored).decode("ascii")}
                if stored else {"vr": "UN"})


def _dataset_json(ds: Dataset, path: list[str], endian: str) -> dict:
    """A data set in the DICOM JSON model (PS3.18 F.2), binary values above the
    threshold as a BulkDataURI relative to the instance (``bulkdata/<tag path>``). Group
    lengths are left out; strings are decoded through Specific Character Set and sent as
    UTF-8, so the character set is given as ISO_IR 192."""
    out = {}
    for tag in ds.keys():
        if tag.element == 0:
            continue
        key = f"{tag:08X}"
        if key == "00080005":
            out[key] = {"vr": "CS", "Value": ["ISO_IR 192"]}
            continue
        out[key] = _element_json(ds, tag, [*path, key], endian)
    return out


def _metadata_of_file(instance: Instance) -> str:
    syntax = UID(instance.transfer_syntax_uid)
    with _opened(instance) as fh:
        ds = dcmread(fh, stop_before_pixels=True)
        body = _dataset_json(ds, [], "<" if syntax.is_little_endian else ">")
        if syntax == DeflatedExplicitVRLittleEndian:
            fh.seek(0)
            whole = dcmread(fh)
            pixel = next((_PixelElement(t, whole[t].VR, 0, 0) for t in PIXEL_DATA_TAGS
                          if t in whole), None)
        else:
            pixel = _pixel_element(fh, syntax)
    if pixel is not None:
        vr = "OB" if pixel.length == UNDEFINED_LENGTH else pixel.vr
        body[f"{pixel.tag:08X}"] = {"vr": vr, "BulkDataURI": f"bulkdata/{pixel.tag:08X}"}
    # The syntax the instance is stored in, and so retrieved in (PS3.18 10.6.3.3).
    body["00083002"] = {"vr": "UI", "Value": [str(syntax)]}
    body = dict(sorted(body.items()))
    try:
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(body), separators=(",", ":"), ensure_ascii=False)


def _metadata_key(instance: Instance) -> str:
    return f"viewer:metadata:{METADATA_FORMAT}:{instance.sop_instance_uid}:{instance.sha256}"


def metadata_text(*, scope: Scope, instances: Iterable[Instance]) -> str:
    """The metadata of ``instances`` as a DICOM JSON array (PS3.18 F.2), each with the
    absolute BulkDataURIs of the scope. Headers are read once per stored file and kept in
    the cache."""
    instances = list(instances)
    keys = {instance.pk: _metadata_key(instance) for instance in instances}
    cached = cache.get_many(list(keys.values()))
    fresh = {}
    texts = []
    for instance in instances:
        text = cached.get(keys[instance.pk])
        if text is None:
            text = fresh[keys[instance.pk]] = _metadata_of_file(instance)
        base = json.dumps(instance_url(scope, instance) + "/")[1:-1]
        texts.append(text.replace(BULK_URI_MARK, BULK_URI_MARK + base))
    if fresh:
        cache.set_many(fresh, timeout=METADATA_CACHE_SECONDS)
    return "[" + ",".join(texts) + "]"


# --- Audit -------------------------------------------------------------------------------


def study_open_record(*, scope: Scope, study: Study, address: str | None,
                      request=None) -> bool:
    """Audit that the visitor opened ``study`` in the viewer: once per visitor and study
    within OPEN_AUDIT_SECONDS, however many of its series and frames are then fetched.
    Returns whether an event was written."""
    key = f"viewer:opened:{scope.kind}:{scope.visitor}:{study.pk}"
    if not cache.add(key, 1, timeout=OPEN_AUDIT_SECONDS):
        return False
    detail = {"study": study.pk, "series": study.num_series, "images": study.num_instances}
    if scope.share is not None:
        share_activity_record(share=scope.share, action="viewer.study.open", address=address,
                              detail=detail)
    else:
        audit_record(action="viewer.study.open", request=request, obj=study,
                     patient_ref=study.patient_id, detail=detail)
    return True

