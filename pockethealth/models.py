import zoneinfo

from django.contrib.auth.models import AbstractUser
from django.core.validators import RegexValidator
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

short_name_validator = RegexValidator(
    r"^[a-z0-9][a-z0-9-]{1,39}$",
    _("Use 2–40 lower-case letters, digits or hyphens; it appears in the upload address."),
)


host_name_validator = RegexValidator(
    r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)+$",
    _("Enter a host name such as upload.st-anthony.org: lower-case letters, digits, "
      "hyphens and dots, no scheme or path."),
)


def time_zone_choices():
    return [(name, name) for name in sorted(zoneinfo.available_timezones())]


class Facility(models.Model):
    """An imaging facility (hospital, clinic) on the platform."""

    name = models.CharField(_("name"), max_length=200)
    short_name = models.CharField(
        _("short name"), max_length=40, unique=True, validators=[short_name_validator],
        help_text=_("Used in the facility's upload address, e.g. /upload/st-anthony."),
    )
    upload_host = models.CharField(
        _("upload host name"), max_length=253, blank=True, validators=[host_name_validator],
        help_text=_("Optional: a host name of the facility's own (e.g. upload.st-anthony.org) "
                    "that points at this server. Request Pages then print it as the upload "
                    "address; it must also be listed in ALLOWED_HOSTS."),
    )
    address = models.TextField(_("address"), blank=True)
    phone = models.CharField(_("phone"), max_length=40, blank=True)
    fax = models.CharField(_("fax"), max_length=40, blank=True)
    logo = models.ImageField(_("logo"), upload_to="logos/", blank=True)
    support_phone = models.CharField(_("support phone"), max_length=40, blank=True)
    support_email = models.EmailField(_("support email"), blank=True)
    time_zone = models.CharField(
        _("time zone"), max_length=64, default="America/Toronto", choices=time_zone_choices,
    )
    created_at = models.DateTimeField(_("created"), default=timezone.now, editable=False)

    class Meta:
        verbose_name = _("facility")
        verbose_name_plural = _("facilities")
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["upload_host"], condition=~models.Q(upload_host=""),
                                    name="facility_upload_host_unique"),
        ]

    def __str__(self):
        return self.name

    def save(self, *args, **kwargs):
        self.upload_host = self.upload_host.strip().lower()
        super().save(*args, **kwargs)


class StaffUser(AbstractUser):
    """A person who signs in with a password and a second factor: a facility's clerk
    or administrator, or platform support (no facility)."""

    class Role(models.TextChoices):
        CLERK = "clerk", _("Clerk")
        FACILITY_ADMIN = "facility_admin", _("Facility administrator")
        SUPPORT = "support", _("Platform support")

    facility = models.ForeignKey(
        Facility, verbose_name=_("facility"), on_delete=models.PROTECT,
        null=True, blank=True, related_name="staff",
    )
    role = models.CharField(_("role"), max_length=20, choices=Role.choices, default=Role.CLERK)

    class Meta:
        verbose_name = _("staff user")
        verbose_name_plural = _("staff users")
        constraints = [
            models.CheckConstraint(
                condition=models.Q(role="support") | models.Q(facility__isnull=False),
                name="staff_facility_required_unless_support",
            ),
        ]

    @property
    def is_platform_support(self) -> bool:
        return self.role == self.Role.SUPPORT


class AuditEventQuerySet(models.QuerySet):
    def update(self, **kwargs):
        raise PermissionError("audit events are append-only")

    def delete(self):
        raise PermissionError("audit events are append-only")


class AuditEvent(models.Model):
    """One thing that happened: who (a staff user, a recipient's share session or an
    uploader's session), did what, to which object, for which patient, with what outcome,
    from where and when. Written only through ``pockethealth.services.audit_record``;
    never changed or removed."""

    class ActorType(models.TextChoices):
        USER = "user", _("Staff user")
        SHARE_SESSION = "share_session", _("Share session")
        UPLOAD_SESSION = "upload_session", _("Upload session")
        SYSTEM = "system", _("System")
        ANONYMOUS = "anonymous", _("Anonymous")

    class Outcome(models.TextChoices):
        SUCCESS = "success", _("Success")
        FAILURE = "failure", _("Failure")
        DENIED = "denied", _("Denied")

    time = models.DateTimeField(_("time"), default=timezone.now, db_index=True)
    actor_type = models.CharField(_("actor type"), max_length=20, choices=ActorType.choices)
    actor_user = models.ForeignKey(
        StaffUser, verbose_name=_("user"), null=True, blank=True,
        on_delete=models.PROTECT, related_name="+",
    )
    # A share-session or upload-session id, or the user name tried in a failed login.
    actor_ref = models.CharField(_("actor reference"), max_length=150, blank=True)
    facility = models.ForeignKey(
        Facility, verbose_name=_("facility"), null=True, blank=True,
        on_delete=models.PROTECT, related_name="+",
    )
    action = models.CharField(_("action"), max_length=64, db_index=True)
    object_type = models.CharField(_("object type"), max_length=64, blank=True)
    object_id = models.CharField(_("object id"), max_length=128, blank=True)
    # The archive's patient row id: a reference, never the name or MRN itself.
    patient_ref = models.CharField(_("patient reference"), max_length=64, blank=True, db_index=True)
    outcome = models.CharField(_("outcome"), max_length=10, choices=Outcome.choices)
    client_address = models.GenericIPAddressField(_("client address"), null=True, blank=True)
    detail = models.JSONField(_("detail"), default=dict, blank=True)

    objects = AuditEventQuerySet.as_manager()

    class Meta:
        verbose_name = _("audit event")
        verbose_name_plural = _("audit events")
        ordering = ["-time", "-id"]
        indexes = [models.Index(fields=["object_type", "object_id"])]

    def __str__(self):
        return f"{self.time:%Y-%m-%d %H:%M:%S} {self.action} {self.outcome}"

    def save(self, *args, **kwargs):
        if self.pk is not None:
            raise PermissionError("audit events are append-only")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise PermissionError("audit events are append-only")
