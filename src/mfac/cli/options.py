"""Options of the commands: each command's own option set (a dataclass, like the library's
method configs) plus the options of its methods, read from the library's registries.

Flags, YAML recipe keys, the coercion of strings and the option tables of docs/cli.md are all
derived from these fields. A recipe key is a long option with ``_`` or ``-``
(``num_grads: 128`` is ``--num-grads 128``); precedence: defaults < recipe < command line.
YAML 1.1 loaders (PyYAML) read ``1e-5`` as the *string* "1e-5", so numbers accept numeric
strings and refuse anything else by name.
"""

from __future__ import annotations

import argparse
import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._config import Option, Options, default_text, markdown_table, option, options_of
from ..prune import REGISTRY
from ..prune.patterns import parse_pattern
from ..recovery.options import CONFIGS
from .common import CLIError, require

#: ``mfac prune``'s default method: the transformer preset for a Hugging Face model (the best
#: measured on SmolLM2, docs/prune.md section 2b), the M-FAC pruner for any other model.
HF_METHOD = "fisher-sparsegpt"
OTHER_METHOD = "mfac"


def default_method(model: str | None) -> str:
    """The method ``mfac prune`` uses when none is given, from the ``--model`` spec alone (a
    folder with a config.json is a Hugging Face model)."""
    if model and (Path(model).expanduser() / "config.json").is_file():
        return HF_METHOD
    return OTHER_METHOD


@dataclass(frozen=True, kw_only=True)
class InputOptions(Options):
    """Model and data options shared by ``prune`` and ``train``."""

    model: str | None = option(
        None, "a Hugging Face model folder, or a factory 'package.module:function' or "
        "'path/to/file.py:function'", required=True,
    )  # fmt: skip
    checkpoint: Path | None = option(None, "weights to load (.safetensors or torch .pt)")
    data: Path | None = option(
        None, "text file/folder, image folder (one sub-folder per class), .npz or .csv",
        required=True,
    )  # fmt: skip
    val_data: Path | None = option(
        None, "held-out data, same format as --data (default: a --val-fraction slice of it)"
    )
    data_kind: str = option(
        "auto", "how to read --data", choices=("auto", "text", "images", "tabular")
    )
    task: str = option(
        "auto", "tabular/image targets", choices=("auto", "classification", "regression")
    )
    batch_size: int = option(32, "samples per batch", low=1)
    seq_len: int = option(128, "tokens per sequence (text data)", low=2)
    image_size: int | None = option(None, "resize images to this square size", low=1)
    val_fraction: float = option(
        0.1, "share of --data held out for the metric (without --val-data)",
        low=0, high=1, low_open=True, high_open=True,
    )  # fmt: skip
    device: str = option("cpu", "cpu, cuda, cuda:N, mps or auto")
    seed: int = option(0, "random seed", low=0)
    threads: int | None = option(
        None, "CPU threads for torch (torch.set_num_threads; default: torch's choice)", low=1
    )


