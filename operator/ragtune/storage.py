"""Object storage for every ragtune pod: `s3://bucket/key` through boto3 and `file:///path` for local
runs, behind one small interface. Failures become `StorageError` with a CamelCase `reason`
(`S3Unreachable`, `S3AccessDenied`, `S3ObjectNotFound`, `S3AddressForbidden`, `S3Error`) that ends up
in termination messages, so an operator sees *why* without reading logs.

Every connection the S3 client opens is checked against an `AddressPolicy` (ragtune.addresses):
the host is resolved, every address is classified, and the socket connects only to an address
that passed, then its actual peer is checked again before a byte is sent (a DNS answer that
changes between check and connect cannot slip through). Link-local, unspecified and
cloud-metadata addresses are always refused; loopback unless `RAGTUNE_S3_ALLOW_LOOPBACK=true`.
botocore never follows a `Location` header; its S3 region redirects re-send through the same
client, so they pass the same check. With an HTTP proxy configured, the checked peer is the
proxy.

Credentials come from the environment the pod gets from the Secret (`AWS_ACCESS_KEY_ID`, ...);
the endpoint and region from `spec.s3` (or `AWS_ENDPOINT_URL_S3` / `AWS_REGION`)."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional
from urllib.parse import unquote

from ragtune.addresses import AddressClass, AddressPolicy
from ragtune.api.common import S3Config


class StorageError(Exception):
    """An I/O failure with a machine-readable reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class AddressForbidden(Exception):
    """A connection the address policy refuses. Not an OSError: urllib3 and botocore must not
    take it for a flaky network and retry it."""

    def __init__(self, host: str, address: str, kind: AddressClass):
        super().__init__(f"refused to connect to {host} ({address}): a {kind.value} address")
        self.host, self.address, self.kind = host, address, kind


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int
    etag: Optional[str]


# --- URIs ------------------------------------------------------------------------------


def parse_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key)."""
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} has no bucket")
    return bucket, key


def local_path(uri: str) -> Path:
    """`file:///abs/path` (or a bare path) -> Path."""
    if uri.startswith("file://"):
        return Path(unquote(uri[len("file://"):]))
    if "://" in uri:
        raise ValueError(f"{uri!r} is not a file:// URI or a local path")
    return Path(uri)


def to_uri(path_or_uri: str) -> str:
    """Bare local paths become absolute `file://` URIs; URIs pass through."""
    if "://" in path_or_uri:
        return path_or_uri
    uri = Path(path_or_uri).expanduser().resolve().as_uri()
    return uri + "/" if path_or_uri.endswith("/") else uri


def join(prefix: str, *parts: str) -> str:
    """Join URI parts with single slashes (keeps a trailing slash on the last part)."""
    out = prefix.rstrip("/")
    for i, part in enumerate(parts):
        out += "/" + (part.strip("/") if i < len(parts) - 1 else part.lstrip("/"))
    return out


# --- Digests ---------------------------------------------------------------------------


def contained_path(root: str | os.PathLike, rel: str) -> Path:
    """`root/rel`, refusing a `rel` that is absolute, empty, has `..` parts or otherwise resolves
    outside `root` (an object key or a manifest entry is data, not a trusted path)."""
    root_path = Path(root).resolve()
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts or rel.startswith("/") or ".." in parts or "\\" in rel or "\x00" in rel:
        raise ValueError(f"path {rel!r} is not a plain relative path")
    target = root_path.joinpath(*parts)
    if root_path not in target.resolve().parents:
        raise ValueError(f"path {rel!r} leaves {root_path}")
    return target


def folder_digests(root: str | os.PathLike) -> dict[str, tuple[str, int]]:
    """`{relative path: (sha256, size)}` of every file under `root`, hidden files (local
    markers such as `.complete`) excepted."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): (sha256_file(p), p.stat().st_size)
            for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- The store -------------------------------------------------------------------------


