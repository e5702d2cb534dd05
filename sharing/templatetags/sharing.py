from django import template

from ..picks import pick_encode

register = template.Library()


@register.filter
def share_pick(hit, node) -> str:
    """The value of a PACS search hit's "pick" checkbox for the new-share page:
    ``<input type="checkbox" name="pick" value="{{ hit|share_pick:node }}">``."""
    return pick_encode(hit, node)
