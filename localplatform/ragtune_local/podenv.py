"""What a container sees: its environment and its volumes, resolved like the kubelet does."""

from __future__ import annotations

import base64
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

from .kubeclient import ApiError, Kube


class ConfigError(Exception):
    """A referenced Secret/ConfigMap/key is missing: the container waits (CreateContainerConfigError)."""


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: unknown references stay as written, `$$` escapes."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _VAR.sub(sub, text)


class ObjectCache:
    """Secrets/ConfigMaps read once per pod start (the runner reads only what its pods reference)."""

    def __init__(self, kube: Kube, namespace: str):
        self.kube, self.namespace = kube, namespace
        self._seen: dict[tuple[str, str], Optional[dict]] = {}

    def get(self, kind: str, name: str) -> Optional[dict]:
        key = (kind, name)
        if key not in self._seen:
            plural = "secrets" if kind == "Secret" else "configmaps"
            try:
                self._seen[key] = self.kube.get(f"/api/v1/namespaces/{self.namespace}/{plural}/{name}")
            except ApiError as exc:
                if exc.status != 404:
                    raise
                self._seen[key] = None
        return self._seen[key]

    def data(self, kind: str, name: str, optional: bool) -> dict[str, bytes]:
        obj = self.get(kind, name)
        if obj is None:
            if optional:
                return {}
            raise ConfigError(f'{kind.lower()} "{name}" not found')
        if kind == "Secret":
            return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        out = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return out


def field_value(pod: dict, path: str, pod_ip: str, host_ip: str) -> str:
    meta, spec = pod["metadata"], pod["spec"]
    simple = {
        "metadata.name": meta["name"], "metadata.namespace": meta["namespace"], "metadata.uid": meta["uid"],
        "spec.nodeName": spec.get("nodeName", ""), "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": pod_ip, "status.podIPs": pod_ip, "status.hostIP": host_ip, "status.hostIPs": host_ip,
    }
    if path in simple:
        return simple[path]
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    raise ConfigError(f"fieldRef {path!r} is not supported by the local runner")


def _resource_value(container: dict, ref: dict) -> str:
    section, _, resource = ref["resource"].partition(".")
    value = ((container.get("resources") or {}).get(section) or {}).get(resource)
    return str(value) if value is not None else "0"


def container_env(pod: dict, container: dict, objects: ObjectCache, base: dict[str, str],
                  pod_ip: str, host_ip: str) -> dict[str, str]:
    env = dict(base)
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if key in source:
                ref = source[key]
                for k, v in objects.data(kind, ref["name"], ref.get("optional", False)).items():
                    env[prefix + k] = v.decode()
    for var in container.get("env") or []:
        name = var["name"]
        if "valueFrom" not in var:
            env[name] = expand(var.get("value", ""), env)
            continue
        vf = var["valueFrom"]
        if "fieldRef" in vf:
            env[name] = field_value(pod, vf["fieldRef"]["fieldPath"], pod_ip, host_ip)
        elif "resourceFieldRef" in vf:
            env[name] = _resource_value(container, vf["resourceFieldRef"])
        else:
            kind, ref = ("Secret", vf["secretKeyRef"]) if "secretKeyRef" in vf else ("ConfigMap", vf["configMapKeyRef"])
            data = objects.data(kind, ref["name"], ref.get("optional", False))
            if ref["key"] in data:
                env[name] = data[ref["key"]].decode()
            elif not ref.get("optional", False):
                raise ConfigError(f'couldn\'t find key {ref["key"]} in {kind} {objects.namespace}/{ref["name"]}')
    return env


# ---- volumes ---------------------------------------------------------------------------------


def _write_items(root: Path, data: dict[str, bytes], items: Optional[list[dict]], mode: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    selected = [(i["key"], i["path"], i.get("mode", mode)) for i in items] if items else \
        [(k, k, mode) for k in data]
    for key, rel, file_mode in selected:
        if key not in data:
            raise ConfigError(f"key {key!r} not found for volume item {rel!r}")
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data[key])
        path.chmod(file_mode)


