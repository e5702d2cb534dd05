"""Received records (under /clerk/requests/): a request's studies, reconcile and import;
and the requests other facilities of the platform addressed to this one."""

from django.urls import path

from . import review_views as views

urlpatterns = [
    path("<int:request_id>/studies/", views.request_studies, name="request-studies"),
    path("<int:request_id>/studies/<int:request_study_id>/reconcile/",
         views.request_study_reconcile_view, name="request-study-reconcile"),
    path("<int:request_id>/import/", views.request_import_view, name="request-import-start"),
    path("<int:request_id>/imports/<int:import_id>/", views.request_import_detail,
         name="request-import"),
    path("<int:request_id>/imports/<int:import_id>/retry/", views.request_import_retry_view,
         name="request-import-retry"),
    path("incoming/", views.incoming_list, name="request-incoming-list"),
    path("incoming/<int:request_id>/", views.incoming_detail, name="request-incoming"),
    path("incoming/<int:request_id>/archive/", views.incoming_archive_search,
         name="request-incoming-archive"),
    path("incoming/<int:request_id>/pacs/", views.incoming_pacs_search,
         name="request-incoming-pacs"),
    path("incoming/<int:request_id>/answer/", views.incoming_answer,
         name="request-incoming-answer"),
    path("incoming/<int:request_id>/progress/", views.incoming_progress,
         name="request-incoming-progress"),
    path("incoming/<int:request_id>/answers/<int:fulfilment_id>/retry/", views.incoming_retry,
         name="request-incoming-retry"),
    path("incoming/<int:request_id>/decline/", views.incoming_decline,
         name="request-incoming-decline"),
]
