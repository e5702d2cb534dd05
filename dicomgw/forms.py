from django import forms
from django.db.models import Q, QuerySet
from django.utils.translation import gettext_lazy as _

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
