"""TEST DOUBLE: a TGI-protocol stand-in for tests and the local platform.

TGI needs a GPU; this serves the same HTTP protocol subset ragtune relies on, with real
transformers + peft inference on CPU, and reads its configuration like TGI does:
`MODEL_ID` (a local path here), `LORA_ADAPTERS` (`name=/path,...`), `PORT`, `HOSTNAME`.
It copies TGI's observable behaviour that matters to the operator: the port opens only after
the weights and every adapter are loaded, and an unknown `adapter_id` silently falls back to
the base model with 200. It is not a production server.
"""