@dataclass(frozen=True, kw_only=True)
class PruneCommand(InputOptions):
    """``mfac prune``; the chosen method's own options come from its config."""

    output: Path = option(Path("mfac-prune-out"), "output folder", short="-o")
    method: str | None = option(
        None, f"pruning method (default: {HF_METHOD}, the transformer preset, for a Hugging "
        f"Face model; {OTHER_METHOD} otherwise)", choices=tuple(REGISTRY),
    )  # fmt: skip
    batch_size: int | None = option(
        None, "samples per calibration batch or gradient, and per evaluation batch (default: "
        "one token window per calibration batch for text, as the measured recipe; 32 "
        "otherwise)", low=1,
    )  # fmt: skip
    sparsity: float | None = option(
        None, "fraction of prunable weights to remove (default 0.5; with --pattern, what the "
        "pattern removes)", low=0, high=1, high_open=True,
    )  # fmt: skip
    pattern: str | None = option(None, "'N:M' semi-structured pattern (e.g. 2:4)")
    memory_budget_gb: float | None = option(
        None, "RAM for the m x d gradient buffer; past it the buffer is paged to disk",
        low=0, low_open=True,
    )  # fmt: skip
    gradual_steps: int = option(1, "prune over this many cubic-schedule steps", low=1)
    finetune_steps: int = option(0, "Adam steps after each gradual step, masks held", low=0)
    finetune_lr: float = option(1e-4, "Adam learning rate of --finetune-steps", low=0)
    random_weights: bool = option(
        False, "allow pruning without --checkpoint (the factory's initial weights)"
    )
    sparse_file: bool = option(
        False, "also write model.sparse.safetensors: kept values and 1-bit masks (smaller on "
        "disk, no faster; read with mfac.prune.read_sparse)",
    )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class TrainCommand(InputOptions):
    """``mfac train``."""

    output: Path = option(Path("mfac-train-out"), "output folder", short="-o")
    optimizer: str = option("mfac", "optimizer", choices=("mfac", "sgd", "adam"))
    epochs: int = option(1, "total epochs (a resumed run continues up to this)", low=1)
    max_steps: int | None = option(None, "stop after this many optimizer steps in total", low=1)
    lr: float = option(1e-3, "learning rate", low=0)
    ngrads: int = option(64, "M-FAC gradient window m", low=1)
    damp: float = option(1e-4, "M-FAC damping (absolute)", low=0, low_open=True)
    momentum: float = option(0.0, "momentum", low=0, high=1, high_open=True)
    weight_decay: float = option(0.0, "weight decay", low=0)
    masks: Path | None = option(None, "masks.safetensors (or a 'mfac prune' folder) to keep")
    resume: Path | None = option(None, "checkpoint.pt to continue from (exact resume)")
    overwrite: bool = option(False, "replace an earlier run in --output (without --resume)")
    save_every: int = option(0, "also checkpoint every N steps (0: epoch ends only)", low=0)


@dataclass(frozen=True, kw_only=True)
class RecoverCommand(Options):
    """``mfac recover``; the chosen solver's own options come from its config."""

    data: Path | None = option(
        None, ".npz holding A and y (optionally x_true), or A as .npy", required=True
    )
    y: Path | None = option(None, "y as .npy (when --data is A as .npy)")
    k: int | None = option(None, "sparsity budget: nonzeros allowed", low=1, required=True)
    method: str = option("iobs", "solver", choices=tuple(CONFIGS))
    loss: str = option("least_squares", "objective", choices=("least_squares", "logistic"))
    max_iter: int = option(500, "iteration budget", low=1)
    tol: float = option(1e-10, "relative-change stopping tolerance", low=0)
    output: Path = option(Path("mfac-recover-out"), "output folder", short="-o")
    threads: int | None = option(
        None, "CPU threads for torch (torch.set_num_threads; default: torch's choice)", low=1
    )


def method_configs(command: str) -> dict[str, type[Options]]:
    """Method name -> option set, from the library's registry for ``command``."""
    if command == "prune":
        return {name: m.config for name, m in REGISTRY.items()}
    return dict(CONFIGS) if command == "recover" else {}


COMMANDS: dict[str, type[Options]] = {
    "prune": PruneCommand,
    "train": TrainCommand,
    "recover": RecoverCommand,
}


def _cli(cls: type[Options]) -> dict[str, Option]:
    return {o.name: o for o in options_of(cls) if o.spec.cli}


def method_options(command: str) -> dict[str, tuple[Option, dict[str, Any]]]:
    """Every method option of ``command``: name -> (its first declaration, {method taking it:
    its default there, as help and docs show it})."""
    out: dict[str, tuple[Option, dict[str, str]]] = {}
    for method, cls in method_configs(command).items():
        for name, o in _cli(cls).items():
            out.setdefault(name, (o, {}))[1][method] = default_text(o, o.default)
    return out


# ----------------------------------------------------------------------------- coercion
_BOOL = dict.fromkeys(("true", "yes", "on", "1"), True)
_BOOL |= dict.fromkeys(("false", "no", "off", "0"), False)


