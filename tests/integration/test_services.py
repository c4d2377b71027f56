"""The process managers themselves: they start real services and clean up after them."""
import pytest

from scripts.serving.processes import PostgresDatabase, free_port, wait_for

pytestmark = pytest.mark.integration


def test_s3_server_accepts_encrypted_put_and_presigned_get(s3_server):
    import requests

    s3 = s3_server.client()
    s3.put_object(Bucket=s3_server.bucket, Key="t/object", Body=b"fundus", ServerSideEncryption="AES256")
    head = s3.head_object(Bucket=s3_server.bucket, Key="t/object")
    assert head["ServerSideEncryption"] == "AES256"
    url = s3.generate_presigned_url("get_object", Params={"Bucket": s3_server.bucket, "Key": "t/object"},
                                    ExpiresIn=60)
    assert requests.get(url, timeout=5).content == b"fundus"


def test_postgres_database_is_created_and_dropped():
    import psycopg2

    db = PostgresDatabase().create()
    try:
        with psycopg2.connect(db.url) as conn, conn.cursor() as cur:
            cur.execute("select 1")
            assert cur.fetchone() == (1,)
        conn.close()
    finally:
        db.drop()
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(db.url, connect_timeout=3)


def test_wait_for_reports_what_it_waited_for():
    with pytest.raises(TimeoutError, match="the moon"):
        wait_for(lambda: False, 0.3, "the moon", interval=0.1)
    assert 20000 <= free_port() < 45000
