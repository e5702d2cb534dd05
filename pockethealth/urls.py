from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView
from django_otp.admin import OTPAdminSite

from dicomgw.urls import pacs_urlpatterns
from viewer import urls as dicomweb_urls
from viewer import viewer_urls

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
    path("clerk/requests/", include("retrieval.urls")),
    path("consent/", include("retrieval.consent_urls")),
    path("upload/", include("retrieval.upload_urls")),
    path("clerk/pacs/", include(pacs_urlpatterns)),
    path("clerk/viewer/", include(viewer_urls.clerk_urlpatterns)),
    path("clerk/dicomweb/", include(dicomweb_urls.clerk_urlpatterns)),
    path("admin/", admin.site.urls),
    path("view/dicomweb/", include(dicomweb_urls.recipient_urlpatterns)),
    path("", include("sharing.recipient_urls")),
    path("", include(viewer_urls.recipient_urlpatterns)),
]
