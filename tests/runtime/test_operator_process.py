"""The operator process imports only what it runs on."""

import subprocess
import sys

CHECK = """
import sys
from ragtune.operator import OPTIONAL_CLIENTS_KOPF_PROBES, register_handlers
register_handlers()
import kopf  # noqa: F401
loaded = [n for n in OPTIONAL_CLIENTS_KOPF_PROBES if sys.modules.get(n) is not None]
print(",".join(loaded) or "-")
"""


def test_kopf_does_not_load_client_libraries_the_operator_never_passes_it():
    """kopf imports kubernetes_asyncio (~30 MB of generated models) when it is installed, as it is
    in the dev environment: the operator process must not pay for it."""
    import importlib.util

    assert importlib.util.find_spec("kubernetes_asyncio") is not None, "the dev environment has it (the teeth)"
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300, check=True)
    loaded = out.stdout.strip()
    assert loaded == "-", f"the operator process loaded {loaded}"
