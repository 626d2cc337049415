"""How many threads a test's runtimes use.

Two, except under pytest-xdist, where conftest pins each worker to a core of its own: a runtime
asking for two threads there would put two busy threads on one core, and llama.cpp's threads spin
while they wait for each other (measured: a build's answers ran about ten times slower).
"""

from __future__ import annotations

from edgeft.machine import usable_cores

THREADS = min(2, usable_cores())
