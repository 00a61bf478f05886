"""Every spelling of a forbidden S3 endpoint is refused by the operator's models and by the real
API server (CRD schema + CEL), naming `spec.s3.endpoint`; ordinary endpoints pass both. The host
classification behind the models is checked against the addresses each spelling denotes."""

from __future__ import annotations

import copy
import json
import re

import pytest
from pydantic import ValidationError

from ragtune.addresses import AddressClass, classify_host, parse_inet_aton, url_authority_host
from ragtune.api.adapterdeployment import AdapterDeploymentSpec
from ragtune.api.finetunejob import FineTuneJobSpec

from ..chart.chartlib import finetunejob, kubectl
from . import spellings as S

FORBIDDEN = S.forbidden_endpoints()
REFUSED = FORBIDDEN + S.MALFORMED + [f"http://{h}:9000" for h in S.LOOPBACK_ODD]
ACCEPTED = S.ORDINARY + [f"http://{h}:9000" for h in S.LOOPBACK_PLAIN]

AD_SPEC = {"baseModel": {"id": "tiny/model"}, "adapters": [{"name": "a1", "fineTuneJobRef": {"name": "ftj"}}]}


def ftj_spec(endpoint: str) -> dict:
    spec = copy.deepcopy(finetunejob("x", "ns", "http://127.0.0.1:9000")["spec"])
    spec["s3"]["endpoint"] = endpoint
    return spec


def ad_spec(endpoint: str) -> dict:
    return {**copy.deepcopy(AD_SPEC), "s3": {"endpoint": endpoint}}


def test_the_table_is_large_and_distinct():
    assert len(set(FORBIDDEN)) == len(FORBIDDEN) > 200
    assert not set(REFUSED) & set(ACCEPTED)


# --- classification ---------------------------------------------------------------------------


@pytest.mark.parametrize("host", S.ipv4_spellings("169.254.169.254") + S.ipv6_spellings_of_v4("169.254.169.254")
                         + S.METADATA_V6 + S.METADATA_NAMES)
def test_metadata_spellings_classify_as_metadata(host):
    assert classify_host(host)[1] is AddressClass.METADATA


@pytest.mark.parametrize("host", S.LINK_LOCAL_V6 + S.ipv4_spellings("169.254.1.1"))
def test_link_local_spellings_classify_as_link_local(host):
    assert classify_host(host)[1] is AddressClass.LINK_LOCAL


@pytest.mark.parametrize("host", S.LOOPBACK_ODD + S.LOOPBACK_PLAIN + S.ipv4_spellings("127.0.0.1"))
def test_loopback_spellings_classify_as_loopback(host):
    assert classify_host(host)[1] is AddressClass.LOOPBACK


@pytest.mark.parametrize("host", S.UNSPECIFIED)
def test_unspecified_spellings(host):
    assert classify_host(host)[1] is AddressClass.UNSPECIFIED


@pytest.mark.parametrize("text, expected", [
    ("2130706433", "127.0.0.1"), ("0x7f000001", "127.0.0.1"), ("0177.0.0.1", "127.0.0.1"), ("127.1", "127.0.0.1"),
    ("127.0.1", "127.0.0.1"), ("0x7f.1", "127.0.0.1"), ("1.2.3.4", "1.2.3.4"), ("0", "0.0.0.0"),
    ("08.0.0.1", None), ("256.0.0.1", None), ("1.2.3.4.5", None), ("1.16777216", None), ("0x", "0.0.0.0"),
    ("example.com", None), ("1.2.3.0x", "1.2.3.0"), ("4294967295", "255.255.255.255"), ("4294967296", None),
])
def test_inet_aton_reading(text, expected):
    got = parse_inet_aton(text)
    assert (str(got) if got else None) == expected


def test_inet_aton_reading_matches_the_c_library():
    import socket

    for text in ["2130706433", "0x7f000001", "0177.0.0.1", "127.1", "127.0.1", "0x7f.1", "08.0.0.1", "256.1",
                 "1.2.3.4.5", "0xffffffff", "037777777777", "0.0.0.0", "1.0x10.0377.8"]:
        try:
            libc = socket.inet_ntoa(socket.inet_aton(text))
        except OSError:
            libc = None
        got = parse_inet_aton(text)
        assert (str(got) if got else None) == libc, text


