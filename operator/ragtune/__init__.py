"""ragtune: fine-tune RAG generators on Kubernetes and roll out LoRA adapters behind gates."""

__version__ = "0.1.0"
