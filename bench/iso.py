"""ISO benchmark: the same generated ~1 GB CT as bench/zip.py (2,000 slices), ingested into
a throwaway archive and made into a disc image by our task body (``iso_build``: plan,
DICOMDIR, README.TXT, INDEX.HTM, the images copied from the archive into an ISO 9660 +
Joliet image in storage), beside ``xorriso -as mkisofs`` and ``genisoimage`` making an
ISO 9660 + Joliet image of the same tree, in the same run.

The peers get the disc's tree as files: our DICOMDIR, README.TXT and INDEX.HTM and hard
links to the archived images as IMAGES/DICOMS/IMn, so every contender reads the same
bytes from the same warm page cache. Throughput is the payload (the files' bytes) over
the wall time, so the ratio is a ratio of times. Dirty pages are written back (sync)
before each run, and the rounds rotate which contender goes first. Ours runs in a child
process that reports its peak RSS, and its RSS before the build (the Django process it
shares with the rest of the worker); the peers' peak RSS comes from GNU time.

    .venv/bin/python bench/iso.py [--rounds 3] [--slices 2000] [--postgres URL] [--keep]

The last line printed is one JSON object with the medians."""

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
BASE_DIR = BENCH_DIR.parent
if str(BASE_DIR) not in sys.path:
    sys.path.insert(0, str(BASE_DIR))


