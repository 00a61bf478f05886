"""`ragtune adapters fetch` (the init container): digests, manifest checks, TGI constraints.

Runs against local `file://` runs (fast) and, with the local platform, against real S3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragtune.cli import build_parser
from ragtune.cli import main as cli_main
from ragtune.pods.fetch import FetchError, FetchResult, check_adapter_config
from ragtune_local.testdoubles.tiny_models import (
    TINY_BASE_ID,
    TINY_BASE_REVISION,
    fake_adapter,
    file_put,
    publish_run,
    s3_put,
)

EXPECT = f"{TINY_BASE_ID}@{TINY_BASE_REVISION}"


@pytest.fixture
def termination(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "termination-log"
    monkeypatch.setenv("RAGTUNE_TERMINATION_MESSAGE_PATH", str(path))
    return path


def run_fetch(dest: Path, *adapters: str, extra: tuple[str, ...] = ()) -> int:
    argv = ["adapters", "fetch", "--dest", str(dest), "--expect-base-model", EXPECT,
            "--allowed-target-module", "q_proj", "--allowed-target-module", "v_proj", *extra]
    for a in adapters:
        argv += ["--adapter", a]
    return cli_main(argv)


def local_run(tmp_path: Path, name: str, **kw) -> tuple[str, str]:
    run = tmp_path / "runs" / name
    adapter = fake_adapter(tmp_path / "src" / name, **{k: v for k, v in kw.items() if k in ("r", "target_modules")})
    digest = publish_run(file_put(run), adapter, **{k: v for k, v in kw.items() if k not in ("r", "target_modules")})
    return run.as_uri() + "/", digest


def result(path: Path) -> FetchResult:
    return FetchResult.model_validate_json(path.read_text())


def test_fetch_places_verified_adapters(tmp_path, termination):
    uri1, d1 = local_run(tmp_path, "a")
    uri2, d2 = local_run(tmp_path, "b")
    dest = tmp_path / "data" / "adapters"
    assert run_fetch(dest, f"support={uri1}#{d1}", f"legal={uri2}#{d2}") == 0
    for name in ("support", "legal"):
        assert (dest / name / "adapter_config.json").is_file()
        assert (dest / name / "adapter_model.safetensors").read_bytes() == bytes(range(256)) * 8
    res = result(termination)
    assert res.outcome == "Succeeded" and [a.name for a in res.adapters] == ["support", "legal"]
    assert not list(dest.glob(".*partial"))


def test_tampered_file_fails_with_checksum_mismatch_and_nothing_placed(tmp_path, termination, capsys):
    uri, digest = local_run(tmp_path, "a", tamper="adapter_model.safetensors")
    dest = tmp_path / "adapters"
    assert run_fetch(dest, f"support={uri}#{digest}") == 1
    res = result(termination)
    assert res.reason == "ChecksumMismatch" and res.adapter == "support"
    assert "adapter/adapter_model.safetensors" in res.message
    assert not (dest / "support").exists()
    assert "ChecksumMismatch" in capsys.readouterr().err


def _with_extra_file(run_uri: str, entry_path: str, data: bytes) -> str:
    """Add a file entry to a published local run's manifest; returns the new manifest digest."""
    import hashlib

    from ragtune.storage import local_path

    manifest_path = local_path(run_uri) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"].append({"path": entry_path, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)})
    raw = json.dumps(manifest).encode()
    manifest_path.write_bytes(raw)
    return hashlib.sha256(raw).hexdigest()


@pytest.mark.parametrize("entry", [
    "adapter/{outside}/evil.safetensors",  # `adapter//abs/path`: the join would be absolute
    "adapter/../evil.safetensors",
    "adapter/sub/../../evil.safetensors",
    "adapter/./../evil.safetensors",
])
def test_manifest_paths_cannot_leave_the_adapter_folder(tmp_path, termination, entry):
    uri, _ = local_run(tmp_path, "a")
    outside = tmp_path / "outside"
    path = entry.format(outside=outside)
    stored = local_path_of(uri, path)
    stored.parent.mkdir(parents=True, exist_ok=True)
    stored.write_bytes(b"weights")
    digest = _with_extra_file(uri, path, b"weights")
    dest = tmp_path / "data" / "adapters"
    assert run_fetch(dest, f"support={uri}#{digest}") == 1
    res = result(termination)
    assert res.reason == "InvalidManifest" and res.adapter == "support" and repr(path) in res.message
    assert not (outside / "evil.safetensors").exists() and not (dest / "evil.safetensors").exists()
    assert not (dest / "support").exists() and not list(dest.glob(".*partial"))


def local_path_of(run_uri: str, rel: str) -> Path:
    from ragtune.storage import local_path

    return Path(str(local_path(run_uri)) + "/" + rel)


@pytest.mark.parametrize("rel,ok", [
    ("adapter_model.safetensors", True), ("sub/dir/file", True), ("./a", True),
    ("/etc/passwd", False), ("", False), ("..", False), ("a/../../b", False), ("a/..", False),
    ("a\\..\\b", False), ("a\x00b", False), ("//abs", False),
])
def test_contained_path_accepts_only_plain_relative_paths(tmp_path, rel, ok):
    from ragtune.storage import contained_path

    if ok:
        assert tmp_path.resolve() in contained_path(tmp_path, rel).parents
    else:
        with pytest.raises(ValueError):
            contained_path(tmp_path, rel)


def test_contained_path_refuses_a_symlink_out_of_the_root(tmp_path):
    from ragtune.storage import contained_path

    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(ValueError, match="leaves"):
        contained_path(tmp_path / "root", "link/file")


