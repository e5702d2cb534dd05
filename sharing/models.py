"""Provider sharing: a share of a patient's exams with another provider, the studies in
it (and the retrieves that bring them into the archive), how its Access Page went out,
and each facility's fax gateway."""

import uuid

from django.conf import settings
from django.core.files.storage import default_storage
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from dicomgw.models import PacsNode, Patient, RetrieveJob, Study
from pockethealth.models import Facility


def access_page_name(instance, filename):
    """A storage name that says nothing of the patient or the share: a random UUID."""
    token = uuid.uuid4().hex
    return f"access-pages/{instance.facility_id}/{token[:2]}/{token}.pdf"


def _default_storage():
    return default_storage


class SharingSettings(models.Model):
    """How one facility sends Access Pages by fax: through an e-mail-to-fax gateway that
    turns a message to ``<digits>@<domain>`` into a fax with the attached PDF."""

    facility = models.OneToOneField(
        Facility, verbose_name=_("facility"), on_delete=models.CASCADE,
        related_name="sharing_settings",
    )
    fax_gateway_domain = models.CharField(
        _("fax gateway domain"), max_length=253, blank=True,
        help_text=_("E-mail to <fax digits>@this domain becomes a fax, e.g. "
                    "fax.example.net. Empty uses the platform's gateway, if any."),
    )
    fax_sender_email = models.EmailField(
        _("fax sender address"), blank=True,
        help_text=_("The From address the gateway knows this facility by. Empty uses "
                    "the platform's sender address."),
    )

    class Meta:
        verbose_name = _("sharing settings")
        verbose_name_plural = _("sharing settings")

    def __str__(self):
        return f"Sharing settings of facility {self.facility_id}"

    @property
    def gateway_domain(self) -> str:
        return self.fax_gateway_domain or settings.FAX_GATEWAY_DOMAIN

    @property
    def sender_email(self) -> str:
        return self.fax_sender_email or settings.FAX_SENDER_EMAIL


class Share(models.Model):
    """A patient's exams made available to one recipient through a security code (on
    the Access Page) and the patient's date of birth.

    The code itself is never stored: ``code_hash`` is its keyed hash (see
    ``pockethealth.codes``), and the Access Page, which prints it, is rendered once while
    the code is known and kept as a file."""

    class Status(models.TextChoices):
        TRANSFERRING = "transferring", _("Transfer in progress")
        READY = "ready", _("Ready")
        PARTIAL = "partial", _("Partly transferred")
        FAILED = "failed", _("Transfer failed")
        REVOKED = "revoked", _("Revoked")

    class Method(models.TextChoices):
        FAX = "fax", _("Fax to the recipient")
        PATIENT = "patient", _("Hand to the patient")
        PRINT = "print", _("Print or download")

    facility = models.ForeignKey(Facility, verbose_name=_("facility"),
                                 on_delete=models.PROTECT, related_name="shares")
    # The archive's patient once known (at once for archived studies; when the first
    # study arrives for studies fetched from the PACS).
    patient = models.ForeignKey(Patient, verbose_name=_("patient"), null=True, blank=True,
                                on_delete=models.PROTECT, related_name="shares")
    # The identity printed on the Access Page and checked by the recipient, as it was
    # when the share was made (DICOM PN form).
    patient_name = models.CharField(_("patient name"), max_length=320)
    patient_name_search = models.CharField(max_length=320, blank=True, db_index=True)
    patient_mrn = models.CharField(_("patient ID (MRN)"), max_length=64, blank=True)
    patient_birth_date = models.DateField(_("date of birth"))

    method = models.CharField(_("delivery"), max_length=10, choices=Method.choices)
    recipient_attn = models.CharField(_("attention"), max_length=120, blank=True)
    recipient_institution = models.CharField(_("recipient facility"), max_length=200,
                                             blank=True)
    recipient_fax = models.CharField(_("fax number"), max_length=20, blank=True)
    subject = models.CharField(_("subject"), max_length=120, blank=True)
    note = models.CharField(_("note"), max_length=300, blank=True)

    code_hash = models.CharField(max_length=64, unique=True, editable=False)
    # The last three symbols, for finding a share when a recipient calls.
    code_last3 = models.CharField(_("code ends in"), max_length=3, db_index=True,
                                  editable=False)
    access_page = models.FileField(storage=_default_storage, upload_to=access_page_name,
                                   max_length=200, blank=True, editable=False)
    page_issued_at = models.DateTimeField(_("Access Page issued"), null=True, blank=True)

    status = models.CharField(_("status"), max_length=12, choices=Status.choices,
                              default=Status.TRANSFERRING, db_index=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, verbose_name=_("created by"), null=True,
        on_delete=models.SET_NULL, related_name="+",
    )
    created_at = models.DateTimeField(_("created"), default=timezone.now, db_index=True)
    expires_at = models.DateTimeField(_("access expires"))
    extended = models.BooleanField(_("extended"), default=False)
    extended_at = models.DateTimeField(_("extended on"), null=True, blank=True)
    transfer_finished_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(_("revoked"), null=True, blank=True)
    revoked_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, verbose_name=_("revoked by"), null=True, blank=True,
        on_delete=models.SET_NULL, related_name="+",
    )
    last_accessed_at = models.DateTimeField(_("last access"), null=True, blank=True)
    # Recipient access (sharing.recipient): wrong dates of birth typed with the right
    # code since the last good one; at SHARE_DOB_ATTEMPTS the share locks until a clerk
    # or support unlocks it.
    failed_dob_attempts = models.PositiveIntegerField(_("wrong dates of birth"), default=0)
    locked_at = models.DateTimeField(_("locked"), null=True, blank=True)
    unlocked_at = models.DateTimeField(_("unlocked"), null=True, blank=True)
    unlocked_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, verbose_name=_("unlocked by"), null=True, blank=True,
        on_delete=models.SET_NULL, related_name="+",
    )
    # When the expiry job saw that access had ended (``expires_at`` decides access).
    expired_at = models.DateTimeField(_("marked expired"), null=True, blank=True)

    class Meta:
        verbose_name = _("share")
        verbose_name_plural = _("shares")
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["facility", "-created_at"])]

    def __str__(self):
        return f"Share {self.pk}"

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    def is_expired(self, now=None) -> bool:
        return (now or timezone.now()) >= self.expires_at

    def is_open(self, now=None) -> bool:
        """Whether a recipient with the code and date of birth may see it now."""
        return not self.is_revoked and not self.is_expired(now)

    @property
    def is_locked(self) -> bool:
        return self.locked_at is not None

    @property
    def is_transferring(self) -> bool:
        return self.status == self.Status.TRANSFERRING

    @property
    def is_faxed(self) -> bool:
        return self.method == self.Method.FAX


