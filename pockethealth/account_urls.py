from django.urls import path

from . import views

urlpatterns = [
    path("login/", views.login_view, name="login"),
    path("logout/", views.logout_view, name="logout"),
    path("verify/", views.otp_verify, name="otp-verify"),
    path("enrol/", views.otp_enrol, name="otp-enrol"),
    path("backup-codes/", views.backup_codes, name="otp-backup-codes"),
]
