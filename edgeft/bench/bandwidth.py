"""Memory read bandwidth and the decode-speed ceiling it implies.

Decoding one token of a small model reads every weight once, so on CPUs it is bound by memory
bandwidth: ``bandwidth / bytes_per_token`` tokens/s is an upper bound (a roofline), projected,
not measured. Comparing it with a measured decode speed says how much of the machine a runtime
uses. The bound ignores KV-cache reads and activations, so it is optimistic for long contexts.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import ConfigError
from .stats import spread


def measure_read_bandwidth(threads: int, size_mb: int = 256, repeats: int = 5) -> dict:
    """Memory read bandwidth in GB/s (1e9 bytes), measured by summing a ``size_mb`` MiB array
    split across ``threads`` threads, after one warm-up pass.

    int64 sums are vectorised, need no conversion and release the GIL, so the threads run in
    parallel. Pick ``size_mb`` well above the last-level cache or the figure is cache bandwidth.
    """
    if threads < 1 or size_mb < 1 or repeats < 1:
        raise ConfigError(f"need threads, size_mb and repeats >= 1, got {threads}, {size_mb}, {repeats}")
    # ones, not zeros: np.zeros maps untouched pages to the shared zero page, which is never read
    # from memory.
    data = np.ones(size_mb * 2**20 // 8, dtype=np.int64)
    chunks = np.array_split(data, threads)
    speeds = []
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.sum, chunks))  # warm-up: page tables, thread start-up
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.sum, chunks))
            speeds.append(data.nbytes / (time.perf_counter() - start) / 1e9)
    return {"threads": threads, "size_mb": size_mb, "repeats": repeats, "read_gb_s": spread(speeds)}


def decode_roofline(bandwidth_gb_s: float, bytes_per_token: int) -> float:
    """Upper bound on decode tokens/s (projected, not measured): bandwidth over bytes read a token."""
    if bytes_per_token <= 0:
        raise ValueError(f"bytes_per_token must be positive, got {bytes_per_token}")
    return bandwidth_gb_s * 1e9 / bytes_per_token
