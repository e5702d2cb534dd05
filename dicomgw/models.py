"""The local archive index: Patient / Study / Series / Instance per facility.

The original bytes of every instance are kept through Django's storage API (the
``archive`` storage), under a name we generate; nothing in a file or from a client
decides where it is stored."""

import uuid

from django.core.files.storage import storages
from django.core.signals import setting_changed
from django.core.validators import RegexValidator
from django.db import models
from django.dispatch import receiver
from django.utils import timezone
from django.utils.functional import LazyObject, empty
from django.utils.translation import gettext_lazy as _

from pockethealth.models import Facility


class _ArchiveStorage(LazyObject):
    """The ``archive`` storage of STORAGES, looked up when first used (and again after
    the setting changes), not when the model classes are built."""

    def _setup(self):
        self._wrapped = storages["archive"]


_archive = _ArchiveStorage()


@receiver(setting_changed)
def _forget_archive_storage(*, setting, **kwargs):
    if setting == "STORAGES":
        _archive._wrapped = empty


def archive_storage():
    return _archive


def archive_file_name(instance, filename):
    """A storage name that owes nothing to the file or the client: facility id and a
    random UUID, fanned out over 256 folders."""
    token = uuid.uuid4().hex
    return f"{instance.facility_id}/{token[:2]}/{token}.dcm"


class IngestSource(models.TextChoices):
    SCP = "scp", _("DICOM receive (C-STORE)")
    RETRIEVE = "retrieve", _("PACS retrieve")
    UPLOAD = "upload", _("Browser upload")
    DEMO = "demo", _("Demo data")
    IMPORT = "import", _("File import")


class Patient(models.Model):
    facility = models.ForeignKey(Facility, on_delete=models.PROTECT, related_name="patients")
    patient_id = models.CharField(_("patient ID (MRN)"), max_length=64, blank=True)
    issuer_of_patient_id = models.CharField(_("issuer of patient ID"), max_length=64, blank=True)
    # PatientName as decoded through SpecificCharacterSet, DICOM PN form:
    # "Family^Given^Middle^Prefix^Suffix" with "=" between the alphabetic, ideographic
    # and phonetic groups (PS3.5 6.2.1).
    name = models.CharField(_("patient name"), max_length=320, blank=True)
    # Lower-case, punctuation-free copy of every name group, for searching.
    name_search = models.CharField(max_length=320, blank=True, db_index=True)
    birth_date = models.DateField(_("date of birth"), null=True, blank=True)
    sex = models.CharField(_("sex"), max_length=16, blank=True)
    # Digest of (patient ID, issuer, name, birth date): one row per distinct identity, so
    # two people who happen to share an outside MRN are never merged.
    identity_key = models.CharField(max_length=64, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        verbose_name = _("patient")
        verbose_name_plural = _("patients")
        ordering = ["name_search", "birth_date"]
        constraints = [
            models.UniqueConstraint(fields=["facility", "identity_key"], name="patient_identity"),
        ]
        indexes = [models.Index(fields=["facility", "patient_id"])]

    def __str__(self):
        return f"Patient {self.pk}"

    @property
    def name_groups(self) -> list[str]:
        return self.name.split("=")

    @property
    def display_name(self) -> str:
        """"FAMILY, Given Middle" from the first non-empty name group, followed by the
        other groups in brackets (e.g. the kanji form of a Japanese name)."""
        shown = [format_person_name(group) for group in self.name_groups if group.strip("^ ")]
        if not shown:
            return ""
        head, *rest = shown
        return f"{head} ({' / '.join(rest)})" if rest else head


def format_person_name(group: str) -> str:
    parts = [p.strip() for p in group.split("^")]
    family = parts[0] if parts else ""
    given = " ".join(p for p in parts[1:3] if p)
    prefix = parts[3] if len(parts) > 3 else ""
    suffix = parts[4] if len(parts) > 4 else ""
    text = family.upper()
    if given:
        text = f"{text}, {given}" if text else given
    if prefix:
        text = f"{prefix} {text}"
    if suffix:
        text = f"{text} {suffix}"
    return text


class Study(models.Model):
    facility = models.ForeignKey(Facility, on_delete=models.PROTECT, related_name="studies")
    patient = models.ForeignKey(Patient, on_delete=models.PROTECT, related_name="studies")
    study_instance_uid = models.CharField(_("study instance UID"), max_length=64)
    study_date = models.DateField(_("study date"), null=True, blank=True)
    study_time = models.TimeField(_("study time"), null=True, blank=True)
    description = models.CharField(_("description"), max_length=200, blank=True)
    modalities = models.CharField(_("modalities"), max_length=200, blank=True)
    accession_number = models.CharField(_("accession number"), max_length=64, blank=True)
    referring_physician = models.CharField(_("referring physician"), max_length=320, blank=True)
    study_id = models.CharField(_("study ID"), max_length=16, blank=True)
    num_series = models.PositiveIntegerField(_("series"), default=0)
    num_instances = models.PositiveIntegerField(_("images"), default=0)
    total_bytes = models.PositiveBigIntegerField(_("size (bytes)"), default=0)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name = _("study")
        verbose_name_plural = _("studies")
        ordering = ["-study_date", "-study_time", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["facility", "study_instance_uid"], name="study_uid_per_facility"
            ),
        ]

    def __str__(self):
        return f"Study {self.pk}"

    @property
    def modality_list(self) -> list[str]:
        return [m for m in self.modalities.split("\\") if m]


