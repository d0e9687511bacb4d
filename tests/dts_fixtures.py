"""DTS transfer folders exactly as DTS (github.com/kbase/dts) writes them, for tests and the benchmark.

Built from DTS's own code (commit abd8bd49, April 2026):

* ``transfers/transfers.go`` ``determineDestinationFolder``: a transfer lands in
  ``<username>/dts-<transfer uuid>`` below the destination's root (``dts_root`` here);
* ``transfers/mover.go``: each resource's payload goes to
  ``filepath.Join(destinationFolder, descriptor["path"])`` (the path as the
  manifest spells it; only the *source* path has NMDC's ``\\:`` unescaped);
* ``transfers/manifestor.go`` ``generateManifest``: the top level is
  ``name: "manifest"``, ``resources``, ``created`` (RFC 3339), ``profile:
  "data-package"``, ``keywords: ["dts", "manifest"]``, ``contributors`` (one: ``id``
  = the transfer uuid, ``title`` = the user's name, ``role: "author"``, optional
  ``organization`` and ``email``), ``description``, ``instructions``, ``username``;
  saved by datapackage-go (Go's ``encoding/json``: map keys sorted, HTML characters
  escaped) once the payload has moved, and sent last as ``manifest.json``; a transfer
  with no resources gets an empty (0-byte) file instead;
* ``databases/jdp/database.go`` ``descriptorFromOrganismAndFile``: ``id
  "JDP:<file id>"``, ``path`` = the archive path without ``/global/dna/dm_archive/``
  (``img/submissions/<n>/…``), ``format``, ``mediatype``, ``bytes``, md5 ``hash``,
  a ``credit`` object, optional ``sources``;
* ``databases/nmdc/database.go`` ``createDataObjectDescriptor``: ``bytes``,
  ``credit``, ``description``, ``format``, md5 ``hash``, ``id`` (study id +
  object id), ``mediatype``, ``name``, ``path`` = the data URL without its host,
  colons escaped as ``\\:``, and ``endpoint``;
* ``databases/s3/database.go`` ``s3ObjectToDescriptor``: ``id`` = ``path`` = the
  object key, ``name`` its base name, ``mediatype``, ``bytes``, ``hash`` = the ETag
  without quotes (md5 hex for a single-part upload, ``<hex>-<parts>`` for a
  multipart one), ``encoding`` (``""`` when none).

Older JDP manifests carried ``media_type`` and ``Endpoint``; dtsbridge ignores
every field but ``path``, ``bytes`` and ``hash``, so both spellings appear here.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterable

MiB = 1024 * 1024


def s3_etag(data: bytes, part_size: int | None) -> str:
    """The ETag S3 gives an object uploaded in parts of ``part_size`` (None: a single PUT → its md5)."""
    if part_size is None:
        return hashlib.md5(data).hexdigest()
    digests = b"".join(hashlib.md5(data[i:i + part_size]).digest() for i in range(0, max(len(data), 1), part_size))
    return f"{hashlib.md5(digests).hexdigest()}-{len(digests) // 16}"


def s3_etag_of_file(path: Path, part_size: int) -> str:
    """As :func:`s3_etag`, reading a big file part by part."""
    digests = bytearray()
    with open(path, "rb") as f:
        while True:
            part = f.read(part_size)
            if not part and digests:
                break
            digests += hashlib.md5(part).digest()
            if len(part) < part_size:
                break
    return f"{hashlib.md5(bytes(digests)).hexdigest()}-{len(digests) // 16}"


def go_json(doc: Any) -> bytes:
    """JSON as Go's ``encoding/json`` writes a ``map[string]any`` (sorted keys, ``<>&`` escaped), indented."""
    text = json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=False)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")).encode()


def credit(identifier: str, title: str) -> dict[str, Any]:
    return {
        "comment": "", "content_url": "",
        "contributors": [{"contributor_type": "Person", "contributor_id": "", "name": "Doe, Jane Q",
                          "given_name": "Jane Q", "family_name": "Doe",
                          "affiliations": [{"organization_id": "", "organization_name": "Example University"}],
                          "contributor_roles": "PI"}],
        "dates": [{"date": "2021-03-09", "event": "Created"}, {"date": "2021-03-10", "event": "Accepted"},
                  {"date": "2024-01-02", "event": "Updated"}],
        "descriptions": None, "funding": None, "identifier": identifier,
        "license": {"id": "", "url": ""}, "meta": {"credit_metadata_schema_version": "", "credit_metadata_source": None,
                                                   "saved_by": "", "timestamp": 0},
        "publisher": {"organization_id": "ROR:04xm1d337", "organization_name": "Joint Genome Institute"},
        "related_identifiers": [{"id": "10.46936/10.25585/60001289", "description": "Proposal DOI",
                                 "relationship_type": "IsCitedBy"}],
        "resource_type": "dataset", "titles": [{"language": "", "title": title, "title_type": ""}],
        "url": "", "version": "2021-03-09",
    }