def prepare_volumes(pod: dict, pod_dir: Path, shm_dir: Path, objects: ObjectCache, kube: Kube,
                    pod_ip: str, host_ip: str) -> dict[str, Path]:
    """Materialises every volume of the pod into a directory; returns volume name -> host path."""
    out: dict[str, Path] = {}
    for vol in pod["spec"].get("volumes") or []:
        name = vol["name"]
        target = pod_dir / "volumes" / name
        if "emptyDir" in vol:
            if (vol["emptyDir"] or {}).get("medium") == "Memory":
                target = shm_dir / name  # /dev/shm is tmpfs: memory-backed like the kubelet's tmpfs mount
            target.mkdir(parents=True, exist_ok=True)
        elif "hostPath" in vol:
            target = Path(vol["hostPath"]["path"])
            if vol["hostPath"].get("type") in ("DirectoryOrCreate",):
                target.mkdir(parents=True, exist_ok=True)
        elif "secret" in vol or "configMap" in vol:
            kind, src = ("Secret", vol["secret"]) if "secret" in vol else ("ConfigMap", vol["configMap"])
            ref_name = src.get("secretName") or src.get("name")
            _reset(target)
            _write_items(target, objects.data(kind, ref_name, src.get("optional", False)), src.get("items"),
                         src.get("defaultMode", 0o644))
        elif "downwardAPI" in vol:
            _reset(target)
            _write_downward(target, pod, vol["downwardAPI"].get("items") or [], pod_ip, host_ip)
        elif "projected" in vol:
            _reset(target)
            for source in vol["projected"].get("sources") or []:
                _write_projected(target, pod, source, objects, kube, pod_ip, host_ip)
        else:
            kinds = sorted(set(vol) - {"name"})
            raise ConfigError(f"volume {name!r}: type {kinds} is not supported by the local runner")
        out[name] = target
    return out


def refresh_configmap_volumes(pod: dict, volumes: dict[str, Path], kube: Kube) -> list[str]:
    """Rewrite the files of configMap volumes whose ConfigMap changed, as a kubelet does (eventually:
    its sync period; here the pod worker calls this every few seconds). Each file is replaced
    atomically, so a reader sees the old or the new content, never half; the volume's directory
    stays the same (containers bind-mount it). A ConfigMap that went missing keeps the last content.
    Returns the names of the volumes that changed."""
    objects = ObjectCache(kube, pod["metadata"]["namespace"])
    changed = []
    for vol in pod["spec"].get("volumes") or []:
        src = vol.get("configMap")
        if src is None or vol["name"] not in volumes:
            continue
        try:
            data = objects.data("ConfigMap", src["name"], src.get("optional", False))
        except (ConfigError, ApiError):
            continue
        items = src.get("items")
        selected = [(i["key"], i["path"], i.get("mode")) for i in items] if items else [(k, k, None) for k in data]
        wrote = False
        for key, rel, mode in selected:
            if key not in data:
                continue
            path = volumes[vol["name"]] / rel
            try:
                if path.read_bytes() == data[key]:
                    continue
            except FileNotFoundError:
                path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(data[key])
            tmp.chmod(mode if mode is not None else src.get("defaultMode", 0o644))
            os.replace(tmp, path)
            wrote = True
        if wrote:
            changed.append(vol["name"])
    return changed


