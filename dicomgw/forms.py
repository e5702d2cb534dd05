from django import forms
from django.db.models import Q, QuerySet
from django.utils.translation import gettext_lazy as _

from .models import PacsNode
from .retrieve import SearchCriteria
from .services import name_search_key


class PatientSearchForm(forms.Form):
    q = forms.CharField(
        label=_("Name or MRN"), required=False, max_length=100,
        widget=forms.TextInput(attrs={
            "type": "search", "placeholder": _("e.g. Smith, Jane or 12345"),
            "autocomplete": "off",
        }),
    )
    birth_date = forms.DateField(
        label=_("Date of birth"), required=False,
        widget=forms.DateInput(attrs={"type": "date"}),
    )

    def serialised(self) -> dict:
        birth_date = self.cleaned_data["birth_date"]
        return {"q": self.cleaned_data["q"],
                "birth_date": birth_date.isoformat() if birth_date else ""}

    def filter(self, patients: QuerySet) -> QuerySet:
        """Every word of the query in the name (any name group), or the exact MRN."""
        text = self.cleaned_data["q"].strip()
        if text:
            by_name = Q()
            for word in name_search_key(text).split():
                by_name &= Q(name_search__contains=word)
            patients = patients.filter(by_name | Q(patient_id__iexact=text))
        if self.cleaned_data["birth_date"]:
            patients = patients.filter(birth_date=self.cleaned_data["birth_date"])
        return patients


# --- The PACS link -----------------------------------------------------------------

# Modalities a clerk looks for most (PS3.3 C.7.3.1.1.1 defined terms).
MODALITY_CHOICES = [
    ("", _("Any modality")),
    ("CT", "CT"), ("MR", "MR"), ("CR", "CR"), ("DX", "DX"), ("US", "US"), ("MG", "MG"),
    ("NM", "NM"), ("PT", "PT"), ("XA", "XA"), ("RF", "RF"), ("OT", "OT"), ("SR", "SR"),
]


class PacsSearchForm(forms.Form):
    """A search of one PACS of the clerk's facility. ``criteria()`` gives the domain
    object; ``serialised()`` what the session keeps (never the URL)."""

    node = forms.ModelChoiceField(label=_("PACS"), queryset=PacsNode.objects.none(),
                                  empty_label=None)
    patient_name = forms.CharField(
        label=_("Patient name"), required=False, max_length=64,
        help_text=_("Family name first. * and ? are wildcards."),
        widget=forms.TextInput(attrs={"type": "search", "autocomplete": "off",
                                      "placeholder": _("e.g. Tremblay, Marie")}),
    )
    patient_id = forms.CharField(
        label=_("MRN"), required=False, max_length=64,
        widget=forms.TextInput(attrs={"autocomplete": "off", "spellcheck": "false"}),
    )
    birth_date = forms.DateField(label=_("Date of birth"), required=False,
                                 widget=forms.DateInput(attrs={"type": "date"}))
    accession_number = forms.CharField(
        label=_("Accession"), required=False, max_length=16,
        widget=forms.TextInput(attrs={"autocomplete": "off", "spellcheck": "false"}),
    )
    date_from = forms.DateField(label=_("Study date from"), required=False,
                                widget=forms.DateInput(attrs={"type": "date"}))
    date_to = forms.DateField(label=_("Study date to"), required=False,
                              widget=forms.DateInput(attrs={"type": "date"}))
    modality = forms.ChoiceField(label=_("Modality"), required=False, choices=MODALITY_CHOICES)

    def __init__(self, *args, facility, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["node"].queryset = PacsNode.objects.filter(facility=facility,
                                                               is_active=True)

    def _clean_key(self, name: str) -> str:
        # A backslash separates values in DICOM (PS3.5 6.4); it cannot be searched for.
        value = " ".join(self.cleaned_data[name].split())
        if "\\" in value:
            raise forms.ValidationError(_("A backslash (\\) cannot be searched for."))
        return value

    def clean_patient_name(self) -> str:
        return self._clean_key("patient_name")

    def clean_patient_id(self) -> str:
        return self._clean_key("patient_id")

    def clean_accession_number(self) -> str:
        return self._clean_key("accession_number")

    def clean(self):
        data = super().clean()
        start, end = data.get("date_from"), data.get("date_to")
        if start and end and start > end:
            self.add_error("date_to", _("The end of the range is before its start."))
        keys = ("patient_name", "patient_id", "birth_date", "accession_number", "date_from",
                "date_to")
        if not any(data.get(key) for key in keys) and not self.errors:
            # With nothing to match, a PACS lists every study it holds.
            raise forms.ValidationError(
                _("Enter a name, MRN, date of birth, accession or study dates."))
        return data

    def criteria(self) -> SearchCriteria:
        data = self.cleaned_data
        return SearchCriteria(
            patient_name=data["patient_name"], patient_id=data["patient_id"],
            birth_date=data["birth_date"], accession_number=data["accession_number"],
            date_from=data["date_from"], date_to=data["date_to"], modality=data["modality"],
        )

    def serialised(self) -> dict:
        data = self.cleaned_data
        return {
            "node": data["node"].pk,
            **{key: data[key] for key in ("patient_name", "patient_id", "accession_number",
                                          "modality")},
            **{key: data[key].isoformat() if data[key] else ""
               for key in ("birth_date", "date_from", "date_to")},
        }


class RetrieveForm(forms.Form):
    """The studies ticked among those the last search showed (no other may be asked
    for this way)."""

    study_uids = forms.MultipleChoiceField(
        label=_("Studies"), choices=(),
        error_messages={"required": _("Tick at least one study to retrieve."),
                        "invalid_choice": _("Search again: that study is no longer among "
                                            "the results.")},
    )

    def __init__(self, *args, offered: list[str], **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["study_uids"].choices = [(uid, uid) for uid in offered]


class PushForm(forms.Form):
    node = forms.ModelChoiceField(label=_("Send to"), queryset=PacsNode.objects.none(),
                                  empty_label=None)

    def __init__(self, *args, facility, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["node"].queryset = PacsNode.objects.filter(facility=facility,
                                                               is_active=True)


class NodeForm(forms.Form):
    node = forms.ModelChoiceField(queryset=PacsNode.objects.none())

    def __init__(self, *args, facility, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["node"].queryset = PacsNode.objects.filter(facility=facility,
                                                               is_active=True)
