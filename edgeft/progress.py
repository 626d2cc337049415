"""Terminal feedback for long steps (rich), kept out of the library: the CLI passes these in."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def stage_printer() -> Callable[[str, str], None]:
    """Prints one line per stage: started, finished (with wall time) or reused from cache."""
    started: dict[str, float] = {}

    def on_stage(stage: str, status: str) -> None:
        if status == "start":
            started[stage] = time.perf_counter()
            click.echo(f"[{stage}] running…", err=True)
        else:
            secs = time.perf_counter() - started.get(stage, time.perf_counter())
            click.echo(
                f"[{stage}] {'cached, nothing to do' if status == 'cached' else f'done in {secs:.1f}s'}", err=True
            )

    return on_stage


@contextlib.contextmanager
def rich_progress() -> Iterator[Callable[[str, int], Callable[[], None]]]:
    """Yields a factory ``(description, total) -> advance`` backed by one rich Progress display."""
    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=not console.is_terminal,
        disable=not sys.stderr.isatty(),
    ) as bar:

        def factory(description: str, total: int) -> Callable[[], None]:
            task = bar.add_task(description, total=total)
            return lambda: bar.advance(task)

        yield factory
