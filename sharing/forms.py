from django import forms
from django.db.models import Q, QuerySet
from django.utils.translation import gettext_lazy as _

from dicomgw.services import name_search_key
from pockethealth.codes import (
    CODE_LENGTH,
    code_hash,
    code_is_well_formed,
    code_normalise,
)

from .models import Share
from .picks import Pick, PickError, pick_decode
from .services import FAX_DIGITS, Recipient, fax_digits


class ShareSearchForm(forms.Form):
    """Find a facility's shares. POSTed and kept in the session: no name in a URL."""

    q = forms.CharField(
        label=_("Patient"), required=False, max_length=100,
        widget=forms.TextInput(attrs={"type": "search", "autocomplete": "off",
                                      "placeholder": _("Name or MRN")}),
    )
    code = forms.CharField(
        label=_("Security code"), required=False, max_length=20,
        widget=forms.TextInput(attrs={"autocomplete": "off", "spellcheck": "false",
                                      "placeholder": _("Last 3, or the whole code")}),
    )
    recipient = forms.CharField(
        label=_("Recipient"), required=False, max_length=100,
        widget=forms.TextInput(attrs={"type": "search", "autocomplete": "off",
                                      "placeholder": _("Name, facility or fax")}),
    )

    def clean_code(self) -> str:
        code = code_normalise(self.cleaned_data["code"])
        if code and len(code) != CODE_LENGTH and len(code) > 3:
            raise forms.ValidationError(_("Enter the whole code or its last 3 characters."))
        if len(code) == CODE_LENGTH and not code_is_well_formed(code):
            raise forms.ValidationError(_("That is not a security code."))
        return code

    def serialised(self) -> dict:
        return {name: self.cleaned_data[name] for name in ("q", "code", "recipient")}

    def filter(self, shares: QuerySet) -> QuerySet:
        text = self.cleaned_data["q"].strip()
        if text:
            by_name = Q()
            for word in name_search_key(text).split():
                by_name &= Q(patient_name_search__contains=word)
            shares = shares.filter(by_name | Q(patient_mrn__iexact=text))
        code = self.cleaned_data["code"]
        if len(code) == CODE_LENGTH:
            shares = shares.filter(code_hash=code_hash(code))
        elif code:
            shares = shares.filter(code_last3__endswith=code)
        recipient = self.cleaned_data["recipient"].strip()
        if recipient:
            digits = fax_digits(recipient)
            match = (Q(recipient_attn__icontains=recipient)
                     | Q(recipient_institution__icontains=recipient))
            if digits.isdigit():
                match |= Q(recipient_fax__contains=digits)
            shares = shares.filter(match)
        return shares

    @property
    def is_searching(self) -> bool:
        return self.is_bound and self.is_valid() and any(self.cleaned_data.values())


class ShareCreateForm(forms.Form):
    """Which exams, to whom, and how the Access Page gets there. Exams come from the
    archive (``studies``, for one patient) or from a PACS search (``pick``)."""

    method = forms.ChoiceField(
        label=_("How will the Access Page reach the recipient?"),
        choices=Share.Method.choices, initial=Share.Method.FAX, widget=forms.RadioSelect,
    )
    attn = forms.CharField(label=_("Attention"), max_length=120, required=False,
                           help_text=_("A person or department, e.g. Film Library."))
    institution = forms.CharField(label=_("Recipient facility"), max_length=200,
                                  required=False)
    fax_number = forms.CharField(
        label=_("Fax number"), max_length=30, required=False,
        help_text=_("Needed to fax. Digits only are used: +1 (416) 555-0101 is fine."),
        widget=forms.TextInput(attrs={"inputmode": "tel", "autocomplete": "off"}),
    )
    subject = forms.CharField(label=_("Subject"), max_length=120, required=False,
                              help_text=_("Printed in the fax header, e.g. Chart transfer "
                                          "request."))
    note = forms.CharField(
        label=_("Note to the recipient"), max_length=300, required=False,
        widget=forms.Textarea(attrs={"rows": 3, "maxlength": 300}),
        help_text=_("Printed on the Access Page; up to 300 characters."),
    )

    def __init__(self, *args, studies: QuerySet | None = None,
                 picks: list[Pick] | None = None, facility=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.facility = facility
        self.picks = picks or []
        if studies is not None:
            self.fields["studies"] = forms.ModelMultipleChoiceField(
                label=_("Exams"), queryset=studies, required=False,
                widget=forms.CheckboxSelectMultiple,
            )
        if self.picks:
            self.fields["pick"] = forms.MultipleChoiceField(
                label=_("Exams"), required=False, widget=forms.CheckboxSelectMultiple,
                choices=[(p.token, p.study.study_instance_uid) for p in self.picks],
            )

    def clean_fax_number(self) -> str:
        return fax_digits(self.cleaned_data["fax_number"])

    def clean(self):
        data = super().clean()
        chosen = list(data.get("studies") or []) + list(data.get("pick") or [])
        if not chosen:
            self.add_error(None, _("Tick at least one exam to share."))
        if data.get("method") == Share.Method.FAX:
            if not FAX_DIGITS.match(data.get("fax_number") or ""):
                self.add_error("fax_number", _("Enter the fax number (7 to 15 digits)."))
            if not (data.get("attn") or data.get("institution")):
                self.add_error("institution", _("Say who the fax is for."))
        return data

    def recipient(self) -> Recipient:
        data = self.cleaned_data
        return Recipient(method=data["method"], attn=data["attn"],
                         institution=data["institution"], fax_number=data["fax_number"],
                         subject=data["subject"], note=data["note"])

    def chosen_picks(self) -> list[Pick]:
        tokens = set(self.cleaned_data.get("pick") or [])
        return [p for p in self.picks if p.token in tokens]


def picks_from(tokens: list[str], *, facility) -> tuple[list[Pick], bool]:
    """Decode the posted picks; the flag says some were forged, stale or of another
    patient and were left out."""
    picks, dropped = [], False
    for token in dict.fromkeys(tokens):
        try:
            pick = pick_decode(token, facility=facility)
        except PickError:
            dropped = True
            continue
        if picks and not picks[0].same_patient(pick):
            dropped = True
            continue
        picks.append(pick)
    return picks, dropped
