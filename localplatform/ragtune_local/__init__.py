"""The ragtune local platform: a real Kubernetes control plane, kwok, MinIO and a pod runner on loopback."""
