"""Stage progress and summary lines on stderr, shared by both executors."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping

__all__ = ["BuildLog", "rate", "fmt_langs", "peak_rss_mb"]


class BuildLog:
    """Stage progress and one summary line per stage, on stderr.

    ``progress`` chooses how running stages show their progress: ``None`` (default) decides by where
    stderr goes: a terminal gets tqdm bars, a Jupyter notebook tqdm's notebook bars (``tqdm.auto``), and
    anything else (a log file, CI, a pipe) a plain line every ``log_every`` seconds while a stage runs
    (``tokenize 41,000/120,000 rec (34%), 1.9M tok/s encoding, 20s``), so logs get progress without
    carriage-return noise. ``True`` forces bars, ``False`` shows no progress (summary lines only).
    ``quiet`` silences everything but errors.
    """

    def __init__(self, *, quiet: bool = False, verbose: bool = False, progress: bool | None = None, stream=None,
                 log_every: float = 15.0):
        self.quiet = quiet
        self.verbose = verbose and not quiet
        self.stream = stream if stream is not None else sys.stderr
        self.log_every = log_every
        if progress is None:
            tty = bool(getattr(self.stream, "isatty", lambda: False)())
            mode = "bars" if tty or _in_notebook() else "lines"
        else:
            mode = "bars" if progress else "none"
        self.mode = "none" if quiet else mode
        self.progress = self.mode == "bars"

    def bar(self, desc: str, total: int | None = None, unit: str = "rec"):
        if self.mode == "lines":
            return _LogLines(self, desc, total, unit)
        if self.mode != "bars":
            return _NoBar()
        try:
            from tqdm.auto import tqdm
        except ImportError:  # bars are a nicety: without tqdm, progress lines
            return _LogLines(self, desc, total, unit)

        return tqdm(total=total, desc=f"{desc:<8}", unit=unit, unit_scale=True, file=self.stream, leave=False,
                    dynamic_ncols=True)

    def line(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.stream, flush=True)

    def detail(self, text: str) -> None:
        if self.verbose:
            print("         " + text, file=self.stream, flush=True)

    def stage(self, name: str, summary: str, seconds: float, cached: bool) -> None:
        how = "cached" if cached else f"{seconds:.1f}s"
        self.line(f"{name:<8} {summary} [{how}]")


def _in_notebook() -> bool:
    """Running in a Jupyter kernel (stderr is not a terminal there, but tqdm.auto draws notebook bars)."""
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


class _LogLines(_NoBar):
    """Progress as a plain line every ``log.log_every`` seconds (none for a stage that ends sooner)."""

    def __init__(self, log: BuildLog, desc: str, total: int | None, unit: str):
        self.log, self.desc, self.total, self.unit = log, desc, total, unit
        self.n, self.postfix = 0, ""
        self.t0 = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.log.log_every:
            self.last = now
            done = f"{self.n:,}/{self.total:,} {self.unit} ({self.n / self.total:.0%})" if self.total else \
                f"{self.n:,} {self.unit}"
            speed = self.postfix or rate(self.n, now - self.t0, self.unit).lstrip(", ")
            self.log.line(f"{self.desc:<8} {done}, {speed}, {now - self.t0:.0f}s")

    def set_postfix_str(self, s: str) -> None:
        self.postfix = s


def rate(n: float, seconds: float, unit: str) -> str:
    if seconds <= 0:
        return ""
    r = n / seconds
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if r >= scale:
            return f", {r / scale:.1f}{suffix} {unit}/s"
    return f", {r:.0f} {unit}/s"




def fmt_langs(counts: Mapping[str, int], limit: int = 6) -> str:
    items = sorted(counts.items(), key=lambda kv: -kv[1])
    text = " ".join(f"{k}:{v:,}" for k, v in items[:limit])
    return text + (f" +{len(items) - limit} more" if len(items) > limit else "")


def peak_rss_mb() -> float | None:
    """The process's peak resident memory so far, in MB (None where the platform does not say)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)  # bytes on macOS, KiB elsewhere
