from django.contrib import admin, messages
from django.utils import timezone
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from pockethealth.models import StaffUser

from .models import Delivery, Share, ShareStudy, SharingSettings
from .recipient import share_lock_clear, share_support_extend
from .services import SharingError


@admin.register(SharingSettings)
class SharingSettingsAdmin(admin.ModelAdmin):
    list_display = ["facility", "fax_gateway_domain", "fax_sender_email"]
    search_fields = ["facility__name"]


class ShareStudyInline(admin.TabularInline):
    model = ShareStudy
    extra = 0
    can_delete = False
    fields = ["study_date", "modalities", "description", "study", "retrieve"]
    readonly_fields = fields

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Share)
class ShareAdmin(admin.ModelAdmin):
    """Read-only: shares change through the clerical pages, which audit what they do."""

    list_display = ["id", "facility", "status", "method", "created_at", "expires_at",
                    "extended", "revoked_at", "locked_at"]
    list_filter = ["status", "method", "extended", "facility"]
    search_fields = ["=id", "=code_last3"]
    inlines = [ShareStudyInline]
    exclude = ["code_hash", "patient_name_search"]
    actions = ["unlock", "extend_to_limit"]

    def has_support_permission(self, request) -> bool:
        user = request.user
        return user.is_active and (user.is_superuser
                                   or getattr(user, "role", "") == StaffUser.Role.SUPPORT)

    @admin.action(description=_("Unlock (after too many wrong dates of birth)"),
                  permissions=["support"])
    def unlock(self, request, queryset):
        done = 0
        for share in queryset.filter(locked_at__isnull=False):
            share_lock_clear(share=share, by=request.user, now=timezone.now(), request=request)
            done += 1
        self.message_user(request, ngettext("%(n)d share unlocked.", "%(n)d shares unlocked.",
                                            done) % {"n": done})

    @admin.action(description=_("Extend access to the limit (9 months after creation)"),
                  permissions=["support"])
    def extend_to_limit(self, request, queryset):
        done = 0
        for share in queryset.select_related("facility"):
            try:
                share_support_extend(share=share, by=request.user, now=timezone.now(),
                                     request=request)
            except SharingError as exc:
                self.message_user(request, f"{share}: {exc}", messages.WARNING)
            else:
                done += 1
        self.message_user(request, ngettext("%(n)d share extended.", "%(n)d shares extended.",
                                            done) % {"n": done})

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Delivery)
class DeliveryAdmin(admin.ModelAdmin):
    list_display = ["id", "share", "status", "attempts", "created_at", "sent_at"]
    list_filter = ["status"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
