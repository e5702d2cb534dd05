from django.contrib import admin
from django.contrib.auth.admin import UserAdmin
from django.utils.translation import gettext_lazy as _

from .models import AuditEvent, Facility, StaffUser


@admin.register(Facility)
class FacilityAdmin(admin.ModelAdmin):
    list_display = ["name", "short_name", "phone", "time_zone"]
    search_fields = ["name", "short_name"]


@admin.register(StaffUser)
class StaffUserAdmin(UserAdmin):
    list_display = ["username", "first_name", "last_name", "facility", "role", "is_active"]
    list_filter = ["role", "facility", "is_active", "is_staff"]
    fieldsets = [
        *UserAdmin.fieldsets,
        (_("Facility"), {"fields": ["facility", "role"]}),
    ]
    add_fieldsets = [
        *UserAdmin.add_fieldsets,
        (_("Facility"), {"fields": ["facility", "role"]}),
    ]


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    """Browsable and filterable; never added, changed or deleted by hand."""

    list_display = ["time", "action", "outcome", "actor_type", "actor_user", "actor_ref",
                    "facility", "object_type", "object_id", "patient_ref", "client_address"]
    list_filter = ["outcome", "actor_type", "action", "facility",
                   ("time", admin.DateFieldListFilter)]
    search_fields = ["action", "actor_ref", "actor_user__username", "object_id", "patient_ref",
                     "client_address"]
    date_hierarchy = "time"
    list_select_related = ["actor_user", "facility"]
    actions = None

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
