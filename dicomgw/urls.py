from django.urls import path

from . import views

urlpatterns = [
    path("", views.patient_list, name="archive-patients"),
    path("patients/<int:patient_id>/", views.patient_detail, name="archive-patient"),
    path("studies/<int:study_id>/", views.study_detail, name="archive-study"),
]
