"""Serving tests: rendering, resolution, fetcher, online gate, rollout state machine, TGI stand-in, platform integration."""
