"""Record Retrieval: a facility's request to an outside facility for a patient's prior
imaging, the patient's signed authorization, the uploads that answer it through the
PIN portal, and the studies it brought into the archive.

The PIN and the direct-link token are never stored: only their keyed hashes (see
``pockethealth.codes``). The Request Page, which prints them, is rendered once while
they are known and kept as a file, like the Access Page of a share."""

import uuid

from django.conf import settings
from django.core.files.storage import default_storage
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from dicomgw.models import Instance, Patient, StoreJob, StoreResult, Study, TaskJob
from pockethealth.models import Facility


def _default_storage():
    return default_storage


def request_page_name(instance, filename):
    """A storage name that says nothing of the patient or the request."""
    token = uuid.uuid4().hex
    return f"request-pages/{instance.facility_id}/{token[:2]}/{token}.pdf"


def signature_name(instance, filename):
    token = uuid.uuid4().hex
    return f"consent-signatures/{instance.request.facility_id}/{token[:2]}/{token}.png"


class RecordRequest(models.Model):
    """One request for one patient's imaging, sent to one outside facility. It never
    expires: it ends when its studies are imported or when it is cancelled (or the
    outside facility declines it)."""

    class Status(models.TextChoices):
        SENT = "sent", _("Sent")
        OPENED = "opened", _("Opened")
        UPLOADING = "uploading", _("Uploading")
        RECEIVED = "received", _("Received")
        DECLINED = "declined", _("Declined")
        IMPORTED = "imported", _("Imported")
        CANCELLED = "cancelled", _("Cancelled")

    # While a request is in one of these, its PIN and link open the upload portal.
    OPEN_STATUSES = ("sent", "opened", "uploading", "received")

    class Method(models.TextChoices):
        FAX = "fax", _("Fax to the facility")
        PRINT = "print", _("Print or download")

    facility = models.ForeignKey(Facility, verbose_name=_("requesting facility"),
                                 on_delete=models.PROTECT, related_name="record_requests")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, verbose_name=_("created by"), null=True,
        on_delete=models.SET_NULL, related_name="+",
    )
    created_at = models.DateTimeField(_("created"), default=timezone.now, db_index=True)

    # The outside facility asked. ``target_facility`` is set when it also runs on this
    # platform: its clerks then answer from their own PACS, without PIN or upload.
    target_name = models.CharField(_("facility asked"), max_length=200)
    target_attn = models.CharField(_("attention"), max_length=120, blank=True)
    target_fax = models.CharField(_("fax number"), max_length=20, blank=True)
    target_phone = models.CharField(_("phone"), max_length=30, blank=True)
    target_email = models.EmailField(_("e-mail"), blank=True)
    target_facility = models.ForeignKey(
        Facility, verbose_name=_("facility on this platform"), null=True, blank=True,
        on_delete=models.PROTECT, related_name="incoming_record_requests",
    )

    # The patient as the requester knows them (DICOM PN form for the name), and their
    # row in the requester's archive when the request was started from it.
    patient = models.ForeignKey(Patient, verbose_name=_("patient"), null=True, blank=True,
                                on_delete=models.PROTECT, related_name="record_requests")
    patient_name = models.CharField(_("patient name"), max_length=320)
    patient_name_search = models.CharField(max_length=320, blank=True, db_index=True)
    patient_birth_date = models.DateField(_("date of birth"))
    patient_mrn = models.CharField(_("patient ID (MRN)"), max_length=64, blank=True)
    details = models.TextField(_("request details"), max_length=1000)

    method = models.CharField(_("delivery"), max_length=10, choices=Method.choices,
                              default=Method.PRINT)
    pin_hash = models.CharField(max_length=64, editable=False)
    link_token_hash = models.CharField(max_length=64, unique=True, editable=False)
    request_page = models.FileField(storage=_default_storage, upload_to=request_page_name,
                                    max_length=200, blank=True, editable=False)
    page_issued_at = models.DateTimeField(_("Request Page issued"), null=True, blank=True)

    # The patient's signature is asked for: the page is faxed once they have signed.
    consent_requested = models.BooleanField(_("patient consent requested"), default=False)
    # The signing link sent to the patient: its keyed hash and end. One link at a time;
    # signing, or issuing another, ends it.
    consent_link_hash = models.CharField(max_length=64, blank=True, db_index=True,
                                         editable=False)
    consent_link_expires_at = models.DateTimeField(_("signing link expires"), null=True,
                                                   blank=True)

    status = models.CharField(_("status"), max_length=12, choices=Status.choices,
                              default=Status.SENT, db_index=True)
    opened_at = models.DateTimeField(_("opened"), null=True, blank=True)
    received_at = models.DateTimeField(_("received"), null=True, blank=True)
    declined_at = models.DateTimeField(_("declined"), null=True, blank=True)
    decline_reason = models.CharField(_("reason for declining"), max_length=500, blank=True)
    imported_at = models.DateTimeField(_("imported"), null=True, blank=True)
    cancelled_at = models.DateTimeField(_("cancelled"), null=True, blank=True)
    cancelled_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, verbose_name=_("cancelled by"), null=True, blank=True,
        on_delete=models.SET_NULL, related_name="+",
    )

    class Meta:
        verbose_name = _("record request")
        verbose_name_plural = _("record requests")
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["facility", "-created_at"])]
        constraints = [
            # A PIN names one open request of the facility the uploader chose.
            models.UniqueConstraint(
                fields=["facility", "pin_hash"],
                condition=models.Q(status__in=["sent", "opened", "uploading", "received"]),
                name="one_open_request_per_pin",
            ),
        ]

    def __str__(self):
        return f"Record request {self.pk}"

    @property
    def is_open(self) -> bool:
        return self.status in self.OPEN_STATUSES

    @property
    def is_signed(self) -> bool:
        return hasattr(self, "consent")

    @property
    def is_faxed(self) -> bool:
        return self.method == self.Method.FAX

    @property
    def awaits_consent(self) -> bool:
        """Whether the patient was asked to sign and has not yet."""
        return self.consent_requested and not self.is_signed

    @property
    def may_take_consent(self) -> bool:
        """Consent can be added until the outside facility starts uploading: signing
        issues a new PIN, which would cut off an upload under way."""
        return self.status in (self.Status.SENT, self.Status.OPENED) and not self.is_signed

    def consent_link_open(self, now) -> bool:
        return bool(self.consent_link_hash and self.consent_link_expires_at
                    and now < self.consent_link_expires_at and self.may_take_consent)


