from django.urls import include, path

from . import views

urlpatterns = [
    path("", views.request_list, name="request-list"),
    path("new/", views.request_new, name="request-new"),
    path("<int:request_id>/", views.request_detail, name="request-detail"),
    path("<int:request_id>/live/", views.request_live, name="request-live"),
    path("<int:request_id>/request-page.pdf", views.request_page_file, name="request-page"),
    path("<int:request_id>/cancel/", views.request_cancel_view, name="request-cancel"),
    path("<int:request_id>/reissue/", views.request_reissue_view, name="request-reissue"),
    path("<int:request_id>/fax/", views.request_fax_view, name="request-fax"),
    path("<int:request_id>/consent-link/", views.request_consent_link_view,
         name="request-consent-link"),
    path("<int:request_id>/sign/", views.request_sign, name="request-sign"),
    path("<int:request_id>/signed/", views.request_signed, name="request-signed"),
    # Received studies, imports, and requests addressed to this facility (review_urls).
    path("", include("retrieval.review_urls")),
]