class ShareStudy(models.Model):
    """One exam of a share. What the page shows of it is captured when the share is made,
    so the Access Page can be printed before its images arrive; ``retrieve`` is the PACS
    retrieve that brings it into the archive, if one was needed."""

    share = models.ForeignKey(Share, on_delete=models.CASCADE, related_name="share_studies")
    study = models.ForeignKey(Study, null=True, blank=True, on_delete=models.PROTECT,
                              related_name="+")
    study_instance_uid = models.CharField(_("study instance UID"), max_length=64)
    study_date = models.DateField(_("study date"), null=True, blank=True)
    description = models.CharField(_("description"), max_length=200, blank=True)
    modalities = models.CharField(_("modalities"), max_length=200, blank=True)
    node = models.ForeignKey(PacsNode, null=True, blank=True, on_delete=models.PROTECT,
                             related_name="+")
    retrieve = models.ForeignKey(RetrieveJob, null=True, blank=True,
                                 on_delete=models.SET_NULL, related_name="+")
    expected_images = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        verbose_name = _("shared study")
        verbose_name_plural = _("shared studies")
        ordering = ["-study_date", "id"]
        constraints = [
            models.UniqueConstraint(fields=["share", "study_instance_uid"],
                                    name="share_study_once"),
        ]

    def __str__(self):
        return f"Share {self.share_id} study {self.pk}"

    @property
    def modality_list(self) -> list[str]:
        return [m for m in self.modalities.replace(",", "\\").split("\\") if m.strip()]


class Delivery(models.Model):
    """One sending of a share's Access Page by fax (the e-mail to the gateway)."""

    class Status(models.TextChoices):
        QUEUED = "queued", _("Queued")
        SENDING = "sending", _("Sending")
        SENT = "sent", _("Sent to the fax gateway")
        FAILED = "failed", _("Failed")

    share = models.ForeignKey(Share, on_delete=models.CASCADE, related_name="deliveries")
    fax_number = models.CharField(_("fax number"), max_length=20)
    address = models.CharField(_("gateway address"), max_length=320)
    status = models.CharField(_("status"), max_length=10, choices=Status.choices,
                              default=Status.QUEUED, db_index=True)
    error = models.CharField(_("error"), max_length=500, blank=True)
    attempts = models.PositiveIntegerField(_("attempts"), default=0)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
        related_name="+",
    )
    resend_of = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL,
                                  related_name="resends")
    created_at = models.DateTimeField(_("requested"), default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)
    sent_at = models.DateTimeField(_("sent"), null=True, blank=True)

    class Meta:
        verbose_name = _("delivery")
        verbose_name_plural = _("deliveries")
        ordering = ["-created_at", "-id"]

    def __str__(self):
        return f"Delivery {self.pk}"

    @property
    def is_pending(self) -> bool:
        return self.status in {self.Status.QUEUED, self.Status.SENDING}
