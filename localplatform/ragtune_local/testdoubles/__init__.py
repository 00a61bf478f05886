"""TEST DOUBLES — not product code. What the local platform runs where no real part can run here:

- `tgi_standin`: a TGI-protocol stand-in (TGI needs a GPU): real transformers + peft inference
  behind TGI's HTTP API, checked against TGI's contract by tests/platform/test_tgi_standin.py;
- `fake_trainer`: a scripted trainer for the FineTuneJob controller tests (outcomes on demand);
- `tiny_models`: tiny random Llama models and LoRA adapters built from a config (no hub).

The demo and the benches use them; the operator and trainer never import them.
"""
