"""The RAG-contract tests render prompts with the trainer tests' tiny word-level tokenizer."""

from tests.trainer.conftest import records, tiny_model_dir, tiny_tokenizer  # noqa: F401
