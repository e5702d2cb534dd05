"""The upload portal, mounted at /upload/: one address per requesting facility, printed
on its Request Pages."""

from django.urls import path

from . import upload_views as views

urlpatterns = [
    path("<slug:facility>", views.portal, name="upload-portal"),
    path("<slug:facility>/request", views.request_detail, name="upload-request"),
    path("<slug:facility>/start", views.upload_start, name="upload-start"),
    path("<slug:facility>/files", views.upload_files, name="upload-files"),
    path("<slug:facility>/announce", views.upload_announce, name="upload-announce"),
    path("<slug:facility>/file", views.upload_file, name="upload-file"),
    path("<slug:facility>/batch", views.upload_batch, name="upload-batch"),
    path("<slug:facility>/review", views.upload_review, name="upload-review"),
    path("<slug:facility>/confirm", views.upload_confirm_view, name="upload-confirm"),
    path("<slug:facility>/done", views.upload_done, name="upload-done"),
    path("<slug:facility>/decline", views.decline, name="upload-decline"),
    path("<slug:facility>/declined", views.declined, name="upload-declined"),
    path("<slug:facility>/leave", views.leave, name="upload-leave"),
]