class RequestFax(models.Model):
    """One sending of a request's Request Page to the outside facility's fax, through
    the facility's e-mail-to-fax gateway (the same as for Access Pages)."""

    class Status(models.TextChoices):
        QUEUED = "queued", _("Queued")
        SENDING = "sending", _("Sending")
        SENT = "sent", _("Sent")
        FAILED = "failed", _("Failed")

    request = models.ForeignKey(RecordRequest, on_delete=models.CASCADE,
                                related_name="faxes")
    fax_number = models.CharField(_("fax number"), max_length=20)
    address = models.CharField(_("gateway address"), max_length=300)
    status = models.CharField(_("status"), max_length=10, choices=Status.choices,
                              default=Status.QUEUED, db_index=True)
    attempts = models.PositiveSmallIntegerField(_("attempts"), default=0)
    error = models.CharField(_("error"), max_length=500, blank=True)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, verbose_name=_("requested by"), null=True, blank=True,
        on_delete=models.SET_NULL, related_name="+",
    )
    created_at = models.DateTimeField(_("requested"), default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)
    sent_at = models.DateTimeField(_("sent"), null=True, blank=True)

    class Meta:
        verbose_name = _("Request Page fax")
        verbose_name_plural = _("Request Page faxes")
        ordering = ["-created_at", "-id"]

    def __str__(self):
        return f"Fax {self.pk} of request {self.request_id}"

    @property
    def is_pending(self) -> bool:
        return self.status in (self.Status.QUEUED, self.Status.SENDING)


class PatientConsentQuerySet(models.QuerySet):
    def update(self, **kwargs):
        raise PermissionError("a signed consent is never changed")

    def delete(self):
        raise PermissionError("a signed consent is never removed")