class Storage:
    """get/put/list/exists/etag and prefix transfers for `s3://` and `file://` URIs."""

    def __init__(self, s3: Optional[S3Config] = None, policy: Optional[AddressPolicy] = None):
        self.s3 = s3 or S3Config()
        self.policy = policy
        """Where the S3 client may connect; None: `AddressPolicy.from_env()` when the client is made."""
        self._client = None

    # boto3 is imported lazily: file:// runs and the CLI's --help need no S3 stack.
    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                s3={"addressing_style": self.s3.addressing_style},
                connect_timeout=float(os.environ.get("RAGTUNE_S3_CONNECT_TIMEOUT", "5")),
                read_timeout=60,
                retries={"max_attempts": int(os.environ.get("RAGTUNE_S3_MAX_ATTEMPTS", "3")), "mode": "standard"},
            )
            # A fresh session per store: boto3's default session caches the first credentials it
            # resolves, so a later change of the environment would be silently ignored.
            client = boto3.session.Session().client(
                "s3",
                endpoint_url=self.s3.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or None,
                region_name=self.s3.region,
                config=config,
            )
            _guard(client, self.policy or AddressPolicy.from_env())
            self._client = client
        return self._client

    def _s3_call(self, uri: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # botocore raises many unrelated classes; map them in one place
            raise _map_error(uri, exc) from exc

    # --- single objects ---

    def get_bytes(self, uri: str) -> bytes:
        if uri.startswith("s3://"):
            bucket, key = parse_s3(uri)
            resp = self._s3_call(uri, self.client.get_object, Bucket=bucket, Key=key)
            return self._s3_call(uri, resp["Body"].read)
        path = local_path(uri)
        if not path.is_file():
            raise StorageError("S3ObjectNotFound", f"{uri}: no such file")
        return path.read_bytes()

    def put_bytes(self, uri: str, data: bytes) -> None:
        if uri.startswith("s3://"):
            bucket, key = parse_s3(uri)
            self._s3_call(uri, self.client.put_object, Bucket=bucket, Key=key, Body=data)
            return
        _atomic_write(local_path(uri), lambda tmp: Path(tmp).write_bytes(data))

    def download(self, uri: str, dest: str | os.PathLike) -> Path:
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if uri.startswith("s3://"):
            bucket, key = parse_s3(uri)
            _atomic_write(dest, lambda tmp: self._s3_call(uri, self.client.download_file, bucket, key, tmp))
            return dest
        src = local_path(uri)
        if not src.is_file():
            raise StorageError("S3ObjectNotFound", f"{uri}: no such file")
        _atomic_write(dest, lambda tmp: shutil.copyfile(src, tmp))
        return dest

    def upload(self, src: str | os.PathLike, uri: str) -> None:
        if uri.startswith("s3://"):
            bucket, key = parse_s3(uri)
            self._s3_call(uri, self.client.upload_file, str(src), bucket, key)
            return
        dest = local_path(uri)
        _atomic_write(dest, lambda tmp: shutil.copyfile(src, tmp))

    def head(self, uri: str) -> Optional[ObjectInfo]:
        """Size and ETag of one object, None when it does not exist."""
        if uri.startswith("s3://"):
            bucket, key = parse_s3(uri)
            try:
                resp = self._s3_call(uri, self.client.head_object, Bucket=bucket, Key=key)
            except StorageError as err:
                if err.reason == "S3ObjectNotFound":
                    return None
                raise
            return ObjectInfo(uri, int(resp["ContentLength"]), resp.get("ETag", "").strip('"') or None)
        path = local_path(uri)
        if not path.is_file():
            return None
        st = path.stat()
        return ObjectInfo(uri, st.st_size, f"{st.st_mtime_ns:x}-{st.st_size:x}")

    def exists(self, uri: str) -> bool:
        return self.head(uri) is not None

    def etag(self, uri: str) -> Optional[str]:
        info = self.head(uri)
        return info.etag if info else None

    # --- prefixes ---

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object under `prefix` (recursive), sorted by URI."""
        if prefix.startswith("s3://"):
            bucket, key = parse_s3(prefix)
            out = []
            paginator = self.client.get_paginator("list_objects_v2")
            pages = self._s3_call(prefix, lambda: list(paginator.paginate(Bucket=bucket, Prefix=key)))
            for page in pages:
                for obj in page.get("Contents", []):
                    out.append(ObjectInfo(f"s3://{bucket}/{obj['Key']}", int(obj["Size"]),
                                          obj.get("ETag", "").strip('"') or None))
            return sorted(out, key=lambda o: o.uri)
        root = local_path(prefix)
        if root.is_file():
            return [self.head(root.as_uri())]  # type: ignore[list-item]
        if not root.is_dir():
            return []
        return [self.head(p.as_uri()) for p in sorted(root.rglob("*")) if p.is_file()]  # type: ignore[misc]

    def download_prefix(self, prefix: str, dest: str | os.PathLike) -> list[Path]:
        """Mirror every object under `prefix` into `dest` (relative layout kept)."""
        prefix = prefix.rstrip("/") + "/"
        objects = self.list(prefix)
        if not objects:
            raise StorageError("S3ObjectNotFound", f"{prefix}: no objects under this prefix")
        base = prefix if prefix.startswith("s3://") else local_path(prefix).as_uri().rstrip("/") + "/"
        paths = []
        for obj in objects:
            try:
                target = contained_path(dest, obj.uri[len(base):])
            except ValueError as exc:
                raise StorageError("UnsafeObjectKey", f"{obj.uri}: {exc}") from None
            paths.append(self.download(obj.uri, target))
        return paths

    def upload_dir(self, src: str | os.PathLike, prefix: str, *, last: Iterable[str] = ()) -> list[str]:
        """Upload every file under `src` to `prefix`; files named in `last` (relative paths) go after
        all the others, in that order, so a reader that waits for them sees a complete folder."""
        src = Path(src)
        last = list(last)
        files = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())
        ordered = [f for f in files if f not in last] + [f for f in last if f in files]
        for rel in ordered:
            self.upload(src / rel, join(prefix, rel))
        return ordered

    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under `prefix` (or the single object `prefix` names)."""
        for obj in self.list(prefix):
            if obj.uri.startswith("s3://"):
                bucket, key = parse_s3(obj.uri)
                self._s3_call(obj.uri, self.client.delete_object, Bucket=bucket, Key=key)
            else:
                local_path(obj.uri).unlink(missing_ok=True)
        if not prefix.startswith("s3://"):  # S3 has no folders; locally, remove the emptied ones
            root = local_path(prefix)
            if root.is_dir():
                for d in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True):
                    if not any(d.iterdir()):
                        d.rmdir()
                if not any(root.iterdir()):
                    root.rmdir()