def _reset(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _write_downward(root: Path, pod: dict, items: list[dict], pod_ip: str, host_ip: str) -> None:
    data = {}
    for item in items:
        if "fieldRef" in item:
            data[item["path"]] = field_value(pod, item["fieldRef"]["fieldPath"], pod_ip, host_ip).encode()
    _write_items(root, data, None, 0o644)


def _write_projected(root: Path, pod: dict, source: dict, objects: ObjectCache, kube: Kube,
                     pod_ip: str, host_ip: str) -> None:
    meta = pod["metadata"]
    if "serviceAccountToken" in source:
        sat = source["serviceAccountToken"]
        sa = pod["spec"].get("serviceAccountName") or "default"
        req = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
            "audiences": [sat["audience"]] if sat.get("audience") else [],
            "expirationSeconds": sat.get("expirationSeconds", 3607),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]}}}
        token = kube.create(f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{sa}/token", req)
        _write_items(root, {"t": token["status"]["token"].encode()}, [{"key": "t", "path": sat["path"]}], 0o600)
    elif "downwardAPI" in source:
        _write_downward(root, pod, source["downwardAPI"].get("items") or [], pod_ip, host_ip)
    else:
        kind, src = ("Secret", source["secret"]) if "secret" in source else ("ConfigMap", source["configMap"])
        _write_items(root, objects.data(kind, src["name"], src.get("optional", False)), src.get("items"), 0o644)


def container_mounts(container: dict, volumes: dict[str, Path]) -> list[dict[str, Any]]:
    """Bind mounts for one container, parents before children."""
    mounts = []
    for vm in container.get("volumeMounts") or []:
        if vm["name"] not in volumes:
            raise ConfigError(f"volumeMount {vm['mountPath']!r} names unknown volume {vm['name']!r}")
        source = volumes[vm["name"]]
        if vm.get("subPath"):
            source = source / vm["subPath"]
            if not source.exists():
                source.mkdir(parents=True)
        mounts.append({"source": str(source), "target": vm["mountPath"], "readOnly": bool(vm.get("readOnly"))})
    return sorted(mounts, key=lambda m: m["target"].rstrip("/").count("/"))


def pod_hostname(pod: dict) -> tuple[str, str]:
    """(hostname, subdomain) as a kubelet sets them: `spec.hostname`, else the pod name cut to 63
    characters (the Job controller sets `<job>-<index>` for Indexed Jobs); `spec.subdomain` or ''."""
    spec = pod.get("spec") or {}
    return spec.get("hostname") or pod["metadata"]["name"][:63], spec.get("subdomain") or ""


def hosts_file(pod: dict, pod_ip: str, services: dict[tuple[str, str], str]) -> str:
    """/etc/hosts for one pod: itself (with its FQDN when it has a subdomain, as a kubelet writes it),
    then Services and pod records `<hostname>.<subdomain>` of headless Services (see
    `NodeAgent.service_ips`); short names only in the pod's own namespace, as its DNS search path does."""
    namespace = pod["metadata"]["namespace"]
    host, subdomain = pod_hostname(pod)
    # `localhost` is the pod itself, as in its own network namespace: here, its own IP (pods
    # share the host's namespace, so 127.0.0.1 would be every pod's and the host's at once).
    lines = [f"{pod_ip}\tlocalhost", "::1\tip6-localhost ip6-loopback",
             f"{pod_ip}\t{host}.{subdomain}.{namespace}.svc.cluster.local\t{host}" if subdomain
             else f"{pod_ip}\t{host}"]
    for (ns, svc), ip in sorted(services.items()):
        names = [f"{svc}.{ns}", f"{svc}.{ns}.svc", f"{svc}.{ns}.svc.cluster.local"]
        if ns == namespace:
            names.insert(0, svc)
        lines.append(f"{ip}\t{' '.join(names)}")
    return "\n".join(lines) + "\n"


def write_in_place(path: Path, text: str) -> bool:
    """Rewrites a bind-mounted file keeping its inode (a rename would detach running pods' view)."""
    try:
        if path.read_text() == text:
            return False
    except FileNotFoundError:
        pass
    with open(path, "r+" if path.exists() else "w") as f:
        f.seek(0)
        f.write(text)
        f.truncate()
    os.chmod(path, 0o644)
    return True
