"""Progress bars that help at a terminal and stay quiet in logs (KFP pods, CI, piped output)."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm


def interactive() -> bool:
    return sys.stderr.isatty()


def progress(iterable: Any = None, **kwargs: Any) -> tqdm:
    """``tqdm`` refreshing 10x a second on a terminal, every 30 s on a pipe (a few lines per epoch)."""
    kwargs.setdefault("mininterval", 0.1 if interactive() else 30.0)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, **kwargs)


def close_bars() -> None:
    """Close the bars a failure left open (tqdm keeps a set of them), so that the error line after them starts a
    line of its own instead of trailing a half-drawn bar."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def quiet_datasets() -> None:
    """``datasets`` draws a bar per map/cast/save; keep them only at a terminal."""
    if not interactive():
        import datasets

        datasets.disable_progress_bars()
