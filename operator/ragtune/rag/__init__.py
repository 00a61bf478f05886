"""The RAG task contract that trainer and evaluators must agree on, importable without torch (the
slim operator image runs the online evaluator): records, the grounded-answer prompt and refusal,
and the quality metrics."""