def _atomic_write(dest: Path, write) -> None:
    """Write via a temp file in the same folder + rename: readers never see half a file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
_DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
           "InvalidToken", "AllAccessDisabled", "Forbidden"}


def _map_error(uri: str, exc: Exception) -> StorageError:
    """botocore exception -> StorageError with a reason and one readable line (no secrets)."""
    if isinstance(exc, StorageError):
        return exc
    refused = _address_forbidden(exc)
    if refused is not None:
        return StorageError("S3AddressForbidden", f"{uri}: {refused}; S3 endpoints must not be link-local, "
                            "cloud-metadata or (unless RAGTUNE_S3_ALLOW_LOOPBACK is set) loopback addresses")
    from botocore import exceptions as bx

    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError,
                        bx.ConnectionClosedError)) or isinstance(exc, bx.HTTPClientError):
        return StorageError("S3Unreachable", f"{uri}: S3 endpoint unreachable ({type(exc).__name__}: {exc})")
    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return StorageError("S3AccessDenied", f"{uri}: no S3 credentials in the environment ({exc})")
    if isinstance(exc, bx.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _NOT_FOUND or status == 404:
            what = "bucket does not exist" if code == "NoSuchBucket" else "object not found"
            return StorageError("S3ObjectNotFound", f"{uri}: {what}")
        if code in _DENIED or status == 403:
            return StorageError("S3AccessDenied", f"{uri}: access denied ({code or status}); check the credentials Secret")
        return StorageError("S3Error", f"{uri}: S3 error {code or status}: {exc}")
    if isinstance(exc, bx.BotoCoreError):
        return StorageError("S3Error", f"{uri}: {type(exc).__name__}: {exc}")
    if isinstance(exc, OSError):
        return StorageError("S3Unreachable", f"{uri}: {type(exc).__name__}: {exc}")
    raise exc


# --- Connection guard ------------------------------------------------------------------


def _address_forbidden(exc: BaseException) -> Optional[AddressForbidden]:
    """The AddressForbidden behind an exception (botocore wraps it as HTTPClientError(error=...))."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, AddressForbidden):
            return exc
        wrapped = getattr(exc, "kwargs", {}).get("error") if isinstance(getattr(exc, "kwargs", None), dict) else None
        exc = wrapped or exc.__cause__ or exc.__context__
        seen += 1
    return None