class Series(models.Model):
    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="series")
    series_instance_uid = models.CharField(_("series instance UID"), max_length=64)
    modality = models.CharField(_("modality"), max_length=16, blank=True)
    series_number = models.IntegerField(_("series number"), null=True, blank=True)
    description = models.CharField(_("description"), max_length=200, blank=True)
    body_part = models.CharField(_("body part"), max_length=64, blank=True)
    num_instances = models.PositiveIntegerField(_("images"), default=0)
    total_bytes = models.PositiveBigIntegerField(_("size (bytes)"), default=0)

    class Meta:
        verbose_name = _("series")
        verbose_name_plural = _("series")
        ordering = ["series_number", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["study", "series_instance_uid"], name="series_uid_per_study"
            ),
        ]

    def __str__(self):
        return f"Series {self.pk}"


class Instance(models.Model):
    facility = models.ForeignKey(Facility, on_delete=models.PROTECT, related_name="+")
    series = models.ForeignKey(Series, on_delete=models.CASCADE, related_name="instances")
    sop_instance_uid = models.CharField(_("SOP instance UID"), max_length=64)
    sop_class_uid = models.CharField(_("SOP class UID"), max_length=64)
    transfer_syntax_uid = models.CharField(_("transfer syntax UID"), max_length=64)
    instance_number = models.IntegerField(_("instance number"), null=True, blank=True)
    number_of_frames = models.PositiveIntegerField(_("frames"), default=1)
    rows = models.PositiveIntegerField(null=True, blank=True)
    columns = models.PositiveIntegerField(null=True, blank=True)
    file = models.FileField(
        storage=archive_storage, upload_to=archive_file_name, max_length=200, editable=False,
    )
    size = models.PositiveBigIntegerField(_("size (bytes)"))
    sha256 = models.CharField(_("SHA-256"), max_length=64)
    source = models.CharField(_("source"), max_length=16, choices=IngestSource.choices)
    received_at = models.DateTimeField(_("received"), default=timezone.now)

    class Meta:
        verbose_name = _("instance")
        verbose_name_plural = _("instances")
        ordering = ["instance_number", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["facility", "sop_instance_uid"], name="instance_uid_per_facility"
            ),
        ]

    def __str__(self):
        return f"Instance {self.pk}"


class InstanceConflict(models.Model):
    """A file that arrived with the SOP Instance UID of an archived instance but with
    different bytes. Kept aside for review; the archived copy is never overwritten."""

    facility = models.ForeignKey(Facility, on_delete=models.PROTECT, related_name="+")
    existing = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="conflicts")
    sop_instance_uid = models.CharField(_("SOP instance UID"), max_length=64)
    file = models.FileField(
        storage=archive_storage, upload_to=archive_file_name, max_length=200, editable=False,
    )
    size = models.PositiveBigIntegerField(_("size (bytes)"))
    sha256 = models.CharField(_("SHA-256"), max_length=64)
    source = models.CharField(_("source"), max_length=16, choices=IngestSource.choices)
    received_at = models.DateTimeField(_("received"), default=timezone.now)
    resolved = models.BooleanField(_("resolved"), default=False)

    class Meta:
        verbose_name = _("instance conflict")
        verbose_name_plural = _("instance conflicts")
        ordering = ["-received_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["existing", "sha256"], name="conflict_once_per_content"
            ),
        ]

    def __str__(self):
        return f"Conflict {self.pk}"