def _run_with_base(tmp_path: Path) -> tuple[str, str, Path]:
    """A local run whose manifest lists the digests of a local base model folder."""
    import hashlib

    from ragtune.storage import local_path

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "llama"}')
    (base / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    uri, _ = local_run(tmp_path, "a")
    manifest_path = local_path(uri) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["baseModelFiles"] = [{"path": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                                   "size": p.stat().st_size} for p in sorted(base.iterdir())]
    raw = json.dumps(manifest).encode()
    manifest_path.write_bytes(raw)
    return uri, hashlib.sha256(raw).hexdigest(), base


def test_base_weights_are_verified_against_the_manifest(tmp_path, termination):
    uri, digest, base = _run_with_base(tmp_path)
    extra = ("--base-model-uri", base.as_uri() + "/", "--base-dest", str(tmp_path / "data" / "base"))
    assert run_fetch(tmp_path / "data" / "adapters", f"support={uri}#{digest}", extra=extra) == 0
    assert (tmp_path / "data" / "base" / "model.safetensors").is_file()


@pytest.mark.parametrize("change, needle", [
    (lambda base: (base / "model.safetensors").write_bytes(b"other weights"), "model.safetensors has sha256"),
    (lambda base: (base / "model.safetensors").unlink(), "model.safetensors is missing"),
    (lambda base: (base / "extra.bin").write_bytes(b"x"), "did not train with: extra.bin"),
])
def test_base_weights_that_differ_from_the_trained_ones_are_refused(tmp_path, termination, change, needle):
    uri, digest, base = _run_with_base(tmp_path)
    change(base)
    extra = ("--base-model-uri", base.as_uri() + "/", "--base-dest", str(tmp_path / "data" / "base"))
    assert run_fetch(tmp_path / "data" / "adapters", f"support={uri}#{digest}", extra=extra) == 1
    res = result(termination)
    assert res.reason == "BaseModelMismatch" and res.adapter == "support" and needle in res.message
    assert not (tmp_path / "data" / "adapters" / "support").exists()


def test_pinned_digest_must_match_the_manifest(tmp_path, termination):
    uri, digest = local_run(tmp_path, "a")
    assert run_fetch(tmp_path / "d", f"support={uri}#{'0' * 64}") == 1
    res = result(termination)
    assert res.reason == "DigestMismatch" and digest in res.message


def test_run_without_manifest_is_incomplete(tmp_path, termination):
    uri, digest = local_run(tmp_path, "a", omit_manifest=True)
    assert run_fetch(tmp_path / "d", f"support={uri}#{digest}") == 1
    assert result(termination).reason == "ManifestMissing"


def test_adapter_for_another_base_model_is_refused(tmp_path, termination):
    uri, digest = local_run(tmp_path, "a", base_id="meta-llama/Llama-3.2-1B")
    assert run_fetch(tmp_path / "d", f"support={uri}#{digest}") == 1
    res = result(termination)
    assert res.reason == "BaseModelMismatch"
    assert "meta-llama/Llama-3.2-1B" in res.message and TINY_BASE_ID in res.message


def test_unsupported_target_modules_and_rank(tmp_path, termination):
    uri, digest = local_run(tmp_path, "a", target_modules=("q_proj", "lm_head"))
    assert run_fetch(tmp_path / "d", f"support={uri}#{digest}") == 1
    res = result(termination)
    assert res.reason == "UnsupportedAdapter" and "lm_head" in res.message
    uri, digest = local_run(tmp_path, "b", r=256)
    assert run_fetch(tmp_path / "d", f"support={uri}#{digest}") == 1
    assert "rank 256" in result(termination).message


@pytest.mark.parametrize("config,needle", [
    ({"peft_type": "IA3"}, "IA3"),
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
])
def test_adapter_config_checks(config, needle):
    base = {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"]}
    with pytest.raises(FetchError, match=needle):
        check_adapter_config("x", {**base, **config}, {"q_proj"}, 128)


def test_bad_adapter_argument_names_the_flag(tmp_path, termination):
    assert run_fetch(tmp_path / "d", "support=s3://bucket/run") == 1
    res = result(termination)
    assert res.reason == "InvalidArguments" and "--adapter" in res.message


def test_cli_help_lists_the_command():
    parser = build_parser()
    args = parser.parse_args(["adapters", "fetch", "--adapter", "a=s3://b/r#" + "0" * 64])
    assert args.dest == "/data/adapters"


@pytest.mark.platform
def test_fetch_from_s3_and_mismatch(platform, tmp_path, termination, monkeypatch):
    bucket = platform.bucket("fetch-test")
    import boto3

    s3 = boto3.client("s3", endpoint_url=platform.s3_endpoint, aws_access_key_id=platform.s3_access_key,
                      aws_secret_access_key=platform.s3_secret_key, region_name="us-east-1")
    adapter = fake_adapter(tmp_path / "src")
    good = publish_run(s3_put(s3, bucket, "runs/good"), adapter)
    bad = publish_run(s3_put(s3, bucket, "runs/bad"), adapter, tamper="adapter_config.json")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", platform.s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", platform.s3_access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", platform.s3_secret_key)
    dest = tmp_path / "adapters"
    assert run_fetch(dest, f"good=s3://{bucket}/runs/good/#{good}") == 0
    assert json.loads((dest / "good" / "adapter_config.json").read_text())["r"] == 8
    assert run_fetch(dest, f"bad=s3://{bucket}/runs/bad/#{bad}") == 1
    res = result(termination)
    assert res.reason == "ChecksumMismatch" and "adapter/adapter_config.json" in res.message
