from django.urls import path

from . import views

urlpatterns = [
    path("", views.patient_list, name="archive-patients"),
    path("patients/<int:patient_id>/", views.patient_detail, name="archive-patient"),
    path("studies/<int:study_id>/", views.study_detail, name="archive-study"),
]

# Mounted at /clerk/pacs/ by the project's URLconf.
pacs_urlpatterns = [
    path("", views.pacs_search, name="pacs-search"),
    path("verify/", views.pacs_verify, name="pacs-verify"),
    path("retrieve/", views.pacs_retrieve, name="pacs-retrieve"),
    path("retrieves/", views.retrieve_list, name="pacs-retrieves"),
    path("retrieves/<int:job_id>/", views.retrieve_detail, name="pacs-retrieve-detail"),
    path("retrieves/<int:job_id>/retry/", views.retrieve_retry, name="pacs-retrieve-retry"),
    path("send/<int:study_id>/", views.push_new, name="pacs-send"),
    path("pushes/", views.push_list, name="pacs-pushes"),
    path("pushes/<int:job_id>/", views.push_detail, name="pacs-push-detail"),
    path("pushes/<int:job_id>/retry/", views.push_retry, name="pacs-push-retry"),
]
