from django.urls import path

from . import views

urlpatterns = [
    path("", views.share_list, name="share-list"),
    path("new/", views.share_new, name="share-new"),
    path("<int:share_id>/", views.share_detail, name="share-detail"),
    path("<int:share_id>/live/", views.share_live, name="share-live"),
    path("<int:share_id>/access-page.pdf", views.share_access_page, name="share-access-page"),
    path("<int:share_id>/revoke/", views.share_revoke_view, name="share-revoke"),
    path("<int:share_id>/reissue/", views.share_reissue_view, name="share-reissue"),
    path("<int:share_id>/retry/", views.share_retry_view, name="share-retry"),
    path("<int:share_id>/unlock/", views.share_unlock_view, name="share-unlock"),
    path("<int:share_id>/faxes/<int:delivery_id>/resend/", views.delivery_resend_view,
         name="share-fax-resend"),
]
