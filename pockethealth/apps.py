from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class PockethealthConfig(AppConfig):
    name = "pockethealth"
    verbose_name = _("Platform")
