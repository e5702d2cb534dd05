from django.conf import settings


def site(request):
    return {
        "PRODUCT_NAME": settings.PRODUCT_NAME,
        "SUPPORT_PHONE": settings.SUPPORT_PHONE,
        "SUPPORT_EMAIL": settings.SUPPORT_EMAIL,
        "SITE_URL": settings.SITE_URL,
    }