def _zip_bench():
    """bench/zip.py's helpers (setup, generation, process memory)."""
    spec = importlib.util.spec_from_file_location("bench_zip", BENCH_DIR / "zip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


common = _zip_bench()
MB = common.MB
GNU_TIME = "/usr/bin/time"


def child_build(job_id: int) -> None:
    """Run in a fresh process: build the job's image, print seconds and memory."""
    import django

    django.setup()
    from dicomgw.media import iso_build
    from dicomgw.models import MediaJob

    pid = os.getpid()
    rss_before = common.vm_rss_mb(pid)
    start_up_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    common.reset_peak(pid)
    started = time.perf_counter()
    iso_build(job_id=job_id)
    seconds = time.perf_counter() - started
    job = MediaJob.objects.get(pk=job_id)
    if job.status != MediaJob.Status.READY:
        raise SystemExit(f"the build failed: {job.error}")
    print(json.dumps({"seconds": seconds, "rss_before_mb": rss_before,
                      "start_up_peak_mb": start_up_peak, "peak_rss_mb": common.vm_hwm_mb(pid),
                      "size": job.size, "path": job.file.path}))


def run_ours(env: dict, study_id: int, round_number: int) -> dict:
    from datetime import timedelta

    from django.utils import timezone

    from dicomgw.media import iso_job_start
    from dicomgw.models import Study

    job = iso_job_start(studies=Study.objects.filter(pk=study_id), patient_last_name="Bench",
                        include_viewer=False, owner_ref=f"bench:{round_number}",
                        expires_at=timezone.now() + timedelta(hours=2))
    os.sync()
    result = subprocess.run([sys.executable, __file__, "--child", str(job.pk)], env=env,
                            capture_output=True, text=True, cwd=BASE_DIR, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"our build failed: {result.stderr[-1500:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_peer(argv: list[str], output: Path) -> tuple[float, float | None]:
    """(seconds, peak RSS in MB or None) of one peer run. The peak comes from GNU time
    when it is installed: a child forked from this (large) Python process would report
    the parent's pages as its own peak."""
    output.unlink(missing_ok=True)
    rss_file = output.with_suffix(".rss")
    prefix = [GNU_TIME, "-f", "%M", "-o", str(rss_file)] if Path(GNU_TIME).exists() else []
    os.sync()
    started = time.perf_counter()
    result = subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - started
    if result.returncode != 0 or not output.exists():
        raise RuntimeError(f"{argv[0]} failed: {result.stderr[-1500:]}")
    output.unlink()
    if not prefix:
        return seconds, None
    return seconds, int(rss_file.read_text().split()[-1]) / 1024


def disc_tree(study_id: int, root: Path) -> int:
    """The disc's tree for the peers; returns the payload in bytes."""
    from dicomgw.media import media_files, media_plan
    from dicomgw.models import Study, archive_storage

    plan = media_plan(studies=Study.objects.filter(pk=study_id))
    files = media_files(plan=plan, include_viewer=False, viewer_dir=None, disc=True)
    for media_file in files:
        target = root / media_file.path
        target.parent.mkdir(parents=True, exist_ok=True)
        if media_file.data is not None:
            target.write_bytes(media_file.data)
        elif media_file.chunks is not None:  # the DICOMDIR, encoded as it is written
            with open(target, "wb") as fh:
                for chunk in media_file.chunks():
                    fh.write(chunk)
        else:
            os.link(archive_storage().path(media_file.storage_name), target)
    return sum(f.size for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slices", type=int, default=2000)
    parser.add_argument("--postgres", metavar="URL", default=os.environ.get("BENCH_POSTGRES"),
                        help="PostgreSQL server (postgres://user@host:port/) to create the "
                             "run's database on; SQLite otherwise")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_build(args.child)
        return
    for tool in ("xorriso", "genisoimage"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is required (apt-get install xorriso genisoimage)")

    def say(text: str) -> None:
        print(text, flush=True)

    say(f"load average: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    work = Path(tempfile.mkdtemp(prefix="bench-iso-"))
    database_url = database_name = None
    if args.postgres:
        database_url, database_name = common.create_postgres_database(args.postgres)
    try:
        env = common.setup_django(work, database_url=database_url)
        study = common.generate_and_ingest(work, slices=args.slices, say=say)
        tree = work / "tree"
        payload = disc_tree(study.study_id, tree)
        common.warm(study.files)
        peers = {
            "xorriso -as mkisofs": ["xorriso", "-as", "mkisofs", "-quiet", "-J", "-V",
                                    "DICOM_IMAGES", "-o", str(work / "xorriso.iso"), str(tree)],
            "genisoimage": ["genisoimage", "-quiet", "-J", "-V", "DICOM_IMAGES", "-o",
                            str(work / "genisoimage.iso"), str(tree)],
        }
        times: dict[str, list[float]] = {"ours": [], **{name: [] for name in peers}}
        rss: dict[str, float] = {}
        ours_before = []
        order = ["ours", *peers]
        for round_number in range(args.rounds):
            say(f"Round {round_number + 1}/{args.rounds}")
            shift = round_number % len(order)
            for contender in order[shift:] + order[:shift]:
                if contender == "ours":
                    result = run_ours(env, study.study_id, round_number)
                    times["ours"].append(result["seconds"])
                    rss["ours"] = max(rss.get("ours", 0), result["peak_rss_mb"])
                    ours_before.append(result["rss_before_mb"])
                    image = Path(result["path"])
                    if round_number == 0:
                        import pycdlib

                        iso = pycdlib.PyCdlib()
                        iso.open(str(image))
                        iso.close()
                    image.unlink()
                else:
                    argv = peers[contender]
                    seconds, peak = run_peer(argv, Path(argv[argv.index("-o") + 1]))
                    times[contender].append(seconds)
                    if peak is not None:
                        rss[contender] = max(rss.get(contender, 0), peak)
    finally:
        if database_name:
            common.drop_postgres_database(args.postgres, database_name)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    speed = {name: payload / MB / common.median(values) for name, values in times.items()}
    print()
    print(f"Disc payload: {len(study.files)} images + DICOMDIR, README.TXT, INDEX.HTM = "
          f"{payload / MB:.0f} MB (MB = 10^6 bytes)")
    print(f"{'contender':24} {'MB/s':>8} {'peak RSS MB':>12}  seconds per round")
    for name, values in times.items():
        peak = f"{rss[name]:12.0f}" if name in rss else f"{'n/a':>12}"
        print(f"{name:24} {speed[name]:8.0f} {peak}  "
              f"{', '.join(f'{v:.2f}' for v in values)}")
    xorriso = speed["xorriso -as mkisofs"]
    print(f"ours / xorriso: {speed['ours'] / xorriso:.2f}x; ours / genisoimage: "
          f"{speed['ours'] / speed['genisoimage']:.2f}x")
    print(f"our build process: {common.median(ours_before):.0f} MB resident before the build "
          f"(Django and every app), peak {rss['ours']:.0f} MB during it")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    print(json.dumps({
        "bench": "iso", "unit": "MB/s", "ours": round(speed["ours"], 1),
        "peer": round(xorriso, 1), "peer_name": "xorriso -as mkisofs",
        "ratio": round(speed["ours"] / xorriso, 3),
        "genisoimage_mb_s": round(speed["genisoimage"], 1),
        "peak_rss_mb": round(rss["ours"], 1),
    }))


if __name__ == "__main__":
    main()
