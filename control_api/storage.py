"""Image storage: one interface, a local-directory backend and an S3 backend (boto3).

Both store the original bytes unchanged, keep a SHA-256 beside them and check it on every
read. Keys are `screenings/<screening uuid>`: nothing about the patient is in them.
"""
from __future__ import annotations

import base64
import hashlib
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from flask import current_app

KEY_RE = re.compile(r"^[a-z0-9-]+(/[a-z0-9-]+)*$")


class StorageError(Exception):
    """Base class; `code` is the stable error code the API answers with."""

    code = "storage_error"


class StorageUnavailable(StorageError):
    code = "storage_unavailable"


class ObjectMissing(StorageError):
    code = "image_missing"


class ObjectCorrupted(StorageError):
    """The bytes read back do not hash to what was stored."""

    code = "image_corrupted"


@dataclass(frozen=True)
class StoredObject:
    key: str
    modified_at: datetime  # UTC


class _LastDigest(threading.local):
    data: bytes | None = None
    hexdigest = ""


_last_digest = _LastDigest()
_REMEMBER_FROM = 64 * 1024  # photographs, not keys and fingerprints


def sha256_hex(data: bytes) -> str:
    """The SHA-256 of `data` as hex. Each thread remembers the last large bytes object it hashed:
    an upload is hashed when it arrives and again by the local backend's check before the write,
    and bytes are immutable, so the same object needs no second pass (0.6 ms of CPU per 1 MB
    photograph). Other bytes, even equal ones, are hashed."""
    if type(data) is bytes and data is _last_digest.data:
        return _last_digest.hexdigest
    digest = hashlib.sha256(data).hexdigest()
    if type(data) is bytes and len(data) >= _REMEMBER_FROM:
        _last_digest.data, _last_digest.hexdigest = data, digest
    return digest


def screening_key(screening_id) -> str:
    return f"screenings/{screening_id}"


def _check_key(key: str) -> str:
    if not KEY_RE.match(key):
        raise ValueError(f"invalid storage key {key!r}")
    return key


def _verify(key: str, data: bytes, sha256: str | None) -> bytes:
    if sha256 is not None and sha256_hex(data) != sha256:
        raise ObjectCorrupted(f"object {key} does not match its SHA-256")
    return data


class Storage:
    """What the API needs from an object store."""

    name = "storage"

    def put(self, key: str, data: bytes, *, content_type: str, sha256: str) -> None:
        raise NotImplementedError

    def get(self, key: str, *, sha256: str | None) -> bytes:
        """The object's bytes, checked against `sha256` when given."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Remove the object; removing a missing object is not an error."""
        raise NotImplementedError

    def list(self, prefix: str = "screenings/") -> Iterator[StoredObject]:
        raise NotImplementedError

    def download_url(self, key: str, *, content_type: str) -> str | None:
        """A short-lived URL the client may fetch directly, or None to stream through the API."""
        return None

    def check(self) -> None:
        """Raise StorageUnavailable unless the store answers."""
        raise NotImplementedError


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStorage(Storage):
    name = "local"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / _check_key(key)).resolve()
        # KEY_RE already forbids '..' and absolute keys; this guards against symlinks too.
        if self.root not in path.parents:
            raise ValueError(f"invalid storage key {key!r}")
        return path

    def put(self, key, data, *, content_type, sha256):
        path = self._path(key)
        _verify(key, data, sha256)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write beside the target and rename: readers see the whole file or none of it.
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
            _fsync_dir(path.parent)  # the rename itself survives a power loss only after this
        except OSError as exc:
            raise StorageUnavailable(f"cannot write {key}: {exc.strerror}") from exc

    def get(self, key, *, sha256):
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectMissing(f"object {key} is missing") from None
        except OSError as exc:
            raise StorageUnavailable(f"cannot read {key}: {exc.strerror}") from exc
        return _verify(key, data, sha256)

    def delete(self, key):
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageUnavailable(f"cannot delete {key}: {exc.strerror}") from exc

    def list(self, prefix="screenings/"):
        base = self.root / prefix
        if not base.is_dir():
            return
        for path in sorted(base.rglob("*")):
            if path.is_file() and not path.name.startswith(".upload-"):
                yield StoredObject(path.relative_to(self.root).as_posix(),
                                   datetime.fromtimestamp(path.stat().st_mtime, timezone.utc))

    def check(self):
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if not os.access(self.root, os.W_OK):
                raise StorageUnavailable(f"{self.root} is not writable")
        except OSError as exc:
            raise StorageUnavailable(str(exc.strerror)) from exc


