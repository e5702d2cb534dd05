from django.contrib import admin, messages
from django.utils.translation import gettext_lazy as _

from .models import (
    Instance,
    InstanceConflict,
    PacsNode,
    Patient,
    PushJob,
    PushResult,
    RetrieveJob,
    Series,
    Study,
)
from .retrieve import node_verify


class ReadOnlyAdmin(admin.ModelAdmin):
    """The archive index is written by the ingest service only."""

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(Patient)
class PatientAdmin(ReadOnlyAdmin):
    list_display = ["id", "facility", "patient_id", "name", "birth_date", "sex"]
    list_filter = ["facility"]
    search_fields = ["patient_id", "name_search"]


class SeriesInline(admin.TabularInline):
    model = Series
    fields = ["series_number", "modality", "description", "num_instances", "total_bytes"]
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Study)
class StudyAdmin(ReadOnlyAdmin):
    list_display = ["id", "facility", "patient", "study_date", "modalities", "description",
                    "num_series", "num_instances", "total_bytes"]
    list_filter = ["facility", "modalities"]
    search_fields = ["study_instance_uid", "accession_number"]
    date_hierarchy = "study_date"
    inlines = [SeriesInline]


@admin.register(Instance)
class InstanceAdmin(ReadOnlyAdmin):
    list_display = ["id", "sop_instance_uid", "transfer_syntax_uid", "size", "sha256", "source",
                    "received_at"]
    list_filter = ["source", "transfer_syntax_uid"]
    search_fields = ["sop_instance_uid", "sha256"]
    raw_id_fields = ["series"]


@admin.register(InstanceConflict)
class InstanceConflictAdmin(admin.ModelAdmin):
    list_display = ["id", "sop_instance_uid", "existing", "sha256", "source", "received_at",
                    "resolved"]
    list_filter = ["resolved", "source"]
    readonly_fields = ["facility", "existing", "sop_instance_uid", "file", "size", "sha256",
                       "source", "received_at"]


# --- The PACS link -----------------------------------------------------------------


@admin.register(PacsNode)
class PacsNodeAdmin(admin.ModelAdmin):
    list_display = ["name", "facility", "ae_title", "host", "port", "query_model",
                    "supports_c_get", "is_active", "last_verified_at", "last_verify_result"]
    list_filter = ["facility", "is_active", "query_model", "supports_c_get", "tls_enabled"]
    search_fields = ["name", "ae_title", "host"]
    readonly_fields = ["last_verified_at", "last_verify_result"]
    actions = ["verify"]
    fieldsets = [
        (None, {"fields": ["facility", "name", "is_active"]}),
        (_("Connection"), {"fields": ["ae_title", "host", "port", "calling_ae_title",
                                      "move_destination", "query_model", "supports_c_get",
                                      "may_send", "max_pdu"]}),
        (_("Timeouts"), {"fields": ["acse_timeout", "dimse_timeout", "network_timeout"]}),
        (_("DICOM TLS"), {"fields": ["tls_enabled", "tls_ca_file", "tls_cert_file",
                                     "tls_key_file"]}),
        (_("Verification"), {"fields": ["last_verified_at", "last_verify_result"]}),
    ]

    @admin.action(description=_("Verify (C-ECHO)"))
    def verify(self, request, queryset):
        for node in queryset:
            ok, message = node_verify(node=node, user=request.user)
            self.message_user(request, f"{node.name}: {message}",
                              messages.SUCCESS if ok else messages.ERROR)


class JobAdmin(admin.ModelAdmin):
    """Jobs are written by their tasks; the admin only shows them."""

    list_filter = ["status", "facility"]
    date_hierarchy = "created_at"

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(RetrieveJob)
class RetrieveJobAdmin(JobAdmin):
    list_display = ["id", "facility", "node", "status", "expected", "archived", "failed",
                    "attempts", "created_at", "finished_at"]
    search_fields = ["study_instance_uid"]
    raw_id_fields = ["study"]


class PushResultInline(admin.TabularInline):
    model = PushResult
    fields = ["instance", "status", "outcome", "detail", "sent_at"]
    readonly_fields = fields
    raw_id_fields = ["instance"]
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(PushJob)
class PushJobAdmin(JobAdmin):
    list_display = ["id", "facility", "node", "study", "status", "total", "sent", "failed",
                    "attempts", "created_at", "finished_at"]
    raw_id_fields = ["study"]
    inlines = [PushResultInline]
