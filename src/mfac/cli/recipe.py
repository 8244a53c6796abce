"""Options shared by the command line and YAML recipes: one schema per command, coercion and
validation with clear messages.

A recipe is a YAML mapping whose keys are the command's long options with ``_`` or ``-``
(``num_grads: 128`` is ``--num-grads 128``). Options given on the command line override the
recipe, which overrides the defaults. YAML 1.1 loaders (PyYAML) read ``1e-5`` as the *string*
"1e-5"; numeric fields therefore accept numeric strings and reject anything else by name.
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import CLIError, require

PRUNE_METHODS = ("magnitude", "diag-fisher", "mfac", "mfac-exact", "sparsegpt", "iobs")
RECOVER_METHODS = ("iobs", "iht", "niht", "htp", "cosamp", "omp")
MISSING = object()


@dataclass(frozen=True)
class Field:
    """One option: its kind, default, bounds and help text."""

    name: str
    kind: str  # "float" | "int" | "str" | "bool" | "choice" | "path" | "list"
    default: Any = None
    help: str = ""
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    nullable: bool = True
    required: bool = False
    null_words: tuple[str, ...] = ("none", "null")
    short: str | None = None
    aliases: tuple[str, ...] = field(default_factory=tuple)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def describe(self) -> str:
        """The bounds in words, for help and error messages."""
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.low is None and self.high is None:
            return ""
        lo = "(" if self.low_open else "["
        hi = ")" if self.high_open else "]"
        if self.high is None:
            return f"> {self.low:g}" if self.low_open else f">= {self.low:g}"
        if self.low is None:
            return f"< {self.high:g}" if self.high_open else f"<= {self.high:g}"
        return f"in {lo}{self.low:g}, {self.high:g}{hi}"


def _f(name: str, kind: str, default: Any = None, help: str = "", **kw: Any) -> Field:
    return Field(name, kind, default, help, **kw)


# ----------------------------------------------------------------------------- schemas
INPUT_FIELDS = [
    _f(
        "model",
        "str",
        None,
        "a Hugging Face model folder, or a factory 'package.module:function' "
        "or 'path/to/file.py:function'",
        required=True,
        nullable=False,
    ),
    _f("checkpoint", "path", None, "weights to load into the model (.safetensors or torch .pt)"),
    _f(
        "data",
        "path",
        None,
        "text file/folder, image folder (one sub-folder per class), .npz or .csv",
        required=True,
        nullable=False,
    ),
    _f(
        "data_kind",
        "choice",
        "auto",
        "how to read --data",
        choices=("auto", "text", "images", "tabular"),
        nullable=False,
    ),
    _f(
        "task",
        "choice",
        "auto",
        "tabular/image targets: classification or regression",
        choices=("auto", "classification", "regression"),
        nullable=False,
    ),
    _f("batch_size", "int", 32, "samples per batch", low=1, nullable=False),
    _f("seq_len", "int", 128, "tokens per sequence (text data)", low=2, nullable=False),
    _f(
        "image_size",
        "int",
        None,
        "resize images to this square size (default: first image's)",
        low=1,
    ),
    _f(
        "val_fraction",
        "float",
        0.1,
        "share of the data held out to measure the metric",
        low=0.0,
        high=1.0,
        low_open=True,
        high_open=True,
        nullable=False,
    ),
    _f("device", "str", "cpu", "cpu, cuda, cuda:N, mps or auto", nullable=False),
    _f("seed", "int", 0, "random seed", low=0, nullable=False),
]

PRUNE_FIELDS = [
    *INPUT_FIELDS,
    _f("output", "path", "mfac-prune-out", "output folder", short="-o", nullable=False),
    _f("method", "choice", "mfac", "pruning method", choices=PRUNE_METHODS, nullable=False),
    _f(
        "sparsity",
        "float",
        0.5,
        "fraction of prunable weights to remove",
        low=0.0,
        high=1.0,
        high_open=True,
        nullable=False,
    ),
    _f("pattern", "str", None, "'N:M' semi-structured pattern (e.g. 2:4); default unstructured"),
    _f(
        "scope",
        "choice",
        "global",
        "one global budget or the same sparsity per layer",
        choices=("global", "layer"),
        nullable=False,
    ),
    _f("num_grads", "int", 64, "gradients m for the Fisher-based methods", low=1, nullable=False),
    _f(
        "block_size",
        "int",
        128,
        "Fisher block size ('full' or null: one block)",
        low=1,
        null_words=("none", "null", "full"),
    ),
    _f(
        "damp",
        "float",
        None,
        "damping (relative to the mean diagonal by default)",
        low=0.0,
        low_open=True,
    ),
    _f(
        "damp_mode",
        "choice",
        "relative",
        "how --damp is read",
        choices=("relative", "absolute"),
        nullable=False,
    ),
    _f("recompute", "int", 1, "recomputation sub-steps (mfac, mfac-exact)", low=1, nullable=False),
    _f("calib_batches", "int", 16, "calibration batches (sparsegpt, iobs)", low=1, nullable=False),
    _f("layers", "list", None, "only prune these layers (module names)"),
    _f("exclude", "list", None, "never prune these layers (module names)"),
    _f(
        "memory_budget_gb",
        "float",
        None,
        "RAM for the m x d gradient buffer (mfac, mfac-exact); past it the buffer is paged to disk",
        low=0.0,
        low_open=True,
    ),
    _f("spill_dir", "path", None, "folder for the paged gradient buffer (default: a temp dir)"),
    _f(
        "layer_groups",
        "int",
        None,
        "layers per separately built Fisher (mfac, mfac-exact; needs --scope layer or --pattern)",
        low=1,
    ),
    _f("iterations", "int", 3, "I-OBS iterations (iobs)", low=1, nullable=False),
    _f(
        "dense_steps", "int", 50, "dense optimizer steps per I-OBS iteration", low=0, nullable=False
    ),
    _f(
        "lr",
        "float",
        1e-4,
        "Adam learning rate of the I-OBS dense steps and of gradual fine-tuning",
        low=0.0,
        low_open=True,
        nullable=False,
    ),
    _f(
        "gradual_steps",
        "int",
        1,
        "prune over this many cubic-schedule steps (1: one-shot)",
        low=1,
        nullable=False,
    ),
    _f(
        "finetune_steps",
        "int",
        0,
        "Adam steps between gradual steps, masks held (with --gradual-steps > 1)",
        low=0,
        nullable=False,
    ),
]

TRAIN_FIELDS = [
    *INPUT_FIELDS,
    _f("output", "path", "mfac-train-out", "output folder", short="-o", nullable=False),
    _f("optimizer", "choice", "mfac", "optimizer", choices=("mfac", "sgd", "adam"), nullable=False),
    _f(
        "epochs",
        "int",
        1,
        "total epochs (a resumed run continues up to this)",
        low=1,
        nullable=False,
    ),
    _f("max_steps", "int", None, "stop after this many optimizer steps in total", low=1),
    _f("lr", "float", 1e-3, "learning rate", low=0.0, nullable=False),
    _f("ngrads", "int", 64, "M-FAC gradient window m", low=1, nullable=False),
    _f("damp", "float", 1e-4, "M-FAC damping (absolute)", low=0.0, low_open=True, nullable=False),
    _f("momentum", "float", 0.0, "momentum", low=0.0, high=1.0, high_open=True, nullable=False),
    _f("weight_decay", "float", 0.0, "weight decay", low=0.0, nullable=False),
    _f("masks", "path", None, "masks.safetensors (or a 'mfac prune' output folder) to keep"),
    _f("resume", "path", None, "checkpoint.pt to continue from (exact resume)"),
    _f(
        "save_every",
        "int",
        0,
        "also checkpoint every N steps (0: at epoch ends only)",
        low=0,
        nullable=False,
    ),
]

RECOVER_FIELDS = [
    _f(
        "data",
        "path",
        None,
        ".npz holding A and y (optionally x_true), or A as .npy",
        required=True,
        nullable=False,
    ),
    _f("y", "path", None, "y as .npy (when --data is A as .npy)"),
    _f("k", "int", None, "sparsity budget: nonzeros allowed", low=1, required=True, nullable=False),
    _f("method", "choice", "iobs", "solver", choices=RECOVER_METHODS, nullable=False),
    _f(
        "loss",
        "choice",
        "least_squares",
        "objective",
        choices=("least_squares", "logistic"),
        nullable=False,
    ),
    _f("max_iter", "int", 500, "iteration budget", low=1, nullable=False),
    _f("tol", "float", 1e-10, "relative-change stopping tolerance", low=0.0, nullable=False),
    _f("rule", "choice", None, "I-OBS support rule", choices=("topk", "saliency", "greedy")),
    _f("correction", "bool", None, "I-OBS: OBS correction of the kept weights"),
    _f(
        "step", "float", None, "step size (iobs eta; iht/htp absolute step)", low=0.0, low_open=True
    ),
    _f("step_scale", "float", None, "iht/htp: step as a multiple of 1/L", low=0.0, low_open=True),
    _f("damp", "float", None, "I-OBS Hessian damping", low=0.0),
    _f("output", "path", "mfac-recover-out", "output folder", short="-o", nullable=False),
]

#: Which solver takes which option (anything else is refused with a clear message).
SOLVER_OPTIONS = {
    "rule": ("iobs",),
    "correction": ("iobs",),
    "damp": ("iobs",),
    "step": ("iobs", "iht", "htp"),
    "step_scale": ("iht", "htp"),
}

SCHEMAS: dict[str, list[Field]] = {
    "prune": PRUNE_FIELDS,
    "train": TRAIN_FIELDS,
    "recover": RECOVER_FIELDS,
}


# ----------------------------------------------------------------------------- coercion
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def coerce(f: Field, value: Any, where: str) -> Any:
    """Convert a command-line string or a YAML value to the field's type, or raise CLIError.

    ``where`` names the source in messages: ``--sparsity`` or ``recipe.yaml: sparsity``.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in f.null_words):
        if f.nullable:
            return None
        raise CLIError(f"{where}: a value is required")
    if f.kind in ("float", "int"):
        return _number(f, value, where)
    if f.kind == "bool":
        if isinstance(value, bool):
            return value
        words = {
            "true": True,
            "yes": True,
            "on": True,
            "1": True,
            "false": False,
            "no": False,
            "off": False,
            "0": False,
        }
        if isinstance(value, (str, int)) and str(value).strip().lower() in words:
            return words[str(value).strip().lower()]
        raise CLIError(f"{where}: expected true or false, got {value!r}")
    if f.kind == "list":
        if isinstance(value, str):
            items = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, Sequence):
            items = [str(v) for v in value]
        else:
            raise CLIError(f"{where}: expected a list of names, got {value!r}")
        return items
    if isinstance(value, (dict, list)):
        raise CLIError(f"{where}: expected a single value, got {value!r}")
    text = str(value).strip()
    if f.kind == "choice":
        if text not in f.choices:
            hint = difflib.get_close_matches(text, f.choices, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise CLIError(f"{where}: {text!r} is not {f.describe()}{extra}")
        return text
    if f.kind == "path":
        return Path(text).expanduser()
    if f.name == "pattern":
        m = _NM.match(text)
        if not m or not 0 < int(m.group(1)) < int(m.group(2)):
            raise CLIError(f"{where}: expected 'N:M' with 0 < N < M (e.g. 2:4), got {text!r}")
        return f"{int(m.group(1))}:{int(m.group(2))}"
    return text


def _number(f: Field, value: Any, where: str) -> float | int:
    if isinstance(value, bool):
        raise CLIError(f"{where}: expected a number, got {value!r}")
    if isinstance(value, str):
        try:
            num: float | int = float(value.strip())  # "1e-5" from YAML 1.1 loaders
        except ValueError:
            raise CLIError(f"{where}: expected a number, got {value!r}") from None
    elif isinstance(value, (int, float)):
        num = value
    else:
        raise CLIError(f"{where}: expected a number, got {value!r}")
    if not math.isfinite(float(num)):
        raise CLIError(f"{where}: expected a finite number, got {value!r}")
    if f.kind == "int":
        if float(num) != int(num):
            raise CLIError(f"{where}: expected a whole number, got {value!r}")
        num = int(num)
    else:
        num = float(num)
    bad = (f.low is not None and (num < f.low or (f.low_open and num == f.low))) or (
        f.high is not None and (num > f.high or (f.high_open and num == f.high))
    )
    if bad:
        raise CLIError(f"{where}: must be {f.describe()}, got {value!r}")
    return num


# ----------------------------------------------------------------------------- argparse glue
def add_fields(parser: argparse.ArgumentParser, fields: list[Field]) -> None:
    """One long option per field; values stay strings (or None) until :func:`resolve`."""
    group = parser.add_argument_group("options (also valid as keys of a --recipe YAML file)")
    for f in fields:
        names = [f.flag] + ([f.short] if f.short else [])
        default = f"(default: {f.default})" if f.default is not None else ""
        bounds = f.describe()
        text = " ".join(
            s
            for s in (f.help, f"[{bounds}]" if bounds and f.kind != "choice" else "", default)
            if s
        )
        if f.kind == "bool":
            group.add_argument(
                *names, dest=f.name, default=None, action=argparse.BooleanOptionalAction, help=text
            )
        elif f.kind == "choice":
            group.add_argument(
                *names,
                dest=f.name,
                default=None,
                metavar="{" + ",".join(f.choices) + "}",
                help=text,
            )
        elif f.kind == "list":
            group.add_argument(
                *names, dest=f.name, default=None, nargs="+", metavar="NAME", help=text
            )
        else:
            metavar = {"int": "N", "float": "X", "path": "PATH"}.get(f.kind, "VALUE")
            group.add_argument(*names, dest=f.name, default=None, metavar=metavar, help=text)
    parser.add_argument(
        "--recipe",
        metavar="YAML",
        default=None,
        help="read options from a YAML recipe (command-line options win)",
    )


def load_recipe(path: str | Path, fields: list[Field], command: str) -> dict[str, Any]:
    """Read a YAML recipe: a mapping of known keys, values coerced and validated."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CLIError(f"recipe not found: {p}")
    yaml = require("yaml", "reading a YAML recipe", "pyyaml")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise CLIError(f"{p.name}: not valid YAML: {' '.join(str(err).split())}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CLIError(f"cannot read recipe {p}: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise CLIError(
            f"{p.name}: a recipe must be a mapping of option: value, got {type(raw).__name__}"
        )
    by_name = {f.name: f for f in fields}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).strip().replace("-", "_")
        f = by_name.get(name)
        if f is None:
            hint = difflib.get_close_matches(name, list(by_name), n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise CLIError(
                f"{p.name}: unknown key {key!r} for 'mfac {command}'{extra}; "
                f"known keys: {', '.join(sorted(by_name))}"
            )
        out[name] = coerce(f, value, f"{p.name}: {name}")
    return out


def resolve(args: argparse.Namespace, fields: list[Field], command: str) -> dict[str, Any]:
    """defaults < recipe < command line; every value validated; required keys checked."""
    values: dict[str, Any] = {f.name: f.default for f in fields}
    recipe = getattr(args, "recipe", None)
    if recipe:
        values.update(load_recipe(recipe, fields, command))
    for f in fields:
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = coerce(f, given, f.flag)
        elif f.default is not None and values[f.name] is f.default and f.kind == "path":
            values[f.name] = Path(f.default)
    for f in fields:
        if f.required and values.get(f.name) is None:
            raise CLIError(f"missing required option {f.flag} (or '{f.name}:' in a --recipe)")
    return values


def schema_markdown(command: str) -> str:
    """The recipe schema of one command as a Markdown table (used to write docs/cli.md)."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in SCHEMAS[command]:
        kind = f.kind if f.kind != "choice" else " \\| ".join(f.choices)
        bounds = f" ({f.describe()})" if f.describe() and f.kind != "choice" else ""
        req = " **required**" if f.required else ""
        rows.append(f"| `{f.name}` | {kind}{bounds} | {f.default} | {f.help}{req} |")
    return "\n".join(rows)
