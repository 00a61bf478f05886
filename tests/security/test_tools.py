"""The tools the security tests rely on: the API-call -> RBAC mapping of the recording proxy and
the credential scanner (fast, no cluster)."""

from __future__ import annotations

import base64
import json

import pytest

from ragtune_local.apiproxy import ApiCall

from .leakscan import scan


@pytest.mark.parametrize("method, path, query, expected", [
    ("GET", "/apis/ragtune.dev/v1alpha1/namespaces/a/finetunejobs", "watch=true&resourceVersion=1",
     ("ragtune.dev", "finetunejobs", "watch")),
    ("GET", "/apis/ragtune.dev/v1alpha1/finetunejobs", "", ("ragtune.dev", "finetunejobs", "list")),
    ("GET", "/apis/ragtune.dev/v1alpha1/namespaces/a/finetunejobs/x", "", ("ragtune.dev", "finetunejobs", "get")),
    ("PATCH", "/apis/ragtune.dev/v1alpha1/namespaces/a/finetunejobs/x/status", "",
     ("ragtune.dev", "finetunejobs/status", "patch")),
    ("GET", "/api/v1/namespaces/a/pods/p/log", "tailLines=200", ("", "pods/log", "get")),
    ("POST", "/api/v1/namespaces/a/events", "", ("", "events", "create")),
    ("PUT", "/apis/apps/v1/namespaces/a/deployments/d", "", ("apps", "deployments", "update")),
    ("DELETE", "/apis/batch/v1/namespaces/a/jobs/j", "", ("batch", "jobs", "delete")),
    ("DELETE", "/apis/batch/v1/namespaces/a/jobs", "", ("batch", "jobs", "deletecollection")),
    ("GET", "/api/v1/namespaces", "watch=1", ("", "namespaces", "watch")),
    ("GET", "/api/v1/namespaces/a", "", ("", "namespaces", "get")),
    ("GET", "/apis", "", None),
    ("GET", "/version", "", None),
    ("GET", "/apis/ragtune.dev/v1alpha1", "", None),
])
def test_api_calls_map_to_rbac_like_the_api_server(method, path, query, expected):
    assert ApiCall(method, path, query, 200).rbac == expected


SECRET = "very-distinctive-secret-value"


def test_scanner_finds_plain_and_base64_values_and_nothing_else(tmp_path):
    objects = {
        ("get", "pods"): json.dumps({"items": [{"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}}]}),
        ("get", "events"): json.dumps({"items": [{"message": f"auth failed for {SECRET}"}]}),
    }

    def kubectl(*args: str, check: bool = True) -> str:
        if args[0] == "logs":
            return "starting\n" + base64.b64encode(SECRET.encode()).decode() + "\n"
        return objects.get((args[0], args[1]), '{"items": []}')

    (tmp_path / "clean.log").write_text("nothing to see")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "dirty.log").write_text(f"AWS_SECRET_ACCESS_KEY={SECRET}")
    findings = scan(kubectl, ["ns"], [SECRET], paths=[tmp_path], s3_objects=[("r/report.json", b"{}")])
    where = sorted(f.where for f in findings)
    assert where == [str(tmp_path / "sub" / "dirty.log"), "events in ns", "log of pod ns/p/c"]
    assert all(SECRET not in str(f) for f in findings), "findings must not repeat the secret"
    assert scan(kubectl, [], ["another-distinctive-value"], paths=[tmp_path]) == []
