"""Shared fixtures: the local platform (one per test session) and a fresh namespace per test.

`platform` starts a private local platform (kube-apiserver, kwok, MinIO, pod runner) once per
session, or uses `RAGTUNE_TEST_KUBECONFIG` / `RAGTUNE_TEST_PLATFORM=reuse` (see
localplatform/ragtune_local/testing.py). Tests using these fixtures are marked `platform`
automatically, so `-m "not platform"` never starts it.
"""

from __future__ import annotations

import pytest

PLATFORM_FIXTURES = {"platform", "namespace"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if PLATFORM_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.platform)


@pytest.fixture(scope="session")
def platform():
    """Handle with .kubeconfig, .s3_endpoint/.s3_access_key/.s3_secret_key, .bucket(name), .kubectl(*args),
    .install_crds(), .helm(*args), .gpu_nodes(n), .api_client(), .s3_client(), .local (None on external clusters)."""
    from ragtune_local.testing import close_platform, open_platform

    handle, owned = open_platform()
    try:
        yield handle
    finally:
        if owned:
            close_platform(handle)


@pytest.fixture
def namespace(platform):
    """A fresh namespace holding Secret `s3-credentials` (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY); deleted after."""
    name = platform.create_namespace()
    try:
        yield name
    finally:
        platform.delete_namespace(name)
