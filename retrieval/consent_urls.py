from django.urls import path

from . import consent_views

urlpatterns = [
    path("done/", consent_views.consent_done, name="consent-done"),
    path("<str:token>/", consent_views.consent_sign_view, name="consent-sign"),
]