# --- The PACS link -----------------------------------------------------------------

ae_title_validator = RegexValidator(
    r"^[\x20-\x5b\x5d-\x7e]{1,16}$",
    _("1–16 printable characters, no backslash (PS3.5 6.2, AE)."),
)


class PacsNode(models.Model):
    """A DICOM peer of a facility (its PACS, a modality, a workstation): where we query,
    retrieve and push, and who may send to our storage SCP."""

    class QueryModel(models.TextChoices):
        STUDY_ROOT = "study", _("Study Root")
        PATIENT_ROOT = "patient", _("Patient Root")

    facility = models.ForeignKey(Facility, on_delete=models.PROTECT, related_name="pacs_nodes")
    name = models.CharField(_("name"), max_length=100)
    ae_title = models.CharField(_("AE title"), max_length=16, validators=[ae_title_validator])
    host = models.CharField(_("host"), max_length=255)
    port = models.PositiveIntegerField(_("port"), default=104)
    calling_ae_title = models.CharField(
        _("our calling AE title"), max_length=16, blank=True, validators=[ae_title_validator],
        help_text=_("The AE title we present to this node; empty means the site default."),
    )
    move_destination = models.CharField(
        _("C-MOVE destination"), max_length=16, blank=True, validators=[ae_title_validator],
        help_text=_("The AE title under which this PACS knows our storage SCP; empty means "
                    "our calling AE title."),
    )
    query_model = models.CharField(
        _("query model"), max_length=8, choices=QueryModel.choices, default=QueryModel.STUDY_ROOT
    )
    supports_c_get = models.BooleanField(_("supports C-GET"), default=False)
    acse_timeout = models.PositiveIntegerField(_("association timeout (s)"), default=30)
    dimse_timeout = models.PositiveIntegerField(_("DIMSE timeout (s)"), default=60)
    network_timeout = models.PositiveIntegerField(_("network timeout (s)"), default=60)
    max_pdu = models.PositiveIntegerField(
        _("maximum PDU size (bytes)"), default=131072,
        help_text=_("0 means no limit."),
    )
    may_send = models.BooleanField(
        _("may send to us"), default=True,
        help_text=_("Accept C-STORE associations from this AE title at this host."),
    )
    tls_enabled = models.BooleanField(_("DICOM TLS"), default=False)
    tls_ca_file = models.CharField(_("CA certificate file"), max_length=500, blank=True)
    tls_cert_file = models.CharField(_("client certificate file"), max_length=500, blank=True)
    tls_key_file = models.CharField(_("client key file"), max_length=500, blank=True)
    is_active = models.BooleanField(_("active"), default=True)
    last_verified_at = models.DateTimeField(_("last verified"), null=True, blank=True)
    last_verify_result = models.CharField(_("last verification"), max_length=300, blank=True)

    class Meta:
        verbose_name = _("PACS node")
        verbose_name_plural = _("PACS nodes")
        ordering = ["facility", "name"]
        constraints = [
            models.UniqueConstraint(fields=["facility", "name"], name="pacs_node_name"),
        ]

    def __str__(self):
        return f"{self.name} ({self.ae_title}@{self.host}:{self.port})"


class TaskJob(models.Model):
    """Work a Celery task carries out: a run claims the row with a conditional UPDATE
    (QUEUED, or RUNNING but untouched for too long, becomes RUNNING) and ends it
    COMPLETE, PARTIAL or FAILED."""

    class Status(models.TextChoices):
        QUEUED = "queued", _("Queued")
        RUNNING = "running", _("In progress")
        COMPLETE = "complete", _("Complete")
        PARTIAL = "partial", _("Partial")
        FAILED = "failed", _("Failed")

    LIVE_STATUSES = ("queued", "running")

    status = models.CharField(_("status"), max_length=10, choices=Status.choices,
                              default=Status.QUEUED, db_index=True)
    error = models.CharField(_("error"), max_length=500, blank=True)
    attempts = models.PositiveIntegerField(_("attempts"), default=0)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        abstract = True

    @property
    def is_finished(self) -> bool:
        return self.status not in self.LIVE_STATUSES


