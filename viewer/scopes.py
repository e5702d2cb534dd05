"""What the viewer's pages need to know of the DICOMweb scopes, without loading what the
DICOMweb views read files with (pydicom, numpy): whose scope applies, its root URL, and
the error a request that cannot be answered raises."""

from django.urls import reverse

RECIPIENT = "recipient"
CLERK = "clerk"
URL_NAMES = {RECIPIENT: "dicomweb-recipient-studies", CLERK: "dicomweb-clerk-studies"}


class ViewerError(Exception):
    """A DICOMweb request that cannot be answered, with the HTTP status that says why:
    400 a malformed query, 404 nothing of that name in the visitor's scope, 406 no
    representation the client accepts."""

    def __init__(self, message: str, *, status: int):
        super().__init__(message)
        self.status = status


def dicomweb_root(scope) -> str:
    """The site-relative DICOMweb root of a scope (a ``Scope`` or its kind, ``RECIPIENT``
    or ``CLERK``), as the viewer is configured with it (its qidoRoot and wadoRoot):
    ``/view/dicomweb`` or ``/clerk/dicomweb``."""
    kind = getattr(scope, "kind", scope)
    return reverse(URL_NAMES[kind]).removesuffix("/studies")
