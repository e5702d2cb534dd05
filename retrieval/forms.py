import base64
import binascii
import datetime

from django import forms
from django.db.models import Q, QuerySet
from django.utils import timezone
from django.utils.text import format_lazy
from django.utils.translation import gettext_lazy as _

from dicomgw.models import PacsNode, Patient, Study
from dicomgw.services import name_search_key
from pockethealth.models import Facility
from sharing.services import FAX_DIGITS, fax_digits

from .fulfil import DECLINE_REASON_MAX
from .imports import ACCESSION_MAX, PATIENT_ID_MAX
from .models import PatientConsent, RecordRequest
from .services import DETAILS_MAX, SIGNATURE_MAX_BYTES, OutsideFacility, RequestPatient

# Characters with a meaning in a DICOM person name (PS3.5 6.2): component and group
# separators, and the escape of character sets.
PN_DELIMITERS = set("^=\\")
STATUS_CHOICES = [("", _("Any status")), ("open", _("Open")), *RecordRequest.Status.choices]


class RequestSearchForm(forms.Form):
    """Find a facility's requests. POSTed and kept in the session: no name in a URL."""

    q = forms.CharField(
        label=_("Patient"), required=False, max_length=100,
        widget=forms.TextInput(attrs={"type": "search", "autocomplete": "off",
                                      "placeholder": _("Name or MRN")}),
    )
    target = forms.CharField(
        label=_("Facility asked"), required=False, max_length=100,
        widget=forms.TextInput(attrs={"type": "search", "autocomplete": "off",
                                      "placeholder": _("Name or fax")}),
    )
    status = forms.ChoiceField(label=_("Status"), required=False, choices=STATUS_CHOICES)

    def serialised(self) -> dict:
        return {name: self.cleaned_data[name] for name in ("q", "target", "status")}

    def filter(self, requests: QuerySet) -> QuerySet:
        text = self.cleaned_data["q"].strip()
        if text:
            by_name = Q()
            for word in name_search_key(text).split():
                by_name &= Q(patient_name_search__contains=word)
            requests = requests.filter(by_name | Q(patient_mrn__iexact=text))
        target = self.cleaned_data["target"].strip()
        if target:
            match = Q(target_name__icontains=target) | Q(target_attn__icontains=target)
            digits = fax_digits(target)
            if digits.isdigit():
                match |= Q(target_fax__contains=digits)
            requests = requests.filter(match)
        status = self.cleaned_data["status"]
        if status == "open":
            requests = requests.filter(status__in=RecordRequest.OPEN_STATUSES)
        elif status:
            requests = requests.filter(status=status)
        return requests

    @property
    def is_searching(self) -> bool:
        return self.is_bound and self.is_valid() and any(self.cleaned_data.values())


def _person_name_part(value: str) -> str:
    value = " ".join(value.split())
    if PN_DELIMITERS & set(value):
        raise forms.ValidationError(_("Leave out the characters ^ = and \\."))
    return value