class RetrieveJob(TaskJob):
    """Fetching one study from a PACS node into the archive (C-MOVE or C-GET), run by a
    Celery task. COMPLETE only when every expected instance is archived."""

    facility = models.ForeignKey(Facility, on_delete=models.PROTECT, related_name="+")
    node = models.ForeignKey(PacsNode, on_delete=models.PROTECT, related_name="retrieves")
    requested_by = models.ForeignKey(
        "pockethealth.StaffUser", null=True, blank=True, on_delete=models.SET_NULL,
        related_name="+",
    )
    study_instance_uid = models.CharField(_("study instance UID"), max_length=64)
    study = models.ForeignKey(Study, null=True, blank=True, on_delete=models.SET_NULL,
                              related_name="retrieves")
    # What the PACS said of the study when the clerk picked it, so the job can be
    # recognised before any image has arrived (the archive's row takes over once linked).
    patient_name = models.CharField(_("patient name"), max_length=320, blank=True)
    patient_id = models.CharField(_("patient ID (MRN)"), max_length=64, blank=True)
    study_date = models.DateField(_("study date"), null=True, blank=True)
    description = models.CharField(_("description"), max_length=200, blank=True)
    modalities = models.CharField(_("modalities"), max_length=200, blank=True)
    expected = models.PositiveIntegerField(_("expected images"), null=True, blank=True)
    completed = models.PositiveIntegerField(_("completed"), default=0)
    remaining = models.PositiveIntegerField(_("remaining"), null=True, blank=True)
    failed = models.PositiveIntegerField(_("failed"), default=0)
    warning = models.PositiveIntegerField(_("warning"), default=0)
    archived = models.PositiveIntegerField(_("in the archive"), default=0)
    missing = models.JSONField(_("missing SOP instance UIDs"), default=list, blank=True)

    class Meta:
        verbose_name = _("retrieve")
        verbose_name_plural = _("retrieves")
        ordering = ["-created_at"]
        constraints = [
            # One live retrieve per study of a facility: asking twice joins the first.
            models.UniqueConstraint(
                fields=["facility", "study_instance_uid"],
                condition=models.Q(status__in=["queued", "running"]),
                name="one_live_retrieve_per_study",
            ),
        ]

    def __str__(self):
        return f"Retrieve {self.pk}"

    @property
    def progress_percent(self) -> int:
        """While running: the share of the study archived before the run or handled by
        the PACS since; once finished: the share in the archive."""
        if not self.expected:
            return 100 if self.status == self.Status.COMPLETE else 0
        if self.is_finished:
            done = self.archived
        else:
            done = max(self.archived, self.expected - (self.remaining or 0)
                       if self.remaining is not None else 0)
        return max(0, min(100, round(100 * done / self.expected)))


class StoreJob(TaskJob):
    """Sending a study to a PACS node by C-STORE, one instance after another, with a
    result per instance (a ``StoreResult``)."""

    total = models.PositiveIntegerField(_("images"), default=0)
    sent = models.PositiveIntegerField(_("sent"), default=0)
    failed = models.PositiveIntegerField(_("failed"), default=0)
    warning = models.PositiveIntegerField(_("warning"), default=0)

    class Meta:
        abstract = True

    @property
    def progress_percent(self) -> int:
        if not self.total:
            return 100 if self.status == self.Status.COMPLETE else 0
        done = self.sent if self.is_finished else self.sent + self.failed
        return max(0, min(100, round(100 * done / self.total)))


class StoreResult(models.Model):
    """The C-STORE status of one instance of a ``StoreJob`` (PS3.4 Annex B.2.3)."""

    instance = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="+")
    status = models.PositiveIntegerField(_("DIMSE status"), null=True, blank=True)
    outcome = models.CharField(_("outcome"), max_length=10)  # success, warning, failure
    detail = models.CharField(_("detail"), max_length=300, blank=True)
    sent_at = models.DateTimeField(default=timezone.now)

    class Meta:
        abstract = True


