"""Where the command line's messages go: results to stdout, summaries and progress to stderr, library noise nowhere.

:class:`Out` decides from ``--quiet`` and whether stderr is a terminal;
:func:`native_output_hidden` keeps what libraries print at the C level (profiler
notices, the solver's banner) out of stdout, so that it holds only results.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from collections.abc import Iterator

__all__ = ["Out", "native_output_hidden", "write_plot"]

#: What flushing or asking a stream for its file descriptor raises when it has none
#: or is closed (``io.UnsupportedOperation`` is both an OSError and a ValueError).
_STREAM_ERRORS = (OSError, ValueError, AttributeError)


class Out:
    """Where messages go: results to stdout, summaries and progress to stderr."""

    def __init__(self, quiet: bool):
        #: ``--quiet``: no summary and no progress.
        self.quiet = quiet
        err = sys.stderr
        #: Progress lines show only on a terminal and without ``--quiet``.
        self.progress = not quiet and hasattr(err, "isatty") and err.isatty()

    def say(self, msg: str) -> None:
        """A summary line (stderr), unless --quiet."""
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def step(self, msg: str) -> None:
        """A progress line: only on a terminal and without --quiet."""
        if self.progress:
            print(f"[planner] {msg}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Run library code: what it prints at the C level (profiler notices, the
        solver's banner) goes to a scratch file, so stdout holds only results;
        Python-level output goes to stderr on a terminal, nowhere otherwise."""
        with native_output_hidden(keep_python_stderr=self.progress):
            yield


def _flush(*streams) -> None:
    for s in streams:
        with contextlib.suppress(*_STREAM_ERRORS):
            s.flush()


def _is_fd2(stream) -> bool:
    try:
        return stream.fileno() == 2
    except _STREAM_ERRORS:
        return False


@contextlib.contextmanager
def native_output_hidden(*, keep_python_stderr: bool) -> Iterator[None]:
    """File descriptors 1 and 2 go to a scratch file; ``sys.stdout`` goes to
    ``sys.stderr``, which keeps writing to the real stderr when ``keep_python_stderr``
    and goes nowhere otherwise. Without real file descriptors, nothing changes."""
    py_out, py_err = sys.stdout, sys.stderr
    _flush(py_out, py_err)
    try:
        saved = os.dup(1), os.dup(2)
    except OSError:  # no real file descriptors (embedded interpreters)
        yield
        return
    visible = None
    err_is_fd2 = _is_fd2(py_err)
    with tempfile.TemporaryFile() as scratch:
        try:
            if keep_python_stderr:
                if err_is_fd2:  # sys.stderr would follow fd 2 into the scratch file
                    encoding = getattr(py_err, "encoding", None) or "utf-8"
                    visible = os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding=encoding)
                    sys.stderr = visible
            else:
                sys.stderr = io.StringIO()
            sys.stdout = sys.stderr
            os.dup2(scratch.fileno(), 1)
            os.dup2(scratch.fileno(), 2)
            yield
        finally:
            _flush(sys.stdout, sys.stderr)
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sys.stdout, sys.stderr = py_out, py_err
            if visible is not None:
                visible.close()


def write_plot(ax, path: str, out: Out) -> None:
    """Save the figure of ``ax`` to ``path`` and say so."""
    ax.figure.savefig(path, dpi=120)
    out.say(f"wrote {path}")
