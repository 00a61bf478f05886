"""RAG evaluation metrics shared by the trainer (offline) and the operator image (online canary)."""

from .metrics import DEFAULT_REFUSAL, is_refusal, parse_citations, score, strip_citations

__all__ = ["DEFAULT_REFUSAL", "is_refusal", "parse_citations", "score", "strip_citations"]
