"""Driving the upload portal over HTTP the way its script does: the PIN, "Ready to
Upload", announcements of files read from disc, the files sent several to a request
(or one PUT each)."""

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from django.test import Client

CD = "cd_ihe_pdi_hitachi_mr_jp"
HEAD_BYTES = 256


@dataclass(frozen=True)
class DiscFile:
    """A file of a folder as the browser gives it: the path below the chosen folder
    (starting with the folder's name), its bytes on disc."""

    path: str
    source: Path

    @property
    def size(self) -> int:
        return self.source.stat().st_size

    @property
    def is_dicom(self) -> bool:
        with open(self.source, "rb") as fh:
            return fh.read(132)[128:] == b"DICM"

    def announced(self) -> dict:
        with open(self.source, "rb") as fh:
            head = fh.read(HEAD_BYTES)
        return {"path": self.path, "size": self.size, "head": base64.b64encode(head).decode()}


def folder_files(folder: Path) -> list[DiscFile]:
    return [DiscFile(f"{folder.name}/{p.relative_to(folder).as_posix()}", p)
            for p in sorted(folder.rglob("*")) if p.is_file()]


class Uploader:
    """An outside facility's browser at ``/upload/<facility>``."""

    def __init__(self, facility_slug: str, client: Client | None = None, **client_kwargs):
        self.client = client or Client(**client_kwargs)
        self.base = f"/upload/{facility_slug}"

    def enter_pin(self, pin: str):
        return self.client.post(self.base, {"pin": pin})

    def begin(self, pin: str):
        response = self.enter_pin(pin)
        assert response.status_code == 303, response.content[:500]
        response = self.client.post(f"{self.base}/start")
        assert response.status_code == 303, response.content[:500]
        return response

    def announce(self, files: list[DiscFile], *, total_files: int | None = None):
        return self.client.post(
            f"{self.base}/announce", content_type="application/json",
            headers={"Accept": "application/json"},
            data={"files": [f.announced() for f in files],
                  "total_files": len(files) if total_files is None else total_files,
                  "total_bytes": sum(f.size for f in files)})

    def put(self, path: str, data: bytes):
        return self.client.put(f"{self.base}/file", data=data,
                               content_type="application/octet-stream",
                               headers={"X-Upload-Path": quote(path),
                                        "Accept": "application/json"})

    def batch(self, files: list[tuple[str, bytes]], *, manifest: bytes | None = None,
              length: int | None = None):
        """Several files in one request, as the portal's script sends them: a manifest
        of paths and sizes, then the bytes of each."""
        if manifest is None:
            manifest = json.dumps({"files": [{"path": path, "size": len(data)}
                                             for path, data in files]}).encode()
        return self.client.post(
            f"{self.base}/batch", data=manifest + b"".join(data for _path, data in files),
            content_type="application/octet-stream",
            headers={"X-Upload-Manifest-Length": str(
                len(manifest) if length is None else length), "Accept": "application/json"})

    def send(self, files: list[DiscFile], *, per_request: int = 20) -> dict[str, str]:
        """Announce ``files`` and send those the server asks for, ``per_request`` to a
        request; the outcome of each."""
        outcomes = {}
        for start in range(0, len(files), 1000):
            chunk = files[start:start + 1000]
            answer = self.announce(chunk)
            assert answer.status_code == 200, answer.content[:500]
            wanted = []
            for disc_file, result in zip(chunk, answer.json()["files"], strict=True):
                if result["outcome"] == "pending":
                    wanted.append(disc_file)
                outcomes[disc_file.path] = result["outcome"]
            for first in range(0, len(wanted), per_request):
                group = wanted[first:first + per_request]
                response = self.batch([(f.path, f.source.read_bytes()) for f in group])
                assert response.status_code == 200, response.content[:500]
                for disc_file, result in zip(group, response.json()["files"], strict=True):
                    outcomes[disc_file.path] = result["outcome"]
        return outcomes
