"""Sessions of visitors without an account (a recipient at /view, an uploader at
/upload), kept apart from the staff session: a cookie of their own, sent only under one
path, HttpOnly, SameSite=Lax, Secure on an https site, with no expiry date (it ends
with the browser), stored by the session engine the settings name."""

from collections.abc import Callable
from functools import wraps
from importlib import import_module

from django.conf import settings
from django.contrib.sessions.backends.base import UpdateError
from django.http import HttpRequest, HttpResponse


def secure_cookie() -> bool:
    return settings.SESSION_COOKIE_SECURE or settings.SITE_URL.startswith("https://")


def separate_session(*, attribute: str, cookie_setting: str, engine_setting: str,
                     path: str) -> Callable:
    """A view decorator that gives the view ``request.<attribute>`` (a session read from
    the cookie named by ``cookie_setting``) and writes it back, with its cookie,
    afterwards. Every answer is marked as not to be stored by any cache nor indexed."""

    def decorator(view):
        @wraps(view)
        def wrapper(request: HttpRequest, *args, **kwargs):
            engine = import_module(getattr(settings, engine_setting))
            key = request.COOKIES.get(getattr(settings, cookie_setting))
            setattr(request, attribute, engine.SessionStore(key))
            response = view(request, *args, **kwargs)
            _save(getattr(request, attribute), response, name=getattr(settings, cookie_setting),
                  path=path, had_cookie=key is not None)
            response["Cache-Control"] = "no-store"
            response["X-Robots-Tag"] = "noindex, nofollow"
            return response

        return wrapper

    return decorator


def _save(session, response: HttpResponse, *, name: str, path: str, had_cookie: bool) -> None:
    if session.is_empty():
        if had_cookie:
            response.delete_cookie(name, path=path, samesite="Lax")
        return
    if not session.modified:
        return
    try:
        session.save()
    except UpdateError:
        # Ended elsewhere meanwhile (signed out in another tab, swept as expired).
        response.delete_cookie(name, path=path, samesite="Lax")
        return
    response.set_cookie(name, session.session_key, path=path, secure=secure_cookie(),
                        httponly=True, samesite="Lax")
