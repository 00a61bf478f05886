"""The S3 client of every ragtune pod refuses, before connecting, a peer whose address is link-local,
unspecified, cloud metadata or (unless allowed) loopback, in every spelling boto3 follows. Only
loopback is ever connected to: loopback is denied only in these tests' own policy."""

from __future__ import annotations

import http.server
import threading

import pytest

from ragtune.addresses import ALLOW_LOOPBACK_ENV, AddressClass, AddressPolicy
from ragtune.api.common import S3Config
from ragtune.storage import PRECHECK_ID, AddressForbidden, Storage, StorageError, connect_checked

# The issue's five, and more: every one of them reaches 127.0.0.1 through getaddrinfo.
LOOPBACK_SPELLINGS = ["2130706433", "0x7f000001", "0177.0.0.1", "127.1", "[::ffff:127.0.0.1]", "127.0.1",
                      "0x7f.1", "017700000001", "127.0.0.1", "localhost", "[::ffff:7f00:1]"]


def endpoint_config(url: str) -> S3Config:
    # model_construct: these spellings are refused by the model; here the connection check is tested.
    return S3Config.model_construct(endpoint=url, region="us-east-1", addressing_style="path",
                                    credentials_secret_ref=None)


class CountingServer:
    """A loopback HTTP server that answers 404 to everything and counts the connections it got."""

    def __init__(self):
        self.connections = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def setup(self):
                server.connections += 1
                super().setup()

            def do_GET(self):
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def _server():
    s = CountingServer()
    yield s
    s.close()


@pytest.fixture
def server(_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("RAGTUNE_S3_MAX_ATTEMPTS", "1")
    _server.connections = 0
    return _server


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_loopback_spellings_are_refused_before_connecting(server, host):
    store = Storage(endpoint_config(f"http://{host}:{server.port}"), policy=AddressPolicy(allow_loopback=False))
    with pytest.raises(StorageError) as err:
        store.get_bytes("s3://bucket/key")
    assert err.value.reason == "S3AddressForbidden"
    assert host.strip("[]") in str(err.value) and "loopback" in str(err.value)
    assert server.connections == 0


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_the_same_spellings_reach_the_server_when_loopback_is_allowed(server, host):
    """Control: boto3 does follow each spelling, so the refusal above is the check's doing."""
    store = Storage(endpoint_config(f"http://{host}:{server.port}"), policy=AddressPolicy(allow_loopback=True))
    with pytest.raises(StorageError) as err:
        store.get_bytes("s3://bucket/key")
    assert err.value.reason == "S3ObjectNotFound"
    assert server.connections >= 1


def test_the_connection_itself_is_checked_without_the_precheck(server):
    """With the per-request pre-check removed, the connection classes still refuse (what holds
    when a DNS answer changes between the pre-check and the connect)."""
    store = Storage(endpoint_config(f"http://127.1:{server.port}"), policy=AddressPolicy(allow_loopback=False))
    store.client.meta.events.unregister("before-send.s3", unique_id=PRECHECK_ID)
    with pytest.raises(StorageError) as err:
        store.get_bytes("s3://bucket/key")
    assert err.value.reason == "S3AddressForbidden" and "loopback" in str(err.value)
    assert server.connections == 0


def test_unspecified_is_refused_even_with_loopback_allowed(server):
    # 0.0.0.0 reaches the local host on Linux; it is never an S3 endpoint.
    with pytest.raises(AddressForbidden) as err:
        connect_checked("0.0.0.0", server.port, 2, AddressPolicy(allow_loopback=True))
    assert err.value.kind is AddressClass.UNSPECIFIED
    assert server.connections == 0


def test_default_policy_comes_from_the_environment(server, monkeypatch):
    monkeypatch.delenv(ALLOW_LOOPBACK_ENV, raising=False)
    with pytest.raises(StorageError) as err:
        Storage(endpoint_config(f"http://127.0.0.1:{server.port}")).get_bytes("s3://bucket/key")
    assert err.value.reason == "S3AddressForbidden"
    monkeypatch.setenv(ALLOW_LOOPBACK_ENV, "true")
    with pytest.raises(StorageError) as err:
        Storage(endpoint_config(f"http://127.0.0.1:{server.port}")).get_bytes("s3://bucket/key")
    assert err.value.reason == "S3ObjectNotFound"
    monkeypatch.setenv(ALLOW_LOOPBACK_ENV, "maybe")
    with pytest.raises(ValueError, match=ALLOW_LOOPBACK_ENV):
        AddressPolicy.from_env()


@pytest.mark.platform
@pytest.mark.parametrize("host", ["2130706433", "0x7f000001", "0177.0.0.1", "127.1", "[::ffff:127.0.0.1]"])
def test_minio_through_loopback_spellings(platform, monkeypatch, host):
    """Against the local MinIO: refused with loopback denied, served with it allowed."""
    from urllib.parse import urlsplit

    port = urlsplit(platform.s3_endpoint).port
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", platform.s3_access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", platform.s3_secret_key)
    bucket = platform.bucket("address-guard")
    uri = f"s3://{bucket}/probe.txt"
    Storage(S3Config(endpoint=platform.s3_endpoint), policy=AddressPolicy(allow_loopback=True)).put_bytes(uri, b"ok")
    config = endpoint_config(f"http://{host}:{port}")
    with pytest.raises(StorageError) as err:
        Storage(config, policy=AddressPolicy(allow_loopback=False)).get_bytes(uri)
    assert err.value.reason == "S3AddressForbidden" and "loopback" in str(err.value)
    assert Storage(config, policy=AddressPolicy(allow_loopback=True)).get_bytes(uri) == b"ok"