@pytest.mark.parametrize("url, host", [
    ("http://a@b@169.254.169.254:80/x", "169.254.169.254"), ("http://[::1]:9000/", "[::1]"),
    ("http://h\\@good.example.com", "h"), ("http://h#@good", "h"), ("http://h?@good", "h"), ("http://", ""),
])
def test_authority_is_split_the_way_urllib3_splits_it(url, host):
    assert url_authority_host(url) == host


# --- the models (the operator's own check) -------------------------------------------------------


@pytest.mark.parametrize("endpoint", REFUSED)
def test_models_refuse(endpoint):
    for model, spec in ((FineTuneJobSpec, ftj_spec(endpoint)), (AdapterDeploymentSpec, ad_spec(endpoint))):
        with pytest.raises(ValidationError) as err:
            model.model_validate(spec)
        assert ("s3", "endpoint") in [e["loc"][:2] for e in err.value.errors()], err.value


@pytest.mark.parametrize("endpoint", ACCEPTED)
def test_models_accept(endpoint):
    assert FineTuneJobSpec.model_validate(ftj_spec(endpoint)).s3.endpoint == endpoint
    assert AdapterDeploymentSpec.model_validate(ad_spec(endpoint)).s3.endpoint == endpoint


def test_model_errors_say_why():
    with pytest.raises(ValidationError, match=r"cloud-metadata address \(169\.254\.169\.254\)"):
        FineTuneJobSpec.model_validate(ftj_spec("http://0xa9fea9fe"))
    with pytest.raises(ValidationError, match="dotted decimal"):
        FineTuneJobSpec.model_validate(ftj_spec("http://2130706433:9000"))
    with pytest.raises(ValidationError, match="userinfo"):
        FineTuneJobSpec.model_validate(ftj_spec("http://user:pw@s3.example.com"))


# --- the real API server -------------------------------------------------------------------------


def dry_run_many(kubeconfig: str, objects: list[dict]) -> dict[str, str]:
    """Server-side dry run of many objects in one kubectl call: name -> '' (accepted) or the error."""
    stream = "\n".join(json.dumps(o) for o in objects)
    out = kubectl(kubeconfig, "create", "--dry-run=server", "-f", "-", stdin=stream, check=False)
    result = {}
    starts = [(m.start(), m.group(1)) for m in re.finditer(r'[\w.]+ "([^"]+)" is invalid', out)]
    for i, (pos, name) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(out)
        result[name] = out[pos:end]
    for o in objects:
        name = o["metadata"]["name"]
        if f"/{name} created (server dry run)" in out:
            assert name not in result, out
            result[name] = ""
        else:
            assert name in result, f"no verdict for {name} ({o['spec'].get('s3')}) in:\n{out[-3000:]}"
    return result


def _objects(kind: str, namespace: str, endpoints: list[str]) -> list[dict]:
    make = ftj_spec if kind == "FineTuneJob" else ad_spec
    return [{"apiVersion": "ragtune.dev/v1alpha1", "kind": kind,
             "metadata": {"name": f"ssrf-{i}", "namespace": namespace}, "spec": make(e)}
            for i, e in enumerate(endpoints)]


@pytest.mark.platform
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["FineTuneJob", "AdapterDeployment"])
def test_api_server_refuses_every_forbidden_spelling(platform, kind):
    platform.install_crds()
    endpoints = REFUSED + ACCEPTED
    verdicts = dry_run_many(platform.kubeconfig, _objects(kind, "default", endpoints))
    wrong = []
    for i, endpoint in enumerate(endpoints):
        verdict = verdicts[f"ssrf-{i}"]
        if endpoint in ACCEPTED and verdict:
            wrong.append(f"refused {endpoint!r}: {verdict.strip()[:300]}")
        elif endpoint not in ACCEPTED and (not verdict or "spec.s3.endpoint" not in verdict):
            wrong.append(f"accepted {endpoint!r}" if not verdict else f"{endpoint!r}: field not named: {verdict[:300]}")
    assert not wrong, "\n".join(wrong)