def coerce(o: Option, value: Any, where: str) -> Any:
    """A command-line string or a YAML value as the option's type, or a CLIError naming
    ``where`` (``--sparsity`` or ``recipe.yaml: sparsity``)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in o.spec.null_words):
        if o.nullable and not o.spec.required:
            return None
        raise CLIError(f"{where}: a value is required")
    kind = o.kind
    if kind in ("int", "float"):
        return _number(o, value, where)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower() if isinstance(value, (str, int)) else None
        if word not in _BOOL:
            raise CLIError(f"{where}: expected true or false, got {value!r}")
        return _BOOL[word]
    if kind == "list":
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        if isinstance(value, Sequence):
            return tuple(str(v) for v in value)
        raise CLIError(f"{where}: expected a list of names, got {value!r}")
    if isinstance(value, (dict, list)):
        raise CLIError(f"{where}: expected a single value, got {value!r}")
    text = str(value).strip()
    if kind == "choice" and text not in o.spec.choices:
        hint = difflib.get_close_matches(text, o.spec.choices, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise CLIError(f"{where}: {text!r} is not {o.spec.bounds()}{extra}")
    if kind == "path":
        return Path(text).expanduser()
    if o.name == "pattern":  # the library's parser: one definition of what a pattern is
        try:
            nm = parse_pattern(text)
        except (TypeError, ValueError) as err:
            raise CLIError(f"{where}: {err}") from None
        return None if nm is None else f"{nm[0]}:{nm[1]}"
    return text


def _number(o: Option, value: Any, where: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise CLIError(f"{where}: expected a number, got {value!r}")
    try:
        num = float(value.strip()) if isinstance(value, str) else value
    except ValueError:
        raise CLIError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(float(num)):
        raise CLIError(f"{where}: expected a finite number, got {value!r}")
    if o.kind == "int":
        if float(num) != int(num):
            raise CLIError(f"{where}: expected a whole number, got {value!r}")
        num = int(num)
    else:
        num = float(num)
    if not o.spec.inside(num):
        raise CLIError(f"{where}: must be {o.spec.bounds()}, got {value!r}")
    return num


# ----------------------------------------------------------------------------- argparse glue
def _help(o: Option, methods: dict[str, str] | None = None) -> str:
    bounds = o.spec.bounds() if o.kind not in ("choice", "bool") else ""
    parts = [o.spec.help.replace("%", "%%"), f"[{bounds}]" if bounds else ""]
    if methods is not None:  # "(mfac, mfac-exact: 128; sparsegpt: 32)"
        groups: dict[str, list[str]] = {}
        for method, default in methods.items():
            groups.setdefault(default, []).append(method)
        parts.append("(" + "; ".join(f"{', '.join(m)}: {d}" for d, m in groups.items()) + ")")
    elif o.default is not None and not o.spec.required:
        parts.append(f"(default: {o.default})")
    return " ".join(p for p in parts if p)


def _add(group: Any, o: Option, methods: dict[str, str] | None = None) -> None:
    names = [o.flag] + ([o.spec.short] if o.spec.short else [])
    kw: dict[str, Any] = {"dest": o.name, "default": None, "help": _help(o, methods)}
    if o.kind == "bool":
        kw["action"] = argparse.BooleanOptionalAction
    elif o.kind == "choice":
        kw["metavar"] = "{" + ",".join(o.spec.choices) + "}"
    elif o.kind == "list":
        kw.update(nargs="+", metavar="NAME")
    else:
        kw["metavar"] = {"int": "N", "float": "X", "path": "PATH"}.get(o.kind, "VALUE")
    group.add_argument(*names, **kw)


def add_options(parser: argparse.ArgumentParser, command: str) -> None:
    """One long option per field of the command and of its methods; values stay strings (or
    None) until :func:`resolve`."""
    group = parser.add_argument_group("options (also valid as keys of a --recipe YAML file)")
    for o in _cli(COMMANDS[command]).values():
        _add(group, o)
    extra = method_options(command)
    if extra:
        title = "options of the methods (each applies to the methods its help names; " \
            "defaults per method in parentheses)"
        group = parser.add_argument_group(title)
        for o, methods in extra.values():
            _add(group, o, methods)
    parser.add_argument(
        "--recipe", metavar="YAML", default=None,
        help="read options from a YAML recipe (command-line options win)",
    )  # fmt: skip


def load_recipe(path: str | Path, known: Sequence[str], command: str) -> dict[str, Any]:
    """A YAML recipe as a mapping of known keys (values still raw)."""
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
        raise CLIError(f"{p.name}: a recipe must be a mapping of option: value")
    out = {}
    for key, value in raw.items():
        name = str(key).strip().replace("-", "_")
        if name not in known:
            hint = difflib.get_close_matches(name, known, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise CLIError(
                f"{p.name}: unknown key {key!r} for 'mfac {command}'{extra}; "
                f"known keys: {', '.join(sorted(known))}"
            )
        out[name] = (value, f"{p.name}: {name}")
    return out


@dataclass
class Resolved:
    """The command's options, the chosen method's options, those set but not used, and the
    names set explicitly (recipe or command line)."""

    command: Any
    method: dict[str, Any]
    ignored: list[str]
    given: set[str]


def resolve(args: argparse.Namespace, command: str, *, strict: bool) -> Resolved:
    """defaults < recipe < command line, every value coerced and validated. A method option
    that the chosen method does not take is refused (``strict``) or reported as ignored."""
    own = _cli(COMMANDS[command])
    extra = method_options(command)
    raw: dict[str, tuple[Any, str]] = {}
    if getattr(args, "recipe", None):
        raw.update(load_recipe(args.recipe, [*own, *extra], command))
    for name in [*own, *extra]:
        given = getattr(args, name, None)
        if given is not None:
            raw[name] = (given, own[name].flag if name in own else extra[name][0].flag)
    values = {n: coerce(own[n], *raw[n]) for n in own if n in raw}
    for o in own.values():
        if o.spec.required and values.get(o.name) is None:
            raise CLIError(f"missing required option {o.flag} (or '{o.name}:' in a --recipe)")
    if command == "prune" and values.get("method") is None:
        values["method"] = default_method(values.get("model"))
    cmd = COMMANDS[command](**values)
    chosen = getattr(cmd, "method", None)
    accepted = _cli(method_configs(command)[chosen]) if chosen else {}
    method: dict[str, Any] = {}
    ignored = []
    for name, (o, methods) in extra.items():
        if name not in raw:
            continue
        if name in accepted:
            method[name] = coerce(accepted[name], *raw[name])
        elif strict:
            raise CLIError(f"{o.flag} applies to method {' / '.join(methods)}, not {chosen}")
        else:
            ignored.append(name)
    return Resolved(cmd, method, ignored, set(raw))


# ----------------------------------------------------------------------------- docs
def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def docs_tables() -> str:
    """The option tables of docs/cli.md (between its ``options:begin/end`` markers)."""
    out = [
        "### Methods of `mfac prune`", "",
        f"Default: `{HF_METHOD}` for a Hugging Face model, `{OTHER_METHOD}` for any other.", "",
        "| method | what it does |", "|---|---|",
        *(f"| `{name}` | {_cell(m.summary)} |" for name, m in REGISTRY.items()),
        "",
    ]  # fmt: skip
    for command, cls in COMMANDS.items():
        out += [f"### Keys of `mfac {command}`", "", markdown_table(options_of(cls)), ""]
        for method, config in method_configs(command).items():
            doc = (config.__doc__ or "").strip().splitlines()[0]
            out += [f"#### `--method {method}`", "", doc, "", markdown_table(options_of(config))]
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def write_docs(path: str | Path = "docs/cli.md") -> None:
    """Regenerate the tables in docs/cli.md from the option sets."""
    p = Path(path)
    text = p.read_text()
    head, _, rest = text.partition("<!-- options:begin -->\n")
    _, _, tail = rest.partition("<!-- options:end -->")
    p.write_text(f"{head}<!-- options:begin -->\n{docs_tables()}<!-- options:end -->{tail}")