def test_redirects_are_not_followed_around_the_check(monkeypatch):
    """botocore never follows a Location header (its region redirects re-send through the same,
    checked client): a 301/307 to another address is an error, and nothing connects there."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("RAGTUNE_S3_MAX_ATTEMPTS", "1")
    target = CountingServer()
    redirects = []

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            redirects.append(self.path)
            self.send_response(307 if len(redirects) % 2 else 301)
            self.send_header("Location", f"http://127.1:{target.port}/bucket/key")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        store = Storage(endpoint_config(f"http://127.0.0.1:{httpd.server_address[1]}"),
                        policy=AddressPolicy(allow_loopback=True))
        for _ in range(2):
            with pytest.raises(StorageError):
                store.get_bytes("s3://bucket/key")
        assert len(redirects) >= 2 and target.connections == 0
    finally:
        httpd.shutdown()
        httpd.server_close()
        target.close()


def test_the_online_evaluator_reports_the_refusal_as_its_reason(server, monkeypatch, tmp_path, capsys):
    import argparse
    import json

    from ragtune.pods import online_eval

    monkeypatch.delenv(ALLOW_LOOPBACK_ENV, raising=False)
    monkeypatch.setenv("RAGTUNE_TERMINATION_MESSAGE_PATH", str(tmp_path / "termination"))
    config = {"canaryUrl": f"http://127.0.0.1:{server.port}", "evalSetUri": "s3://bucket/eval.jsonl",
              "candidates": [{"name": "a1", "uri": "s3://bucket/run/"}],
              "s3": {"endpoint": f"http://127.0.0.1:{server.port}"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert online_eval.main(argparse.Namespace(config=str(tmp_path / "config.json"))) == 1
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["reason"] == "S3AddressForbidden" and "loopback" in printed["message"]
    assert json.loads((tmp_path / "termination").read_text())["reason"] == "S3AddressForbidden"
    assert server.connections == 0


@pytest.mark.parametrize("allow", [False, True])
def test_every_pod_that_talks_to_s3_gets_the_operators_loopback_setting(allow):
    """Trainer Job, adapter fetcher init container, online evaluation Job: the setting reaches each."""
    import dataclasses

    from ragtune.adapterdeployment import render as ad_render
    from ragtune.api.adapterdeployment import AdapterDeploymentSpec
    from ragtune.api.finetunejob import FineTuneJobSpec
    from ragtune.finetunejob.render import render_job
    from ragtune.runtime import settings

    before = settings.get_config()
    settings.set_config(dataclasses.replace(before, s3_allow_loopback=allow))
    try:
        ftj = FineTuneJobSpec.model_validate({"baseModel": {"id": "a/b"}, "dataset": {"train": "s3://data/t.jsonl"},
                                              "output": {"uri": "s3://out/runs"}})
        job = render_job({"name": "x", "namespace": "ns", "uid": "u", "generation": 1}, ftj, "r1-g1", "img:1")
        ad = AdapterDeploymentSpec.model_validate(
            {"baseModel": {"id": "a/b"}, "adapters": [{"name": "a1", "fineTuneJobRef": {"name": "x"}}]})
        owner = ad_render.Owner("chat", "ns", "u")
        envs = [job["spec"]["template"]["spec"]["containers"][0]["env"],
                ad_render.fetch_container(ad, [], "op:1")["env"],
                ad_render.eval_job(ad, owner, 1, {"candidates": []}, "op:1")["spec"]["template"]["spec"]
                ["containers"][0]["env"]]
    finally:
        settings.set_config(before)
    for env in envs:
        values = {e["name"]: e.get("value") for e in env}
        assert values.get(ALLOW_LOOPBACK_ENV) == ("true" if allow else None), values
