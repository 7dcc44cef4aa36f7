"""The ``bitcliff`` command line: cliff (the main job), assets, quantize, eval, sweep, diagnose, repair, study.

Every command checks its arguments before doing any work, and every failure ends with one line
that names what is wrong (exit status 2; 1 for a full disk or another failure of the machine,
130 for Ctrl-C, which also says what was kept and how to go on).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import threading

from bitcliff import numerics

# Nothing heavy above: the commands' modules import torch and transformers (seconds), and a Ctrl-C
# in that time must end with one line, not an import traceback (see :func:`main`).


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command (importing their modules, and with them torch)."""
    from bitcliff.cli import assets, cliff, diagnose, evaluate, quantize, repair, study
    from bitcliff.cli.common import HelpFormatter

    parser = argparse.ArgumentParser(
        prog="bitcliff", formatter_class=HelpFormatter,
        description="Low-bit (2/3/4-bit) quantization of LLMs: quantize, evaluate, and diagnose why a "
                    "quantized model breaks.  Run `bitcliff COMMAND --help` for a command's options.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    cliff.add_parser(sub)
    assets.add_parser(sub)
    quantize.add_parser(sub)
    evaluate.add_parsers(sub)
    diagnose.add_parser(sub)
    repair.add_parser(sub)
    study.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` (default: this process's arguments); returns the exit status.

    Pins the CPU paths first (:func:`bitcliff.numerics.pin`): importing bitcliff computes
    nothing, so this comes before torch's first CPU operation and every command gives the same
    bytes on any thread count and x86 machine; the processes a command starts inherit the pin.
    """
    numerics.pin()
    with interrupt_quietly_while_starting():
        parser = build_parser()
        from bitcliff.cli.common import device_from_args
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for a command that starts its own ranks
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    prefix = f"bitcliff {args.command}"
    try:
        if hasattr(args, "device"):
            args.device = device_from_args(args)
        return args.func(args)
    except KeyboardInterrupt:
        hint = getattr(args, "interrupted_hint", None)  # a text, or a function that looks at what was kept
        hint = (hint() if callable(hint) else hint) or "nothing half-written was left behind (outputs are written atomically)"
        print(f"\n{prefix}: interrupted; {hint}", file=sys.stderr)
        return 130
    except (ValueError, FileExistsError, FileNotFoundError, RuntimeError) as exc:
        print(f"{prefix}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            print(f"{prefix}: error: no space left on device ({exc}); the output is written to a temporary "
                  "folder and renamed only when complete, so nothing was left behind", file=sys.stderr)
        else:
            print(f"{prefix}: error: {exc}", file=sys.stderr)
        return 1


def on_interrupt_while_starting(signum=None, frame=None) -> None:
    """Ctrl-C before any command started: one line and exit status 130, at once.  Nothing was
    written yet, and exiting without unwinding skips a traceback through whatever library was
    importing (torch alone prints some 60 lines)."""
    sys.stderr.write("\nbitcliff: interrupted while starting; nothing was done\n")
    sys.stderr.flush()
    os._exit(130)


class interrupt_quietly_while_starting:
    """Install :func:`on_interrupt_while_starting` for SIGINT, and put the previous handler back on
    exit (a command's own Ctrl-C handling says what it kept).  Only the main thread may set
    signal handlers; elsewhere (a caller's worker thread) this does nothing."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, on_interrupt_while_starting)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


if __name__ == "__main__":
    sys.exit(main())