class PatientConsent(models.Model):
    """The patient's signed authorization for one request. Written once, never changed:
    the text they saw, the name they typed, their drawn signature, when and from where."""

    class SignatureKind(models.TextChoices):
        DRAWN = "drawn", _("Drawn")
        # For a patient who cannot draw (keyboard, switch access, tremor): their typed
        # name, adopted as their signature, is drawn into the image.
        TYPED = "typed", _("Typed name adopted as signature")

    class Channel(models.TextChoices):
        TABLET = "tablet", _("On the facility's tablet")
        LINK = "link", _("Through a signing link")

    request = models.OneToOneField(RecordRequest, on_delete=models.PROTECT,
                                   related_name="consent")
    authorization_text = models.TextField(_("authorization text"))
    typed_name = models.CharField(_("typed name"), max_length=200)
    signature = models.FileField(storage=_default_storage, upload_to=signature_name,
                                 max_length=200, editable=False)
    signature_sha256 = models.CharField(max_length=64, editable=False)
    signature_kind = models.CharField(_("signature"), max_length=10,
                                      choices=SignatureKind.choices, default=SignatureKind.DRAWN)
    channel = models.CharField(_("signed"), max_length=10, choices=Channel.choices)
    # The clerk whose session the patient signed in (tablet), if any.
    collected_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, verbose_name=_("collected by"), null=True, blank=True,
        on_delete=models.PROTECT, related_name="+",
    )
    signed_on = models.DateField(_("date signed"))
    signed_at = models.DateTimeField(_("signed"), default=timezone.now)
    address = models.GenericIPAddressField(_("address"), null=True, blank=True)
    user_agent = models.CharField(_("browser"), max_length=300, blank=True)

    objects = PatientConsentQuerySet.as_manager()

    class Meta:
        verbose_name = _("patient consent")
        verbose_name_plural = _("patient consents")

    def __str__(self):
        return f"Consent for request {self.request_id}"

    def save(self, *args, **kwargs):
        if not self._state.adding:
            raise PermissionError("a signed consent is never changed")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise PermissionError("a signed consent is never removed")


class Upload(models.Model):
    """One visit of the upload portal that sends files for a request. Files already
    received are known by their path on the disc, so a dropped connection or a closed tab
    resumes where it stopped."""

    class Status(models.TextChoices):
        OPEN = "open", _("Uploading")
        CONFIRMED = "confirmed", _("Confirmed")
        ABANDONED = "abandoned", _("Abandoned")

    request = models.ForeignKey(RecordRequest, on_delete=models.CASCADE,
                                related_name="uploads")
    status = models.CharField(_("status"), max_length=10, choices=Status.choices,
                              default=Status.OPEN, db_index=True)
    address = models.GenericIPAddressField(_("address"), null=True, blank=True)
    created_at = models.DateTimeField(_("started"), default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)
    confirmed_at = models.DateTimeField(_("confirmed"), null=True, blank=True)
    # What the uploader chose (files announced) and what arrived so far.
    files_expected = models.PositiveIntegerField(default=0)
    bytes_expected = models.PositiveBigIntegerField(default=0)
    # The files that the disc's DICOMDIRs list (PS3.10 8.5), as paths of this upload, so
    # that those which did not arrive can be named before the uploader confirms.
    dicomdir_files = models.JSONField(default=list, blank=True, editable=False)

    class Meta:
        verbose_name = _("upload")
        verbose_name_plural = _("uploads")
        ordering = ["-created_at"]
        constraints = [
            # Whoever opens the portal of a request carries on with its open upload.
            models.UniqueConstraint(fields=["request"], condition=models.Q(status="open"),
                                    name="one_open_upload_per_request"),
        ]

    def __str__(self):
        return f"Upload {self.pk} for request {self.request_id}"


