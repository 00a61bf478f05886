"""Fake GPU nodes simulated by kwok (scheduling and scale tests where pods need not really run)."""

from __future__ import annotations

from .kubeclient import ApiError, Kube

FAKE_ANNOTATION = "kwok.x-k8s.io/node"
FAKE_TAINT = {"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}
GPU_RESOURCE = "nvidia.com/gpu"
FAKE_TOLERATION = {"key": "kwok.x-k8s.io/node", "operator": "Equal", "value": "fake", "effect": "NoSchedule"}
"""What a pod needs to land on a fake node."""


def gpu_node(name: str, gpus: int = 8, cpu: str = "64", memory: str = "512Gi") -> dict:
    capacity = {"cpu": cpu, "memory": memory, "pods": "110", GPU_RESOURCE: str(gpus)}
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "annotations": {FAKE_ANNOTATION: "fake"},
                     "labels": {"type": "kwok", "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                                "kubernetes.io/arch": "amd64", "nvidia.com/gpu.present": "true"}},
        "spec": {"taints": [FAKE_TAINT]},
        "status": {"capacity": capacity, "allocatable": capacity},
    }


def create_gpu_nodes(kube: Kube, count: int, gpus: int = 8, prefix: str = "kwok-gpu") -> list[str]:
    """Creates `<prefix>-0..count-1` (existing ones are kept); kwok makes them Ready."""
    names = []
    for i in range(count):
        name = f"{prefix}-{i}"
        try:
            kube.create("/api/v1/nodes", gpu_node(name, gpus))
        except ApiError as exc:
            if exc.status != 409:
                raise
        names.append(name)
    return names
