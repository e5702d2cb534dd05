from django.contrib import admin

from .models import PatientConsent, RecordRequest, RequestFax


class ReadOnlyAdmin(admin.ModelAdmin):
    """Requests change through the clerical pages and the upload portal, which audit what
    they do; a signed consent never changes at all."""

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class PatientConsentInline(admin.StackedInline):
    model = PatientConsent
    extra = 0
    can_delete = False
    fields = ["signed_at", "signed_on", "typed_name", "signature_kind", "channel",
              "collected_by", "signature_sha256", "address", "user_agent"]
    readonly_fields = fields

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(RecordRequest)
class RecordRequestAdmin(ReadOnlyAdmin):
    list_display = ["id", "facility", "target_name", "status", "method", "created_at",
                    "received_at", "cancelled_at"]
    list_filter = ["status", "method", "facility"]
    search_fields = ["=id", "target_name"]
    exclude = ["pin_hash", "link_token_hash", "consent_link_hash", "patient_name_search"]
    inlines = [PatientConsentInline]


@admin.register(PatientConsent)
class PatientConsentAdmin(ReadOnlyAdmin):
    list_display = ["id", "request", "signed_at", "signature_kind", "channel"]
    list_filter = ["signature_kind", "channel"]
    search_fields = ["=request__id"]


@admin.register(RequestFax)
class RequestFaxAdmin(ReadOnlyAdmin):
    list_display = ["id", "request", "status", "attempts", "created_at", "sent_at"]
    list_filter = ["status"]
