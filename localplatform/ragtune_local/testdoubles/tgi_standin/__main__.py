"""`python -m ragtune_local.testdoubles.tgi_standin` (what the local pod runner runs for the TGI image)."""

import sys

from .server import main

sys.exit(main())
