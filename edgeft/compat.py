"""What the running Python can be trusted with, checked by feature rather than by version number.

``tarfile``: ``bench --remote`` unpacks the device's results (a tar stream another machine wrote).
``extractall(filter="data")`` keeps members inside the target folder only on a Python that has the
filter (3.10.12, 3.11.4, 3.12+) *and* the June 2025 fixes of its bypasses (CVE-2025-4517,
CVE-2025-4330, CVE-2025-4138, CVE-2024-12718, CVE-2025-4435: Python 3.9.23, 3.10.18, 3.11.13,
3.12.11, 3.13.4). pyproject's ``requires-python`` cannot say that (no single floor admits 3.11.13 but
not 3.12.0), and distributions backport the fixes without changing the version (Debian 12's and
Raspberry Pi OS's 3.11.2, say), so a version floor would both miss vulnerable builds and refuse fixed
ones. The fix for CVE-2025-4517 added ``os.path.ALLOW_MISSING`` (tarfile's filter calls ``realpath``
with it), which no unfixed Python has: its presence is the check.
"""

from __future__ import annotations

import os
import sys
import tarfile

TARFILE_ADVICE = (
    "this Python's tarfile lacks the 2025 fixes to extraction filters (CVE-2025-4517 and others; fixed in "
    "3.9.23, 3.10.18, 3.11.13, 3.12.11, 3.13.4): a tar from another machine could write outside its folder; "
    "upgrade Python"
)


def tarfile_is_safe() -> bool:
    """True when ``tarfile.extractall(..., filter="data")`` has the filter and its 2025 fixes."""
    return hasattr(tarfile, "data_filter") and hasattr(os.path, "ALLOW_MISSING")


def tarfile_warning() -> str | None:
    """A one-line warning naming this Python when :func:`tarfile_is_safe` is False, else None.

    For the code that extracts a tar another machine wrote (``bench --remote``): it decides whether
    to refuse or to warn; edgeft's own CI runs on a Python without the fixes, so it warns.
    """
    if tarfile_is_safe():
        return None
    return f"Python {sys.version.split()[0]}: {TARFILE_ADVICE}"
