"""Studies ticked on a PACS search page, carried to the new-share page.

The PACS search page keeps its last results in the session; its form posts the ticked
``study_uids`` to the new-share page, which takes each study's description and its
patient from those results (``picks_from_search``), not from the form.

From there each ticked study travels as one signed value (Django's signing, keyed with
SECRET_KEY) in a checkbox named ``pick``: what the PACS said of the study and its
patient, so the share can be made, and its Access Page printed, before a single image
has arrived. The signature means the form cannot be fed a made-up date of birth or
another facility's PACS, and a second search in another tab changes nothing. Any page
may post ``pick`` values made with ``{{ hit|share_pick:node }}`` too. Values travel in
POST bodies only, never in a URL."""

import datetime
from dataclasses import dataclass

from django.core import signing

from dicomgw.models import PacsNode
from dicomgw.retrieve import StudyHit
from pockethealth.models import Facility

from .services import PacsStudy, PatientIdentity

SALT = "sharing.pacs-pick"
# A search result older than this is searched again rather than trusted.
MAX_AGE_SECONDS = 12 * 3600


class PickError(Exception):
    """A pick that is forged, stale or of another facility."""


@dataclass(frozen=True)
class Pick:
    token: str
    patient: PatientIdentity
    study: PacsStudy

    def same_patient(self, other: "Pick") -> bool:
        return self.patient == other.patient


def _iso(value: datetime.date | None) -> str:
    return value.isoformat() if value else ""


def _date(text: str) -> datetime.date | None:
    return datetime.date.fromisoformat(text) if text else None


def pick_encode(hit, node: PacsNode) -> str:
    """The value of a PACS search hit's checkbox (``hit`` is a ``dicomgw.retrieve.StudyHit``)."""
    payload = {
        "f": node.facility_id, "n": node.pk, "u": hit.study_instance_uid,
        "d": _iso(hit.study_date), "t": hit.description, "m": list(hit.modalities),
        "i": hit.num_instances, "pn": hit.patient_name, "pid": hit.patient_id,
        "dob": _iso(hit.birth_date),
    }
    return signing.dumps(payload, salt=SALT, compress=True)


def pick_decode(token: str, *, facility: Facility) -> Pick:
    try:
        data = signing.loads(token, salt=SALT, max_age=MAX_AGE_SECONDS)
    except signing.SignatureExpired as exc:
        raise PickError("stale") from exc
    except signing.BadSignature as exc:
        raise PickError("forged") from exc
    if data.get("f") != facility.pk:
        raise PickError("other facility")
    node = PacsNode.objects.filter(pk=data["n"], facility=facility).first()
    if node is None:
        raise PickError("unknown node")
    patient = PatientIdentity(name=data["pn"], patient_id=data["pid"],
                              birth_date=_date(data["dob"]))
    study = PacsStudy(node=node, study_instance_uid=data["u"], description=data["t"],
                      study_date=_date(data["d"]), modalities=tuple(data["m"]),
                      num_instances=data["i"])
    return Pick(token=token, patient=patient, study=study)


def picks_from_search(session, study_uids: list[str], *, facility: Facility
                      ) -> tuple[list[str], bool]:
    """Pick values for the ticked ``study_uids`` of the PACS search results kept in the
    session; the flag says some ticked study is no longer among them."""
    from dicomgw.views import PACS_HITS_SESSION_KEY

    shown = session.get(PACS_HITS_SESSION_KEY) or {}
    node = PacsNode.objects.filter(pk=shown.get("node") or 0, facility=facility).first()
    hits = {hit["study_instance_uid"]: hit for hit in shown.get("hits") or []}
    tokens = []
    for uid in dict.fromkeys(study_uids):
        if node is not None and uid in hits:
            tokens.append(pick_encode(StudyHit.from_session(hits[uid]), node))
    return tokens, len(tokens) < len(set(study_uids))
