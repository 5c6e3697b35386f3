"""cuattn's benchmarks: programs whose results are data (JSON), tables and plots made
from it. Run one with ``python -m cuattn bench <name>`` (or ``python -m bench.<name>``
from a checkout)."""
