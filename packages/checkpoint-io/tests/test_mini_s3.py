"""``checkpoint_testing.mini_s3``, the benchmarks' cheap S3 server, speaks enough S3 for
botocore, obstore and our ``File``, over plain http and over TLS with its run-time CA.

Test support, so lightly tested: one round trip per client and the answers the benchmarks
rely on (ranges, ``If-Match``, multipart, a clear 501 for what it does not implement).
"""

from __future__ import annotations

import os

import pytest
from checkpoint_testing.mini_s3 import MiniS3

MiB = 1 << 20

pytestmark = pytest.mark.emulator


@pytest.fixture(scope="module", params=["http", "tls"])
def server(request):
    with MiniS3(tls=request.param == "tls") as s3:
        yield s3


def _client(server):
    import boto3
    import botocore.config

    return boto3.client(
        "s3", endpoint_url=server.endpoint, region_name="us-east-1",
        aws_access_key_id="mini", aws_secret_access_key="mini-secret",
        verify=server.ca_file if server.tls else None,
        config=botocore.config.Config(connect_timeout=10, read_timeout=30,
                                      retries={"max_attempts": 1}))


def test_botocore_round_trip(server):
    s3 = _client(server)
    data = os.urandom(11 * MiB)
    s3.create_bucket(Bucket="b")
    s3.put_object(Bucket="b", Key="dir/one", Body=data[:3 * MiB])
    etag = s3.head_object(Bucket="b", Key="dir/one")["ETag"]
    part = s3.get_object(Bucket="b", Key="dir/one", Range="bytes=100-199", IfMatch=etag)
    assert part["ContentRange"] == f"bytes 100-199/{3 * MiB}"
    assert part["Body"].read() == data[100:200]

    upload = s3.create_multipart_upload(Bucket="b", Key="dir/many")["UploadId"]
    parts = []
    for number, start in enumerate(range(0, len(data), 5 * MiB), 1):
        tag = s3.upload_part(Bucket="b", Key="dir/many", UploadId=upload, PartNumber=number,
                             Body=data[start:start + 5 * MiB])["ETag"]
        parts.append({"PartNumber": number, "ETag": tag})
    s3.complete_multipart_upload(Bucket="b", Key="dir/many", UploadId=upload,
                                 MultipartUpload={"Parts": parts})
    # A range across the boundary of two parts, and the open-ended and suffix forms.
    assert s3.get_object(Bucket="b", Key="dir/many", Range=f"bytes={5 * MiB - 7}-"
                         f"{5 * MiB + 6}")["Body"].read() == data[5 * MiB - 7:5 * MiB + 7]
    assert s3.get_object(Bucket="b", Key="dir/many", Range=f"bytes={10 * MiB}-")[
        "Body"].read() == data[10 * MiB:]
    assert s3.get_object(Bucket="b", Key="dir/many", Range="bytes=-5")["Body"].read() == \
        data[-5:]
    listed = s3.list_objects_v2(Bucket="b", Prefix="dir/")
    assert [(o["Key"], o["Size"]) for o in listed["Contents"]] == [
        ("dir/many", len(data)), ("dir/one", 3 * MiB)]

    aborted = s3.create_multipart_upload(Bucket="b", Key="dir/gone")["UploadId"]
    s3.upload_part(Bucket="b", Key="dir/gone", UploadId=aborted, PartNumber=1, Body=b"x")
    s3.abort_multipart_upload(Bucket="b", Key="dir/gone", UploadId=aborted)
    s3.delete_object(Bucket="b", Key="dir/one")
    assert [o["Key"] for o in s3.list_objects_v2(Bucket="b")["Contents"]] == ["dir/many"]
    # Nothing of the aborted upload or the deleted object is left on disk.
    assert len(os.listdir(server.root)) == len(parts)


def test_botocore_errors(server):
    from botocore.exceptions import ClientError

    s3 = _client(server)
    s3.put_object(Bucket="b", Key="e", Body=b"0123456789")
    with pytest.raises(ClientError) as replaced:
        s3.get_object(Bucket="b", Key="e", IfMatch='"not-its-etag"', Range="bytes=0-3")
    assert replaced.value.response["Error"]["Code"] == "PreconditionFailed"
    assert replaced.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    with pytest.raises(ClientError) as missing:
        s3.get_object(Bucket="b", Key="absent")
    assert missing.value.response["Error"]["Code"] == "NoSuchKey"
    with pytest.raises(ClientError) as past:
        s3.get_object(Bucket="b", Key="e", Range="bytes=10-20")
    assert past.value.response["Error"]["Code"] == "InvalidRange"
    with pytest.raises(ClientError) as unknown:
        s3.copy_object(Bucket="b", Key="copy", CopySource={"Bucket": "b", "Key": "e"})
    assert unknown.value.response["Error"]["Code"] == "NotImplemented"
    assert "PUT /b/copy" in unknown.value.response["Error"]["Message"]


def test_obstore_round_trip(server, monkeypatch):
    obstore = pytest.importorskip("obstore", reason="obstore is not installed")
    from obstore.store import S3Store

    if server.tls:  # how obstore (rustls with the system's roots) trusts a CA
        monkeypatch.setenv("SSL_CERT_FILE", server.ca_file)
    store = S3Store("ob", endpoint=server.endpoint, access_key_id="mini",
                    secret_access_key="mini-secret", region="us-east-1",
                    client_options={"allow_http": True, "timeout": "30s"})
    data = os.urandom(12 * MiB)
    obstore.put(store, "big", data, chunk_size=5 * MiB)  # multipart: 5 + 5 + 2 MiB
    meta = obstore.head(store, "big")
    assert meta["size"] == len(data)
    assert bytes(obstore.get_range(store, "big", start=MiB, end=6 * MiB)) == data[MiB:6 * MiB]
    got = obstore.get(store, "big", options={"if_match": meta["e_tag"]})
    assert bytes(got.bytes()) == data
    with pytest.raises(Exception, match=r"(?i)precondition"):
        obstore.get(store, "big", options={"if_match": '"another"'})
    assert [o["path"] for o in obstore.list(store).collect()] == ["big"]