class UploadedFile(models.Model):
    """One file the uploader chose, and what became of it. Nothing sent is dropped
    silently: a file that is not DICOM is listed as skipped, invalid DICOM with the
    reason. A row is made when the file is announced (``PENDING``) and settled when its
    bytes arrive; a file that is not DICOM is settled at once, without being sent."""

    class Outcome(models.TextChoices):
        PENDING = "pending", _("Waiting to be sent")
        STORED = "stored", _("Stored")
        DUPLICATE = "duplicate", _("Already received")
        SKIPPED = "skipped", _("Not DICOM: skipped")
        INVALID = "invalid", _("Invalid DICOM")
        CONFLICT = "conflict", _("Kept aside for review")
        REFUSED = "refused", _("Refused")

    upload = models.ForeignKey(Upload, on_delete=models.CASCADE, related_name="files")
    # The path within the folder or disc the uploader chose ("/"-separated).
    path = models.CharField(_("path"), max_length=500)
    size = models.PositiveBigIntegerField(_("size"))
    sha256 = models.CharField(max_length=64, blank=True)
    outcome = models.CharField(_("outcome"), max_length=10, choices=Outcome.choices)
    reason = models.CharField(_("reason"), max_length=300, blank=True)
    instance = models.ForeignKey(Instance, null=True, blank=True, on_delete=models.SET_NULL,
                                 related_name="+")
    received_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = _("uploaded file")
        verbose_name_plural = _("uploaded files")
        constraints = [
            models.UniqueConstraint(fields=["upload", "path"], name="upload_file_once"),
        ]

    def __str__(self):
        return f"{self.path} ({self.outcome})"


class RequestStudy(models.Model):
    """A study a request brought into the archive, how the requester reconciled it with
    their own record of the patient, and its import into their PACS.

    The archived files stay as received; the reconciled values (``local_*``) are written
    only into the copies sent to the PACS, and ``changes`` records each tag changed."""

    request = models.ForeignKey(RecordRequest, on_delete=models.CASCADE,
                                related_name="request_studies")
    # The archived study. The archive keeps it while the request is open; once the
    # request has ended, the study goes with the archive's retention and this row keeps
    # what it was (below), and what was changed and sent.
    study = models.ForeignKey(Study, null=True, blank=True, on_delete=models.SET_NULL,
                              related_name="+")
    study_instance_uid = models.CharField(_("study instance UID"), max_length=64, blank=True)
    study_date = models.DateField(_("study date"), null=True, blank=True)
    description = models.CharField(_("description"), max_length=200, blank=True)
    modalities = models.CharField(_("modalities"), max_length=200, blank=True)
    local_patient_id = models.CharField(_("local patient ID (MRN)"), max_length=64,
                                        blank=True)
    local_patient_name = models.CharField(_("local patient name"), max_length=320,
                                          blank=True)
    local_accession_number = models.CharField(_("local accession number"), max_length=16,
                                              blank=True)
    reconciled_at = models.DateTimeField(_("reconciled"), null=True, blank=True)
    reconciled_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, verbose_name=_("reconciled by"), null=True, blank=True,
        on_delete=models.SET_NULL, related_name="+",
    )
    changes = models.JSONField(_("changes"), default=list, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name = _("requested study")
        verbose_name_plural = _("requested studies")
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["request", "study_instance_uid"],
                                    name="request_study_once"),
        ]

    def __str__(self):
        return f"Study {self.study_id} of request {self.request_id}"

    @property
    def is_reconciled(self) -> bool:
        return self.reconciled_at is not None

    @property
    def modality_list(self) -> list[str]:
        return [m for m in self.modalities.split("\\") if m]


class RequestImport(StoreJob):
    """Sending one received study to a PACS of the requesting facility by C-STORE, under
    the identity the clerk reconciled it to, with a result per instance. A Celery task
    fills the row and the request's page polls it. The values written into the copies
    are kept on the row as they were when the import started (``identity``), so a later
    reconcile never mixes two identities in one import."""

    class Status(models.TextChoices):
        QUEUED = "queued", _("Queued")
        RUNNING = "running", _("In progress")
        COMPLETE = "complete", _("Imported")
        PARTIAL = "partial", _("Partly imported")
        FAILED = "failed", _("Failed")

    request_study = models.ForeignKey(RequestStudy, on_delete=models.CASCADE,
                                      related_name="imports")
    node = models.ForeignKey("dicomgw.PacsNode", verbose_name=_("PACS"),
                             on_delete=models.PROTECT, related_name="+")
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, verbose_name=_("requested by"), null=True, blank=True,
        on_delete=models.SET_NULL, related_name="+",
    )
    # {keyword: value} written into every copy sent (PatientID, PatientName,
    # AccessionNumber), and the original Patient ID kept in Other Patient IDs.
    identity = models.JSONField(_("identity sent"), default=dict)
    status = models.CharField(_("status"), max_length=10, choices=Status.choices,
                              default=Status.QUEUED, db_index=True)
    sent = models.PositiveIntegerField(_("accepted"), default=0)
    warning = models.PositiveIntegerField(_("warnings"), default=0)

    class Meta:
        verbose_name = _("import into PACS")
        verbose_name_plural = _("imports into PACS")
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["request_study"], condition=models.Q(status__in=["queued", "running"]),
                name="one_live_import_per_request_study",
            ),
        ]

    def __str__(self):
        return f"Import {self.pk}"


