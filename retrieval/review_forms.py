"""Forms of the received-records pages: reconcile a study, import a request, and answer
or decline an incoming request from the platform."""

from django import forms
from django.utils.translation import gettext_lazy as _

from dicomgw.models import PacsNode, Study

from .forms import _person_name_part
from .fulfil import DECLINE_REASON_MAX
from .imports import ACCESSION_MAX, PATIENT_ID_MAX


def _dicom_text(value: str) -> str:
    value = " ".join(value.split())
    if "\\" in value:
        # A backslash separates the values of an element (PS3.5 6.4).
        raise forms.ValidationError(_("A backslash (\\) cannot be used."))
    return value


class ReconcileForm(forms.Form):
    """The patient as the facility's own record has them, for the copies sent to the
    PACS. ``identity()`` gives the values in DICOM form."""

    local_patient_id = forms.CharField(
        label=_("MRN in your facility"), max_length=PATIENT_ID_MAX,
        widget=forms.TextInput(attrs={"autocomplete": "off", "spellcheck": "false"}))
    family_name = forms.CharField(
        label=_("Family name"), max_length=64,
        widget=forms.TextInput(attrs={"autocomplete": "off"}))
    given_name = forms.CharField(
        label=_("Given names"), max_length=64, required=False,
        widget=forms.TextInput(attrs={"autocomplete": "off"}))
    local_accession_number = forms.CharField(
        label=_("Accession number in your facility"), max_length=ACCESSION_MAX,
        required=False,
        help_text=_("Leave empty to keep the accession number the study came with."),
        widget=forms.TextInput(attrs={"autocomplete": "off", "spellcheck": "false"}))

    def clean_local_patient_id(self) -> str:
        return _dicom_text(self.cleaned_data["local_patient_id"])

    def clean_local_accession_number(self) -> str:
        return _dicom_text(self.cleaned_data["local_accession_number"])

    def clean_family_name(self) -> str:
        return _person_name_part(self.cleaned_data["family_name"])

    def clean_given_name(self) -> str:
        return _person_name_part(self.cleaned_data["given_name"])

    def identity(self) -> dict:
        data = self.cleaned_data
        return {
            "local_patient_id": data["local_patient_id"],
            "local_patient_name": "^".join([data["family_name"],
                                            data["given_name"]]).rstrip("^"),
            "local_accession_number": data["local_accession_number"],
        }

    @staticmethod
    def initial_from(values: dict) -> dict:
        """The form's fields from ``imports.reconcile_initial`` (PN split in two)."""
        parts = (values["local_patient_name"].split("=")[0].split("^") + ["", ""])[:3]
        return {"local_patient_id": values["local_patient_id"], "family_name": parts[0],
                "given_name": " ".join(p for p in parts[1:] if p),
                "local_accession_number": values["local_accession_number"]}


class ImportForm(forms.Form):
    node = forms.ModelChoiceField(label=_("Import into"), queryset=PacsNode.objects.none(),
                                  empty_label=None)

    def __init__(self, *args, facility, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["node"].queryset = PacsNode.objects.filter(facility=facility,
                                                               is_active=True)


class AnswerForm(forms.Form):
    """The exams ticked to answer an incoming request: archived studies of the
    facility (``studies``) and studies of the last PACS search (``study_uids``)."""

    studies = forms.ModelMultipleChoiceField(queryset=Study.objects.none(), required=False)
    study_uids = forms.MultipleChoiceField(
        choices=(), required=False,
        error_messages={"invalid_choice": _("Search the PACS again: that study is no longer "
                                            "among the results.")})

    def __init__(self, *args, facility, offered_uids: list[str], **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["studies"].queryset = Study.objects.filter(facility=facility)
        self.fields["study_uids"].choices = [(uid, uid) for uid in offered_uids]

    def clean(self):
        data = super().clean()
        if not self.errors and not data.get("studies") and not data.get("study_uids"):
            raise forms.ValidationError(_("Tick at least one exam to send."))
        return data


class DeclineForm(forms.Form):
    reason = forms.CharField(
        label=_("Why do you decline?"), max_length=DECLINE_REASON_MAX,
        widget=forms.Textarea(attrs={"rows": 2,
                                     "placeholder": _("e.g. No records for this patient")}))
