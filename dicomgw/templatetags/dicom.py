from django import template

from dicomgw.models import format_person_name

register = template.Library()


@register.filter
def pn(value: str) -> str:
    """A DICOM person name (PS3.5 6.2) for reading: "FAMILY, Given", other name groups
    (ideographic, phonetic) after a slash."""
    groups = [format_person_name(g) for g in (value or "").split("=") if g.strip("^ ")]
    return " / ".join(groups)
