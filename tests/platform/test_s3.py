"""The local S3 server (MinIO built from its Go module) through boto3, including an outage."""

from __future__ import annotations

import hashlib
import os

import pytest
from botocore.exceptions import BotoCoreError, ClientError

pytestmark = [pytest.mark.platform, pytest.mark.slow]


def test_upload_download_list(platform):
    s3 = platform.s3_client()
    bucket = platform.bucket("rt-s3-basic")
    payload = os.urandom(6 * 1024 * 1024)
    s3.put_object(Bucket=bucket, Key="data/a.bin", Body=payload)
    s3.put_object(Bucket=bucket, Key="data/b.txt", Body=b"hello")
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="data/")
    assert sorted(o["Key"] for o in listed["Contents"]) == ["data/a.bin", "data/b.txt"]
    body = s3.get_object(Bucket=bucket, Key="data/a.bin")["Body"].read()
    assert hashlib.sha256(body).digest() == hashlib.sha256(payload).digest()
    with pytest.raises(ClientError) as err:
        s3.get_object(Bucket=bucket, Key="data/missing")
    assert err.value.response["Error"]["Code"] == "NoSuchKey"


def test_wrong_credentials_are_refused(platform):
    import boto3

    platform.s3_client()  # fails clearly when no S3 endpoint is configured
    bad = boto3.client("s3", endpoint_url=platform.s3_endpoint, aws_access_key_id="nobody",
                       aws_secret_access_key="wrong-secret", region_name="us-east-1")
    with pytest.raises(ClientError) as err:
        bad.list_buckets()
    assert err.value.response["Error"]["Code"] == "InvalidAccessKeyId"


def test_server_outage_gives_client_errors_and_data_survives_restart(platform):
    if platform.local is None:
        pytest.skip("needs the local platform (stops and restarts its S3 server)")
    s3 = platform.s3_client()
    bucket = platform.bucket("rt-s3-outage")
    s3.put_object(Bucket=bucket, Key="keep.txt", Body=b"durable")
    platform.local.stop_part("minio")
    try:
        with pytest.raises((BotoCoreError, ClientError)):
            s3.get_object(Bucket=bucket, Key="keep.txt")
    finally:
        platform.local.start_s3()
    assert s3.get_object(Bucket=bucket, Key="keep.txt")["Body"].read() == b"durable"