class RequestCreateForm(forms.Form):
    """Who is asked, for which patient, for what, and how the page gets there."""

    CONSENT_NONE = "none"
    CONSENT_TABLET = "tablet"
    CONSENT_LINK = "link"

    target_facility = forms.ModelChoiceField(
        label=_("Facility on this platform"), queryset=Facility.objects.none(),
        required=False, empty_label=_("Not on this platform"),
        help_text=_("If the facility also uses this service, its clerks answer from their "
                    "own PACS, without upload or PIN."),
    )
    target_name = forms.CharField(label=_("Facility name"), max_length=200, required=False,
                                  help_text=_("Hospital or clinic that holds the records."))
    target_attn = forms.CharField(label=_("Attention"), max_length=120, required=False,
                                  help_text=_("A person or department, e.g. Film Library."))
    target_fax = forms.CharField(
        label=_("Fax number"), max_length=30, required=False,
        help_text=_("Needed to fax. +1 (314) 555-0142 is fine."),
        widget=forms.TextInput(attrs={"inputmode": "tel", "autocomplete": "off"}),
    )
    target_phone = forms.CharField(
        label=_("Phone"), max_length=30, required=False,
        widget=forms.TextInput(attrs={"inputmode": "tel", "autocomplete": "off"}))
    target_email = forms.EmailField(label=_("E-mail"), required=False,
                                    widget=forms.EmailInput(attrs={"autocomplete": "off"}))

    family_name = forms.CharField(label=_("Family name"), max_length=150,
                                  widget=forms.TextInput(attrs={"autocomplete": "off"}))
    given_name = forms.CharField(label=_("Given names"), max_length=150, required=False,
                                 widget=forms.TextInput(attrs={"autocomplete": "off"}))
    birth_date = forms.DateField(label=_("Date of birth"),
                                 widget=forms.DateInput(attrs={"type": "date"},
                                                        format="%Y-%m-%d"))
    mrn = forms.CharField(label=_("MRN (your facility)"), max_length=64, required=False,
                          widget=forms.TextInput(attrs={"autocomplete": "off"}))
    details = forms.CharField(
        label=_("Request details"), max_length=DETAILS_MAX,
        widget=forms.Textarea(attrs={"rows": 4, "maxlength": DETAILS_MAX}),
        help_text=format_lazy(_("What is needed, e.g. CT abdomen and pelvis, 2021 to 2023. "
                                "Up to {max} characters; printed on the Request Page."),
                              max=DETAILS_MAX),
    )
    method = forms.ChoiceField(
        label=_("How will the Request Page reach the facility?"),
        choices=RecordRequest.Method.choices, widget=forms.RadioSelect,
    )
    consent = forms.ChoiceField(
        label=_("Patient's signed authorization"), widget=forms.RadioSelect,
        initial=CONSENT_NONE,
        choices=[
            (CONSENT_NONE, _("Not needed")),
            (CONSENT_TABLET, _("The patient signs now, on this screen or a tablet")),
            (CONSENT_LINK, _("Send the patient a signing link")),
        ],
    )
    patient_email = forms.EmailField(
        label=_("Patient's e-mail"), required=False,
        help_text=_("Where to send the signing link. Leave empty to copy the link and pass "
                    "it on yourself."),
        widget=forms.EmailInput(attrs={"autocomplete": "off"}),
    )

    def __init__(self, *args, facility: Facility, patient: Patient | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.facility = facility
        self.patient = patient
        self.fields["target_facility"].queryset = Facility.objects.exclude(pk=facility.pk)
        self.fields["birth_date"].widget.attrs["max"] = timezone.localdate().isoformat()

    def clean_family_name(self) -> str:
        return _person_name_part(self.cleaned_data["family_name"])

    def clean_given_name(self) -> str:
        return _person_name_part(self.cleaned_data["given_name"])

    def clean_birth_date(self) -> datetime.date:
        value = self.cleaned_data["birth_date"]
        if value > timezone.localdate() or value.year < 1850:
            raise forms.ValidationError(_("Enter the patient's real date of birth."))
        return value

    def clean_target_fax(self) -> str:
        digits = fax_digits(self.cleaned_data["target_fax"])
        if digits and not FAX_DIGITS.match(digits):
            raise forms.ValidationError(_("Enter the fax number (7 to 15 digits)."))
        return digits

    def clean(self):
        data = super().clean()
        on_platform = data.get("target_facility")
        if on_platform and not data.get("target_name"):
            data["target_name"] = on_platform.name
        if not data.get("target_name") and "target_name" not in self.errors:
            self.add_error("target_name", _("Name the facility you are asking."))
        if data.get("method") == RecordRequest.Method.FAX and not data.get("target_fax"):
            if "target_fax" not in self.errors:
                self.add_error("target_fax", _("Enter the fax number to fax the request."))
        if data.get("patient_email") and data.get("consent") != self.CONSENT_LINK:
            self.add_error("patient_email", _("The e-mail is used only to send a signing "
                                              "link; choose that option or clear it."))
        return data

    def target(self) -> OutsideFacility:
        data = self.cleaned_data
        return OutsideFacility(name=data["target_name"], attn=data["target_attn"],
                               fax=data["target_fax"], phone=data["target_phone"],
                               email=data["target_email"], facility=data["target_facility"])

    def request_patient(self) -> RequestPatient:
        data = self.cleaned_data
        name = "^".join([data["family_name"], data["given_name"]]).rstrip("^")
        return RequestPatient(name=name, birth_date=data["birth_date"], mrn=data["mrn"],
                              patient=self.patient)

    @staticmethod
    def initial_for(patient: Patient) -> dict:
        """The form filled from an archive patient (the first name group of the PN)."""
        parts = (patient.name.split("=")[0].split("^") + ["", ""])[:3]
        return {"family_name": parts[0], "given_name": " ".join(p for p in parts[1:] if p),
                "birth_date": patient.birth_date, "mrn": patient.patient_id}


class SignatureForm(forms.Form):
    """The patient's signature: the typed name, and the drawn signature as a PNG data
    URL from the signing pad, or the typed name adopted as the signature."""

    typed_name = forms.CharField(
        label=_("Your full name"), max_length=200,
        widget=forms.TextInput(attrs={"autocomplete": "name", "autocapitalize": "words"}),
    )
    signature = forms.CharField(required=False, widget=forms.HiddenInput,
                                max_length=SIGNATURE_MAX_BYTES * 4 // 3 + 100)
    adopt_typed = forms.BooleanField(
        label=_("I cannot draw a signature here: my typed name above is my signature."),
        required=False,
    )
    agree = forms.BooleanField(
        label=_("I have read the authorization above and I agree to it."),
        error_messages={"required": _("Tick the box to agree to the authorization.")},
    )

    def clean(self):
        data = super().clean()
        if data.get("adopt_typed"):
            data["signature_png"] = None
            return data
        raw = data.get("signature") or ""
        prefix = "data:image/png;base64,"
        if not raw.startswith(prefix):
            self.add_error(None, _("Draw your signature in the box, or tick the box to use "
                                   "your typed name as your signature."))
            return data
        try:
            data["signature_png"] = base64.b64decode(raw[len(prefix):], validate=True)
        except (binascii.Error, ValueError):
            self.add_error(None, _("The signature could not be read. Clear it and sign "
                                   "again."))
        return data

    @property
    def signature_kind(self) -> str:
        if self.cleaned_data.get("adopt_typed"):
            return PatientConsent.SignatureKind.TYPED
        return PatientConsent.SignatureKind.DRAWN


class ConsentLinkForm(forms.Form):
    email = forms.EmailField(
        label=_("Patient's e-mail"), required=False,
        help_text=_("Leave empty to copy the link and pass it on yourself."),
        widget=forms.EmailInput(attrs={"autocomplete": "off"}),
    )


class FaxForm(forms.Form):
    fax_number = forms.CharField(
        label=_("Fax number"), max_length=30, required=False,
        widget=forms.TextInput(attrs={"inputmode": "tel", "autocomplete": "off"}),
    )


# --- Received records: reconcile, import, answer or decline ---------------------------


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
