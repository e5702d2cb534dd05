"""Load demo imaging into a facility's archive: a CT, MRs and chest radiographs of
fictional patients, generated on the spot, and optionally the public DICOM test corpus.
Safe to repeat: what is already archived comes back as a duplicate, never twice."""

import zoneinfo
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from dicomgw.demo import (
    DEFAULT_CT_SLICES,
    DEFAULT_SEED,
    LoadReport,
    demo_studies_load,
    testdata_load,
)
from pockethealth.models import Facility


def _megabytes(size: int) -> str:
    return f"{size / 1_000_000:.1f} MB"


def _counts(report: LoadReport) -> str:
    """Outcome counts in words. Counts only: never a name or an identifier."""
    parts = [f"{report.outcomes['stored']} stored",
             f"{report.outcomes['duplicate']} already archived"]
    if report.outcomes["conflict"]:
        parts.append(f"{report.outcomes['conflict']} kept aside (differ from the archived copy)")
    if report.outcomes["rejected"]:
        parts.append(f"{report.outcomes['rejected']} rejected")
    if report.skipped_not_dicom:
        parts.append(f"{report.skipped_not_dicom} skipped (not DICOM)")
    return ", ".join(parts)


class Command(BaseCommand):
    help = ("Generate demo studies of fictional patients (CT, MR, CR) and ingest them into "
            "a facility's archive; with --testdata, load the public DICOM test corpus too.")

    def add_arguments(self, parser):
        parser.add_argument(
            "--facility", metavar="SHORT_NAME",
            help="Facility to load into; may be left out when there is only one.")
        parser.add_argument(
            "--testdata", nargs="?", const=str(settings.TESTDATA_DICOM_DIR), metavar="DIR",
            help="Also load every DICOM file under DIR (default: %(const)s).")
        parser.add_argument(
            "--ct-slices", type=int, default=DEFAULT_CT_SLICES, metavar="N",
            help="Slices in the demo CT (default: %(default)s).")
        parser.add_argument(
            "--seed", type=int, default=DEFAULT_SEED, metavar="N",
            help="Seed for pixels and UIDs; the same seed loads the same studies, so a "
                 "re-run adds nothing (default: %(default)s).")

    def handle(self, *args, facility=None, testdata=None, ct_slices=DEFAULT_CT_SLICES,
               seed=DEFAULT_SEED, **options):
        if ct_slices < 2:
            raise CommandError("--ct-slices must be at least 2.")
        if seed < 0:
            raise CommandError("--seed must not be negative.")
        target = self._facility(facility)
        testdata_dir = Path(testdata) if testdata else None
        if testdata_dir is not None and not testdata_dir.is_dir():
            raise CommandError(f"Test data folder not found: {testdata_dir}")

        # Study dates count back from the facility's today, not the server's.
        today = timezone.localdate(timezone=zoneinfo.ZoneInfo(target.time_zone))
        report = demo_studies_load(facility=target, seed=seed, ct_slices=ct_slices, today=today)
        self.stdout.write(
            f"Demo studies for {target.short_name}: {report.patients} patients, "
            f"{report.studies} studies, {report.files} images, {_megabytes(report.bytes)} "
            f"in {report.seconds:.1f} s ({_counts(report)})."
        )
        if report.problems:
            # Demo files are ours: any refusal is a bug, so say which file and why.
            listed = "\n  ".join(report.problems[:5])
            raise CommandError(f"{len(report.problems)} demo files were not archived:\n  {listed}")

        if testdata_dir is not None:
            self._load_testdata(target, testdata_dir, verbosity=options.get("verbosity", 1))

    def _facility(self, short_name: str | None) -> Facility:
        if short_name:
            try:
                return Facility.objects.get(short_name=short_name)
            except Facility.DoesNotExist:
                raise CommandError(f"No facility with the short name {short_name!r}.") from None
        facilities = list(Facility.objects.order_by("short_name")[:11])
        if len(facilities) == 1:
            return facilities[0]
        if not facilities:
            raise CommandError("There is no facility yet; create one first "
                               "(manage.py demo_setup creates a demo facility).")
        names = ", ".join(f.short_name for f in facilities[:10])
        more = ", …" if len(facilities) > 10 else ""
        raise CommandError(f"There are several facilities; choose one with --facility "
                           f"SHORT_NAME ({names}{more}).")

    def _load_testdata(self, facility: Facility, directory: Path, *, verbosity: int) -> None:
        reports = testdata_load(facility=facility, directory=directory)
        self.stdout.write(f"Test corpus {directory}:")
        for folder, report in sorted(reports.items()):
            self.stdout.write(f"  {folder}: {_counts(report)}")
            # Reasons and relative file names only (the corpus holds a real patient's
            # disc, and its names stay out of terminals and logs).
            if verbosity > 1:
                for problem in report.problems:
                    self.stdout.write(f"    {problem}")
        total = LoadReport()
        for report in reports.values():
            total.files += report.files
            total.bytes += report.bytes
            total.seconds += report.seconds
            total.outcomes.update(report.outcomes)
            total.skipped_not_dicom += report.skipped_not_dicom
        self.stdout.write(f"  total: {total.files} DICOM files, {_megabytes(total.bytes)} in "
                          f"{total.seconds:.1f} s ({_counts(total)}).")
