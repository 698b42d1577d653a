"""Conditional writes on object storage: create an object only if it is absent, replace it only if it is still the
version that was read. They are what makes a registry on object storage safe for concurrent publishers (see
fsspec_registry.py), and each storage is asked for them through its own precondition API:

| storage | create if absent | replace if unchanged |
| --- | --- | --- |
| S3 (s3fs) | `If-None-Match: *` | `If-Match: <ETag>` |
| Google Cloud Storage (gcsfs) | `ifGenerationMatch=0` | `ifGenerationMatch=<generation>` |
| Azure Blob Storage (adlfs) | `If-None-Match: *` (upload without overwrite) | `If-Match: <ETag>` |
| `memory://` (one process) | a lock | a lock |
"""

from __future__ import annotations

import json
import threading
from typing import Any
from urllib.parse import quote

# The protocols each class serves; any other protocol has no conditional writes known here.
S3_PROTOCOLS = ("s3", "s3a")
GCS_PROTOCOLS = ("gs", "gcs")
AZURE_PROTOCOLS = ("az", "abfs", "abfss")
PROTOCOLS = (*S3_PROTOCOLS, *GCS_PROTOCOLS, *AZURE_PROTOCOLS, "memory")

_memory_lock = threading.Lock()  # memory:// lives in one process: a lock there is a real compare-and-swap


class ConditionalWrites:
    """S3's preconditions (through s3fs); the subclasses ask the other storages for the same two guarantees."""

    token_field = "ETag"  # what `info()` calls the version a replace is conditioned on

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def create(self, path: str, data: bytes) -> bool:
        """Write `path` only if it does not exist; False when it does (somebody else created it first)."""
        try:
            self.fs.pipe_file(path, data, mode="create")  # every fsspec storage here maps this to its precondition
        except FileExistsError:
            return False
        except OSError as err:
            if not _precondition_failed(err):
                raise
            return False
        return True

    def read(self, path: str) -> tuple[bytes | None, Any]:
        """The content of `path` (None: absent) and the token `replace` is conditioned on. The token is read first,
        so content newer than it only makes the replace fail and be tried again."""
        try:
            self.fs.invalidate_cache(path)  # the token must be the stored one, not a cached listing's
            token = self.fs.info(path)[self.token_field]
            return self.fs.cat_file(path), token
        except FileNotFoundError:
            return None, None

    def replace(self, path: str, data: bytes, token: Any) -> bool:
        """Write `path` only if it is still what was read (`token`; None: it did not exist)."""
        if token is None:
            return self.create(path, data)
        try:
            self._replace(path, data, token)
        except OSError as err:  # FileNotFoundError: deleted since; FileExistsError: gcsfs's name for a 412
            if not (isinstance(err, (FileNotFoundError, FileExistsError)) or _precondition_failed(err)):
                raise
            return False
        return True

    def _replace(self, path: str, data: bytes, token: Any) -> None:
        self.fs.pipe_file(path, data, IfMatch=token)


class GcsWrites(ConditionalWrites):
    """Google Cloud Storage: object generations. gcsfs sends `ifGenerationMatch=0` for `mode="create"` and turns the
    412 into FileExistsError; a replace is a JSON API multipart upload (gcsfs's own kind of upload, which every GCS
    server honours preconditions on) with `ifGenerationMatch=<generation>`."""

    token_field = "generation"
    _boundary = "lpeft-part"

    def _replace(self, path: str, data: bytes, token: Any) -> None:
        bucket, key, _ = self.fs.split_path(path)
        head = f"--{self._boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{json.dumps({'name': key})}"
        head += f"\r\n--{self._boundary}\r\nContent-Type: application/octet-stream\r\n\r\n"
        # `_location` is gcsfs's endpoint (STORAGE_EMULATOR_HOST or Google's), the one its own uploads use.
        self.fs.call(
            "POST",
            f"{self.fs._location}/upload/storage/v1/b/{quote(bucket, safe='')}/o",
            uploadType="multipart",
            ifGenerationMatch=str(token),
            data=head.encode() + data + f"\r\n--{self._boundary}--".encode(),
            headers={"Content-Type": f'multipart/related; boundary="{self._boundary}"'},
        )
        self.fs.invalidate_cache(path)


class AzureWrites(ConditionalWrites):
    """Azure Blob Storage: adlfs uploads without overwrite for `mode="create"` (`If-None-Match: *`) and passes
    `etag` + `match_condition` on to azure-storage-blob's `upload_blob` (`If-Match`)."""

    token_field = "etag"

    def replace(self, path: str, data: bytes, token: Any) -> bool:
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError

        if token is None:
            return self.create(path, data)
        try:
            self.fs.pipe_file(path, data, etag=token, match_condition=MatchConditions.IfNotModified)
        except (ResourceModifiedError, ResourceNotFoundError):
            return False
        return True


class MemoryWrites(ConditionalWrites):
    """`memory://`: one process's dictionary, so a lock is the compare-and-swap; the token is the content."""

    def create(self, path: str, data: bytes) -> bool:
        with _memory_lock:
            return super().create(path, data)

    def read(self, path: str) -> tuple[bytes | None, Any]:
        try:
            raw = self.fs.cat_file(path)
        except FileNotFoundError:
            return None, None
        return raw, raw

    def replace(self, path: str, data: bytes, token: Any) -> bool:
        if token is None:
            return self.create(path, data)
        with _memory_lock:
            if self.read(path)[0] != token:
                return False
            self.fs.pipe_file(path, data)
            return True


def for_protocol(protocol: str, fs: Any) -> ConditionalWrites:
    """The conditional writes of `protocol` (one of PROTOCOLS) on the filesystem `fs`."""
    if protocol in GCS_PROTOCOLS:
        return GcsWrites(fs)
    if protocol in AZURE_PROTOCOLS:
        return AzureWrites(fs)
    if protocol == "memory":
        return MemoryWrites(fs)
    return ConditionalWrites(fs)


def _precondition_failed(err: OSError) -> bool:
    """S3's 412 (the condition did not hold) and 409 (a concurrent conditional write): someone else came first."""
    text = str(err).lower().replace("-", "")
    return any(word in text for word in ("precondition", "conditionalrequestconflict", "412", "409"))