def jdp_resource(path: str, data_size: int, md5: str, n: int) -> dict[str, Any]:
    name = os.path.basename(path)
    fid = f"{n:024x}"
    return {
        "id": f"JDP:{fid}", "name": name.rsplit(".", 1)[0].lower().replace(".", "_"), "path": path,
        "format": "fasta" if name.endswith((".fna", ".faa", ".fasta")) else "text",
        "mediatype": "text/plain", "media_type": "text/plain", "Endpoint": "jdp-globus",
        "bytes": data_size, "hash": md5, "credit": credit(f"JDP:{fid}", "Example organism Ga0456371"),
        "encoding": "utf-8", "profile": "data-resource",
    }


def nmdc_resource(path: str, data_size: int, md5: str, n: int) -> dict[str, Any]:
    return {
        "bytes": data_size, "credit": credit(f"nmdc:dobj-11-{n:06d}", "An NMDC study"),
        "description": "Annotated proteins", "format": "fasta", "hash": md5,
        "id": f"nmdc:sty-11-aygzgv51:dobj-11-{n:06d}", "mediatype": "text/plain",
        "name": os.path.basename(path).replace(".", "_"), "path": path, "endpoint": "nersc-dtn",
        "encoding": "utf-8", "profile": "data-resource",
    }


def s3_resource(key: str, data_size: int, etag: str) -> dict[str, Any]:
    return {"id": key, "name": os.path.basename(key), "path": key, "mediatype": "application/octet-stream",
            "bytes": data_size, "hash": etag, "encoding": "", "profile": "data-resource"}


def manifest(transfer: str, username: str, resources: list[dict[str, Any]], *, email: bool = True,
             organization: bool = True) -> bytes:
    """The manifest.json DTS's manifestor writes (0 bytes when there are no resources)."""
    if not resources:
        return b""
    user: dict[str, Any] = {"id": transfer, "title": "Jane Q. Doe", "role": "author"}
    if organization:
        user["organization"] = "Example University"
    if email:
        user["email"] = "jane@example.org"
    return go_json({
        "name": "manifest",
        "resources": resources,
        "created": "2026-11-30T17:04:05-08:00",
        "profile": "data-package",
        "keywords": ["dts", "manifest"],
        "contributors": [user],
        "description": "Genomes & proteins for <my> narrative",
        "instructions": {"protocol": "KBase narrative import", "objects": [{"data_type": "Assembly"}]},
        "username": username,
    })


class Transfer:
    """One DTS transfer folder being written: payload files first, ``manifest.json`` last (:meth:`finish`)."""

    def __init__(self, dts_root: Path, username: str, transfer: str | None = None) -> None:
        self.transfer = transfer or str(uuid.uuid4())
        self.username = username
        self.rel = f"{username}/dts-{self.transfer}"
        self.folder = Path(dts_root) / self.rel
        self.folder.mkdir(parents=True, exist_ok=True)
        self.resources: list[dict[str, Any]] = []

    def put(self, path: str, data: bytes) -> Path:
        """Write one resource's payload where DTS's mover puts it (``folder/<path as in the manifest>``)."""
        p = self.folder / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        return p

    def jdp(self, path: str, data: bytes) -> None:
        self.put(path, data)
        self.resources.append(jdp_resource(path, len(data), hashlib.md5(data).hexdigest(), len(self.resources)))

    def nmdc(self, path: str, data: bytes) -> None:
        self.put(path, data)
        self.resources.append(nmdc_resource(path, len(data), hashlib.md5(data).hexdigest(), len(self.resources)))

    def s3(self, key: str, data: bytes, part_size: int | None, etag: str | None = None) -> None:
        self.put(key, data)
        self.resources.append(s3_resource(key, len(data), etag if etag is not None else s3_etag(data, part_size)))

    def manifest_bytes(self, username: str | None = None) -> bytes:
        return manifest(self.transfer, self.username if username is None else username, self.resources)

    def finish(self, username: str | None = None, body: bytes | None = None) -> "Transfer":
        """Send ``manifest.json`` last, as DTS does (written beside, then renamed in: it appears whole)."""
        tmp = self.folder.parent / f".manifest-{self.transfer}.tmp"
        tmp.write_bytes(self.manifest_bytes(username) if body is None else body)
        os.rename(tmp, self.folder / "manifest.json")
        return self


def jdp_transfer(dts_root: Path, username: str = "alice", sizes: Iterable[int] = (20_000, 3_000, 1)) -> Transfer:
    """A JDP transfer: nested ``img/submissions/<n>/…`` paths, md5 hashes."""
    t = Transfer(dts_root, username)
    for i, size in enumerate(sizes):
        t.jdp(f"img/submissions/{253630 + i}/Ga0456371_{i}_contigs.fna", os.urandom(size))
    return t


def nmdc_transfer(dts_root: Path, username: str = "alice") -> Transfer:
    """An NMDC transfer: paths are data URLs without their host, colons escaped ``\\:`` (as on disk)."""
    t = Transfer(dts_root, username)
    t.nmdc("nmdc\\:omprc-11-bn8jcq58/nmdc\\:wfmgan-11-fqq66x60.1/nmdc_wfmgan-11-fqq66x60.1_proteins.faa",
           os.urandom(12_345))
    t.nmdc("nmdc\\:omprc-11-bn8jcq58/nmdc\\:wfmgan-11-fqq66x60.1/nmdc_wfmgan-11-fqq66x60.1_ko.tsv", b"ko\tcount\n")
    return t
