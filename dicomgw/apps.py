from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class DicomgwConfig(AppConfig):
    name = "dicomgw"
    verbose_name = _("Imaging archive and DICOM gateway")