class PushJob(StoreJob):
    """Sending an archived study to a PACS node by C-STORE, with a result per instance."""

    facility = models.ForeignKey(Facility, on_delete=models.PROTECT, related_name="+")
    node = models.ForeignKey(PacsNode, on_delete=models.PROTECT, related_name="pushes")
    study = models.ForeignKey(Study, on_delete=models.PROTECT, related_name="pushes")
    requested_by = models.ForeignKey(
        "pockethealth.StaffUser", null=True, blank=True, on_delete=models.SET_NULL,
        related_name="+",
    )

    class Meta:
        verbose_name = _("push")
        verbose_name_plural = _("pushes")
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["node", "study"],
                condition=models.Q(status__in=["queued", "running"]),
                name="one_live_push_per_study_and_node",
            ),
        ]

    def __str__(self):
        return f"Push {self.pk}"


class PushResult(StoreResult):
    """The C-STORE status of one instance of a push (PS3.4 Annex B.2.3)."""

    push = models.ForeignKey(PushJob, on_delete=models.CASCADE, related_name="results")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["push", "instance"], name="push_result_once"),
        ]

    def __str__(self):
        return f"Push {self.push_id} instance {self.instance_id}: {self.outcome}"


# --- Recipient media (dicomgw.media) -------------------------------------------------


class MediaJob(models.Model):
    """A disc image (ISO 9660) of some archived studies: a row the view creates, a Celery
    task fills (status, progress) and a download view serves until ``expires_at``, after
    which the periodic purge removes the file. A ZIP needs no row: it is streamed as it
    is built."""

    class Kind(models.TextChoices):
        ISO = "iso", _("Disk image")

    class Status(models.TextChoices):
        QUEUED = "queued", _("Waiting")
        RUNNING = "running", _("Being prepared")
        READY = "ready", _("Ready")
        FAILED = "failed", _("Failed")
        EXPIRED = "expired", _("Expired")

    LIVE_STATUSES = ("queued", "running", "ready")

    facility = models.ForeignKey(Facility, on_delete=models.PROTECT, related_name="+")
    kind = models.CharField(_("kind"), max_length=8, choices=Kind.choices, default=Kind.ISO)
    # Whose job this is, in the caller's terms ("share:42"): the caller checks access
    # against it; the media code never interprets it.
    owner_ref = models.CharField(_("owner"), max_length=100, db_index=True)
    # Digest of what goes on the image (studies and their image counts, viewer, name),
    # so asking twice for the same content finds the same job.
    spec_key = models.CharField(max_length=64, editable=False)
    study_ids = models.JSONField(_("studies"), default=list)
    patient_last_name = models.CharField(_("patient last name"), max_length=100, blank=True)
    include_viewer = models.BooleanField(_("viewer included"), default=False)
    viewer_dir = models.CharField(_("viewer folder"), max_length=500, blank=True)
    # The language of whoever asked: README.TXT and INDEX.HTM are written in it.
    language = models.CharField(_("language"), max_length=10, blank=True)
    status = models.CharField(_("status"), max_length=10, choices=Status.choices,
                              default=Status.QUEUED, db_index=True)
    file = models.FileField(_("file"), max_length=300, blank=True, editable=False)
    size = models.PositiveBigIntegerField(_("size (bytes)"), default=0)
    bytes_total = models.PositiveBigIntegerField(_("bytes to write"), default=0)
    bytes_done = models.PositiveBigIntegerField(_("bytes written"), default=0)
    files_total = models.PositiveIntegerField(_("files to write"), default=0)
    files_done = models.PositiveIntegerField(_("files written"), default=0)
    error = models.CharField(_("error"), max_length=500, blank=True)
    attempts = models.PositiveIntegerField(_("attempts"), default=0)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(_("expires"), db_index=True)

    class Meta:
        verbose_name = _("media job")
        verbose_name_plural = _("media jobs")
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["owner_ref", "spec_key"],
                condition=models.Q(status__in=["queued", "running", "ready"]),
                name="one_live_media_job_per_owner_and_content",
            ),
        ]

    def __str__(self):
        return f"Media job {self.pk}"

    @property
    def is_finished(self) -> bool:
        return self.status in {self.Status.READY, self.Status.FAILED, self.Status.EXPIRED}

    @property
    def progress_percent(self) -> int:
        if self.status == self.Status.READY:
            return 100
        if not self.bytes_total:
            return 0
        return max(0, min(99, self.bytes_done * 100 // self.bytes_total))

    @property
    def download_name(self) -> str:
        """``ISO_<Lastname>.iso``, the name the browser saves the image under."""
        from .media import media_name

        return f"{media_name('ISO', self.patient_last_name)}.iso"
