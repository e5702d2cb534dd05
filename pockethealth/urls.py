from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView
from django_otp.admin import OTPAdminSite

from dicomgw.urls import pacs_urlpatterns

from . import views

# The admin refuses any session that has not passed the second factor.
admin.site.__class__ = OTPAdminSite
admin.site.site_header = admin.site.site_title = "Platform administration"
admin.site.login = views.admin_login_redirect

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="clerk-home", permanent=False)),
    path("account/", include("pockethealth.account_urls")),
    path("clerk/", views.clerk_home, name="clerk-home"),
    path("clerk/archive/", include("dicomgw.urls")),
    path("clerk/shares/", include("sharing.urls")),
    path("clerk/pacs/", include(pacs_urlpatterns)),
    path("admin/", admin.site.urls),
    path("", include("sharing.recipient_urls")),
]
