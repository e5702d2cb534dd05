from django.contrib import admin

from .models import Instance, InstanceConflict, Patient, Series, Study


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
