"""The recipient's side, at /view. Mounted at the site's root so that /view itself (the
address printed on every Access Page) answers without a redirect."""

from django.urls import path

from . import recipient_views as views

urlpatterns = [
    path("view", views.unlock, name="recipient-unlock"),
    path("view/inbox", views.inbox, name="recipient-inbox"),
    path("view/inbox/progress", views.inbox_progress, name="recipient-progress"),
    path("view/extend", views.extend, name="recipient-extend"),
    path("view/download", views.download, name="recipient-download"),
    path("view/downloads/<int:job_id>", views.media_status, name="recipient-media-status"),
    path("view/downloads/<int:job_id>/file", views.media_file, name="recipient-media-file"),
    path("view/studies/<int:share_study_id>/viewer", views.exam_viewer,
         name="recipient-exam"),
    path("view/signout", views.sign_out, name="recipient-signout"),
]