class S3Storage(Storage):
    name = "s3"

    def __init__(self, bucket: str, *, region: str, endpoint_url: str | None = None,
                 presign_ttl: int = 300, client=None):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.presign_ttl = presign_ttl
        # botocore's own retries ("standard" mode) cover throttling and 5xx; they are safe
        # because every call here is idempotent (PUT of the same bytes to the same key).
        # No payload signing: a PUT carries the body's SHA-256 in x-amz-checksum-sha256, a signed
        # header that S3 checks the body against (BadDigest otherwise), so botocore hashing the
        # whole body again for the signature (it does over http; over https with a checksum it
        # already signs UNSIGNED-PAYLOAD) adds nothing but a third pass over the image.
        self.client = client or boto3.client(
            "s3", region_name=region, endpoint_url=endpoint_url or None,
            config=Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=3,
                          read_timeout=20, signature_version="s3v4",
                          s3={"addressing_style": "path" if endpoint_url else "auto",
                              "payload_signing_enabled": False},
                          max_pool_connections=32),
        )

    def _call(self, what: str, key: str, fn, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise ObjectMissing(f"object {key} is missing") from None
            if code == "BadDigest":  # a PUT whose bytes do not match the ChecksumSHA256 sent with them
                raise ObjectCorrupted(f"object {key} does not match its SHA-256") from None
            raise StorageUnavailable(f"S3 {what} {key} failed: {code}") from exc
        except BotoCoreError as exc:
            raise StorageUnavailable(f"S3 {what} {key} failed: {type(exc).__name__}") from exc

    def put(self, key, data, *, content_type, sha256):
        # No hashing here: S3 checks the bytes against ChecksumSHA256 itself and refuses a
        # mismatch (BadDigest -> ObjectCorrupted, as the local backend's own check).
        _check_key(key)
        self._call("put", key, self.client.put_object, Key=key, Body=data, ContentType=content_type,
                   ServerSideEncryption="AES256",
                   ChecksumSHA256=base64.b64encode(bytes.fromhex(sha256)).decode())

    def get(self, key, *, sha256):
        _check_key(key)
        response = self._call("get", key, self.client.get_object, Key=key, ChecksumMode="ENABLED")
        from botocore.exceptions import FlexibleChecksumError

        try:
            data = response["Body"].read()
        except FlexibleChecksumError as exc:  # S3's SHA-256 of the object does not match the bytes
            raise ObjectCorrupted(f"object {key} failed its checksum") from exc
        except Exception as exc:
            # A read timeout, a connection closed mid-body, a short read: the network failed,
            # not the object. Retryable (503), never reported as a corrupted image.
            raise StorageUnavailable(f"S3 get {key} failed while reading: {type(exc).__name__}") from exc
        return _verify(key, data, sha256)

    def delete(self, key):
        """Every version of the object, not just the current one: with versioning on (as the
        runbook recommends) a plain DELETE only adds a delete marker and the photograph stays
        readable by version id. Unversioned buckets list one "null" version, deleted the same way."""
        _check_key(key)
        listing = self._call("list_versions", key, self.client.list_object_versions, Prefix=key)
        versions = [v["VersionId"] for v in listing.get("Versions", []) + listing.get("DeleteMarkers", [])
                    if v["Key"] == key]
        while listing.get("IsTruncated"):  # more than 1000 versions of one key: not expected, handled
            listing = self._call("list_versions", key, self.client.list_object_versions, Prefix=key,
                                 KeyMarker=listing["NextKeyMarker"],
                                 VersionIdMarker=listing["NextVersionIdMarker"])
            versions += [v["VersionId"] for v in listing.get("Versions", []) + listing.get("DeleteMarkers", [])
                         if v["Key"] == key]
        for version in versions:
            self._call("delete", key, self.client.delete_object, Key=key, VersionId=version)
        if not versions:
            self._call("delete", key, self.client.delete_object, Key=key)

    def list(self, prefix="screenings/"):
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call("list", prefix, paginator.paginate, Prefix=prefix)
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            for page in pages:
                for item in page.get("Contents", []):
                    yield StoredObject(item["Key"], item["LastModified"].astimezone(timezone.utc))
        except (BotoCoreError, ClientError) as exc:
            raise StorageUnavailable(f"S3 list {prefix} failed") from exc

    def download_url(self, key, *, content_type):
        # Presigning is local arithmetic and succeeds with S3 down or the object gone; a HEAD
        # first makes those a 503 or 404 here instead of a link that fails for the client.
        self._call("head", key, self.client.head_object, Key=_check_key(key))
        return self.client.generate_presigned_url(
            "get_object", ExpiresIn=self.presign_ttl,
            # The photograph must not stay in a browser's or a proxy's cache after the link expires.
            Params={"Bucket": self.bucket, "Key": _check_key(key), "ResponseContentType": content_type,
                    "ResponseCacheControl": "no-store, private"},
        )

    def check(self):
        self._call("head_bucket", "", self.client.head_bucket)


def from_settings(settings) -> Storage:
    if settings.storage_backend == "s3":
        return S3Storage(settings.s3_bucket_name, region=settings.aws_region,
                         endpoint_url=settings.s3_endpoint_url, presign_ttl=settings.s3_presign_ttl_seconds)
    return LocalStorage(settings.local_storage_dir)


def get_storage() -> Storage:
    return current_app.extensions["clarity"]["storage"]
