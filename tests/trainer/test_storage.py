import socket
from pathlib import Path

import pytest

from ragtune.api.common import S3Config
from ragtune.storage import Storage, StorageError, sha256_bytes, sha256_file, to_uri


def test_file_roundtrip_list_etag_and_delete(tmp_path):
    s = Storage()
    base = (tmp_path / "root").as_uri()
    s.put_bytes(base + "/a/one.txt", b"1")
    s.put_bytes(base + "/a/b/two.txt", b"22")
    assert s.get_bytes(base + "/a/one.txt") == b"1"
    assert [o.uri.rsplit("/", 1)[1] for o in s.list(base + "/a/")] == ["two.txt", "one.txt"]
    assert s.head(base + "/a/b/two.txt").size == 2 and s.etag(base + "/a/one.txt")
    assert not s.exists(base + "/missing") and s.etag(base + "/missing") is None
    s.delete_prefix(base + "/a/b/")
    assert not (tmp_path / "root/a/b").exists() and s.exists(base + "/a/one.txt")


def test_missing_file_is_object_not_found(tmp_path):
    with pytest.raises(StorageError) as err:
        Storage().get_bytes((tmp_path / "nope.jsonl").as_uri())
    assert err.value.reason == "S3ObjectNotFound"


def test_upload_dir_puts_named_files_last_and_download_prefix_mirrors(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for name in ("z.bin", "manifest.json", "sub/a.txt"):
        (src / name).write_text(name)
    s = Storage()
    order = s.upload_dir(src, (tmp_path / "dst").as_uri() + "/", last=["manifest.json"])
    assert order[-1] == "manifest.json" and set(order) == {"z.bin", "manifest.json", "sub/a.txt"}
    got = s.download_prefix((tmp_path / "dst").as_uri(), tmp_path / "copy")
    assert sorted(p.relative_to(tmp_path / "copy").as_posix() for p in got) == ["manifest.json", "sub/a.txt", "z.bin"]
    assert sha256_file(tmp_path / "copy/z.bin") == sha256_bytes(b"z.bin")


def test_to_uri_makes_bare_paths_absolute_file_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert to_uri("data/x.jsonl") == (tmp_path / "data/x.jsonl").as_uri()
    assert to_uri("s3://b/k") == "s3://b/k"


def test_unreachable_endpoint_is_s3_unreachable(monkeypatch):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens on this port now
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("RAGTUNE_S3_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("RAGTUNE_S3_ALLOW_LOOPBACK", "true")  # the dead port is on loopback
    s = Storage(S3Config(endpoint=f"http://127.0.0.1:{port}"))
    with pytest.raises(StorageError) as err:
        s.get_bytes("s3://bucket/key.jsonl")
    assert err.value.reason == "S3Unreachable" and "s3://bucket/key.jsonl" in str(err.value)


def _minio(platform, key=None, secret=None, monkeypatch=None):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key or platform.s3_access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret or platform.s3_secret_key)
    return Storage(S3Config(endpoint=platform.s3_endpoint))


@pytest.mark.platform
def test_minio_roundtrip_and_error_reasons(platform, monkeypatch, tmp_path):
    bucket = platform.bucket("storage-test")
    s = _minio(platform, monkeypatch=monkeypatch)
    s.put_bytes(f"s3://{bucket}/p/a.jsonl", b"{}\n")
    s.upload_dir(tmp_path, f"s3://{bucket}/empty/")  # nothing to upload: no error
    assert s.get_bytes(f"s3://{bucket}/p/a.jsonl") == b"{}\n"
    assert [o.uri for o in s.list(f"s3://{bucket}/p/")] == [f"s3://{bucket}/p/a.jsonl"]
    assert s.etag(f"s3://{bucket}/p/a.jsonl")
    with pytest.raises(StorageError) as missing:
        s.get_bytes(f"s3://{bucket}/p/missing.jsonl")
    assert missing.value.reason == "S3ObjectNotFound"
    bad = _minio(platform, key="wrong", secret="wrong-secret-123", monkeypatch=monkeypatch)
    with pytest.raises(StorageError) as denied:
        bad.get_bytes(f"s3://{bucket}/p/a.jsonl")
    assert denied.value.reason == "S3AccessDenied"


@pytest.mark.parametrize("key", ["/etc/passwd", "a/../../escape", "../escape", "a//b/../../../escape"])
def test_download_prefix_refuses_object_keys_that_leave_the_destination(tmp_path, monkeypatch, key):
    """S3 keys are data: `prefix/<key>` must land under `dest` (base weights, checkpoint restore)."""
    from ragtune.storage import ObjectInfo

    storage = Storage()
    prefix = "s3://bucket/models/tiny/"
    monkeypatch.setattr(storage, "list", lambda p: [ObjectInfo(prefix + "config.json", 2, None),
                                                     ObjectInfo(prefix + key, 2, None)])
    downloaded = []
    monkeypatch.setattr(storage, "download", lambda uri, dest: downloaded.append(dest) or Path(dest))
    with pytest.raises(StorageError) as err:
        storage.download_prefix(prefix, tmp_path / "dest")
    assert err.value.reason == "UnsafeObjectKey" and key in str(err.value)
    assert all((tmp_path / "dest").resolve() in Path(d).resolve().parents for d in downloaded)