def checked_addresses(host: str, port: int, policy: AddressPolicy) -> list[tuple]:
    """getaddrinfo(host, port) for TCP, refusing the whole host if any address is forbidden (a
    name that resolves to a metadata address is hostile, whatever else it resolves to)."""
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except UnicodeError as exc:  # a name the IDNA codec refuses resolves to nothing
        raise socket.gaierror(socket.EAI_NONAME, f"{host!r}: {exc}") from None
    for info in infos:
        kind = policy.refusal(info[4][0])
        if kind is not None:
            raise AddressForbidden(host, info[4][0], kind)
    return infos


def connect_checked(host: str, port: int, timeout, policy: AddressPolicy, source_address=None,
                    socket_options=()) -> socket.socket:
    """A TCP socket connected to a checked address of `host`, its peer checked again."""
    last: Optional[OSError] = None
    for family, socktype, proto, _, sockaddr in checked_addresses(host, port, policy):
        sock = socket.socket(family, socktype, proto)
        try:
            for option in socket_options or ():
                sock.setsockopt(*option)
            if timeout is None or isinstance(timeout, (int, float)):
                sock.settimeout(timeout)  # anything else is urllib3's "default" sentinel
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            peer = sock.getpeername()[0]
            kind = policy.refusal(peer)
            if kind is not None:
                raise AddressForbidden(host, peer, kind)
            return sock
        except BaseException as exc:
            sock.close()
            if not isinstance(exc, OSError):
                raise
            last = exc
    raise last or OSError(f"getaddrinfo({host!r}) returned no addresses")


PRECHECK_ID = "ragtune-address-precheck"


def _guard(client, policy: AddressPolicy) -> None:
    """Install the address check in a boto3 S3 client: a `before-send` check of every request's
    host (a refusal there is final, not retried) and connection classes that connect only to
    checked addresses (proof against DNS answers that change after the first check)."""
    from urllib.parse import urlsplit

    from botocore import awsrequest
    from botocore.httpsession import URLLib3Session
    from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

    def new_conn(self):  # urllib3's HTTPConnection._new_conn, through the check
        try:
            return connect_checked(self._dns_host, self.port, self.timeout, policy, self.source_address,
                                   self.socket_options)
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc
        except socket.timeout as exc:
            raise ConnectTimeoutError(self, f"Connection to {self.host} timed out. "
                                            f"(connect timeout={self.timeout})") from exc
        except OSError as exc:
            raise NewConnectionError(self, f"Failed to establish a new connection: {exc}") from exc

    http_conn = type("CheckedHTTPConnection", (awsrequest.AWSHTTPConnection,), {"_new_conn": new_conn})
    https_conn = type("CheckedHTTPSConnection", (awsrequest.AWSHTTPSConnection,), {"_new_conn": new_conn})
    session = client._endpoint.http_session
    pools = getattr(session, "_pool_classes_by_scheme", None)
    if not isinstance(session, URLLib3Session) or not isinstance(pools, dict):
        # A botocore that moved these internals must fail here, not run unguarded.
        raise RuntimeError("botocore's HTTP session layout changed: cannot install the S3 address check")
    # The session's pool managers (and proxy managers made later) share this dict.
    pools["http"] = type("CheckedHTTPConnectionPool", (awsrequest.AWSHTTPConnectionPool,),
                         {"ConnectionCls": http_conn})
    pools["https"] = type("CheckedHTTPSConnectionPool", (awsrequest.AWSHTTPSConnectionPool,),
                          {"ConnectionCls": https_conn})

    def before_send(request, **_):
        parts = urlsplit(request.url)
        try:
            checked_addresses(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80), policy)
        except socket.gaierror:
            pass  # the connection attempt reports the resolution failure as usual
        return None  # None: botocore goes on and sends the request

    client.meta.events.register("before-send.s3", before_send, unique_id=PRECHECK_ID)
