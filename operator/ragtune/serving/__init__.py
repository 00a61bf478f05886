"""Serving: AdapterDeployment rendering (TGI), adapter resolution, the adapter fetcher and the online
evaluator (pod entry points), and the rollout state machine driven by the controller."""