class RequestImportResult(StoreResult):
    """The C-STORE status of one instance of an import (PS3.4 B.2.3)."""

    request_import = models.ForeignKey(RequestImport, on_delete=models.CASCADE,
                                       related_name="results")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["request_import", "instance"],
                                    name="import_result_once"),
        ]

    def __str__(self):
        return f"Import {self.request_import_id} instance {self.instance_id}: {self.outcome}"


class RequestFulfilment(TaskJob):
    """An answer to a request by the clerks of the asked facility, when it runs on this
    platform too: exams picked from their own archive or PACS, copied by a Celery task
    into the requesting facility's archive. No PIN, no upload."""

    class Status(models.TextChoices):
        QUEUED = "queued", _("Queued")
        RUNNING = "running", _("In progress")
        COMPLETE = "complete", _("Delivered")
        PARTIAL = "partial", _("Partly delivered")
        FAILED = "failed", _("Failed")

    request = models.ForeignKey(RecordRequest, on_delete=models.CASCADE,
                                related_name="fulfilments")
    facility = models.ForeignKey(Facility, verbose_name=_("answering facility"),
                                 on_delete=models.PROTECT, related_name="+")
    answered_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, verbose_name=_("answered by"), null=True, blank=True,
        on_delete=models.SET_NULL, related_name="+",
    )
    status = models.CharField(_("status"), max_length=10, choices=Status.choices,
                              default=Status.QUEUED, db_index=True)
    total = models.PositiveIntegerField(_("images"), default=0)
    copied = models.PositiveIntegerField(_("delivered"), default=0)

    class Meta:
        verbose_name = _("answer from this platform")
        verbose_name_plural = _("answers from this platform")
        ordering = ["-created_at", "-id"]

    def __str__(self):
        return f"Fulfilment {self.pk} of request {self.request_id}"

    @property
    def progress_percent(self) -> int:
        if not self.total:
            return 100 if self.status == self.Status.COMPLETE else 0
        return max(0, min(100, round(100 * self.copied / self.total)))


class FulfilmentStudy(models.Model):
    """One exam of an answer: a study of the answering facility's archive, or one being
    retrieved from its PACS (``retrieve``), and the copy it became in the requesting
    facility's archive (``delivered``)."""

    fulfilment = models.ForeignKey(RequestFulfilment, on_delete=models.CASCADE,
                                   related_name="studies")
    study_instance_uid = models.CharField(_("study instance UID"), max_length=64)
    source = models.ForeignKey(Study, null=True, blank=True, on_delete=models.SET_NULL,
                               related_name="+")
    retrieve = models.ForeignKey("dicomgw.RetrieveJob", null=True, blank=True,
                                 on_delete=models.SET_NULL, related_name="+")
    # What the clerk saw when picking it, to be recognised before the images arrive.
    study_date = models.DateField(_("study date"), null=True, blank=True)
    description = models.CharField(_("description"), max_length=200, blank=True)
    modalities = models.CharField(_("modalities"), max_length=200, blank=True)
    delivered = models.ForeignKey(Study, null=True, blank=True, on_delete=models.SET_NULL,
                                  related_name="+")
    images = models.PositiveIntegerField(_("images"), default=0)
    copied = models.PositiveIntegerField(_("delivered"), default=0)
    error = models.CharField(_("error"), max_length=500, blank=True)

    class Meta:
        verbose_name = _("answered study")
        verbose_name_plural = _("answered studies")
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["fulfilment", "study_instance_uid"],
                                    name="fulfilment_study_once"),
        ]

    def __str__(self):
        return f"Study {self.study_instance_uid} of fulfilment {self.fulfilment_id}"

    @property
    def modality_list(self) -> list[str]:
        return [m for m in self.modalities.split("\\") if m]
