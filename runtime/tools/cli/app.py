"""The ``planner`` command's top level: parse the arguments, run the subcommand, turn what it raises into an exit status."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Sequence

from .checks import EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, CliError, first_line
from .output import Out
from .parse import parser

__all__ = ["main"]

#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    show_tb = "--traceback" in argv
    argv = [x for x in argv if x != "--traceback"]  # accepted anywhere on the line
    try:
        a = parser().parse_args(argv)
        if a.command is None:
            raise CliError("give a command: plan, show, sweep, batch, verify, targets or calibrate (see 'planner --help')")
        return a.run(a, Out(quiet=getattr(a, "quiet", False)))
    except CliError as e:
        print(f"planner: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("planner: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (`planner show plan.json | head`)
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else EXIT_OK
    except Exception as e:  # the command line's last resort: any other error is a bug, reported in one line
        if show_tb:
            traceback.print_exc()
        else:
            print(f"planner: unexpected error: {type(e).__name__}: {first_line(e)} (run again with --traceback for details)",
                  file=sys.stderr)
        return EXIT_INTERNAL
