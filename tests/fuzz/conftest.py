"""Fuzz tests: hypothesis over every decoder hyphae runs on bytes it did not produce.

Example counts stay moderate in the suite. For a long campaign:
``HYPHAE_FUZZ_EXAMPLES=20000 pytest tests/fuzz tests/unit -k fuzz`` (each ``FUZZ``-decorated test
then runs that many examples).
"""

import os

from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("HYPHAE_FUZZ_EXAMPLES", "0"))

settings.register_profile("fuzz-campaign", max_examples=EXAMPLES or 100, deadline=None,
                          suppress_health_check=list(HealthCheck))
