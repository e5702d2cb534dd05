"""The pages that start the browser viewer. The recipient's sits under /view, where their
session cookie is sent; the clerk's under /clerk/viewer/ (mounted by the project's
URLconf)."""

from django.urls import path, re_path

from . import app_views as views

recipient_urlpatterns = [
    re_path(r"^view/app/(?P<route>.*)$", views.recipient_app, name="viewer-recipient-app"),
]

clerk_urlpatterns = [
    path("studies/<int:study_id>/", views.clerk_study, name="viewer-clerk-study"),
    re_path(r"^app/(?P<route>.*)$", views.clerk_app, name="viewer-clerk-app"),
]
