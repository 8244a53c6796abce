"""Reading user data into tensors, and the loss/metric that go with the model.

Kinds: ``text`` (a .txt file or a folder of them; tokens from the model's tokenizer, or UTF-8
bytes), ``images`` (a folder with one sub-folder per class, read with Pillow), ``tabular``
(``.npz`` with X and y, or ``.csv`` with the label in a ``label``/``target``/``y`` column or the
last column). The data is split into a training part and a held-out part for the metric.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..experiments.tasks import Dataset
from .common import CLIError, existing_path, one_line, require
from .models import LoadedModel

log = logging.getLogger("mfac.cli")

IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
TEXT_EXT = {".txt", ".text", ".md", ".rst"}
X_KEYS = ("X", "x", "inputs", "features", "data")
Y_KEYS = ("y", "Y", "labels", "label", "targets", "target")


# ----------------------------------------------------------------------------- reading
def load_data(opts: Any, loaded: LoadedModel) -> Dataset:
    """Read ``opts.data`` as ``opts.data_kind`` (auto-detected by default); the held-out part is
    ``opts.val_data`` when given, else a ``val_fraction`` slice of ``opts.data``."""
    path = existing_path(opts.data, "data")
    kind = detect_kind(path) if opts.data_kind == "auto" else opts.data_kind
    x, y, desc = _read(path, kind, opts, loaded)
    if opts.val_data is None:
        ds = _split(kind, x, y, opts, desc)
    else:
        xv, yv, vdesc = _read(existing_path(opts.val_data, "val-data"), kind, opts, loaded)
        n = len(x)
        joined = _split(kind, torch.cat([x, xv]), None if y is None else torch.cat([y, yv]),
                        opts, desc, n_val=len(xv), ordered=True)  # fmt: skip
        joined.description = f"{desc}; held out: {vdesc}"
        ds = joined
        assert len(ds.x_train) == n
    log.info(
        "data: %s (%s: %s; %d train / %d held out)",
        path, ds.kind, ds.description, len(ds.x_train), len(ds.x_val),
    )  # fmt: skip
    return ds


def _read(
    path: Path, kind: str, opts: Any, loaded: LoadedModel
) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    if kind == "text":
        return _text(path, loaded, int(opts.seq_len))
    if kind == "images":
        x, y, classes = _images(path, opts.image_size)
        return x, y, f"{len(x)} images, {len(classes)} classes"
    x, y = _tabular(path)
    return x, y, f"{len(x)} rows x {x.shape[1]} features"


def detect_kind(path: Path) -> str:
    """Guess the data kind from the file suffix or the folder's contents."""
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".npz", ".csv"):
            return "tabular"
        if suffix in TEXT_EXT:
            return "text"
        raise CLIError(
            f"data {path}: cannot tell its kind from the suffix {suffix!r}; "
            "use .txt, .npz, .csv, an image folder, or --data-kind"
        )
    subdirs = [d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if any(f.suffix.lower() in IMAGE_EXT for d in subdirs for f in d.iterdir()):
        return "images"
    if any(f.suffix.lower() in TEXT_EXT for f in path.rglob("*") if f.is_file()):
        return "text"
    if any(f.suffix.lower() in IMAGE_EXT for f in path.iterdir()):
        raise CLIError(f"data {path}: an image folder needs one sub-folder per class")
    raise CLIError(f"data {path}: no .txt files and no class sub-folders with images found")


def _split(
    kind: str, x: torch.Tensor, y: torch.Tensor | None, opts: Any, desc: str,
    n_val: int | None = None, ordered: bool = False,
) -> Dataset:  # fmt: skip
    """Training and held-out parts: the last ``n_val`` rows (``ordered``) or a random
    ``val_fraction`` of them; targets checked against the task."""
    task, num_classes = "lm", None
    if y is not None:
        task = opts.task
        integral = bool(torch.all(y == torch.round(y))) if y.is_floating_point() else True
        if task == "auto":
            task = "classification" if integral and y.ndim == 1 else "regression"
        if task == "classification":
            if not integral or y.ndim != 1:
                raise CLIError("classification needs one integer label per sample")
            y = y.long()
            if int(y.min()) < 0:
                raise CLIError(f"class labels must be >= 0, found {int(y.min())}")
            num_classes = int(y.max()) + 1
        else:
            y = y.float()
    n = len(x)
    if n < 2:
        raise CLIError(f"data has {n} sample(s); need at least 2 (training and held out)")
    if ordered:
        order = torch.arange(n).roll(n_val or 0)  # the held-out rows first
    else:
        n_val = min(n - 1, max(1, math.ceil(float(opts.val_fraction) * n) if kind == "text"
                    else round(float(opts.val_fraction) * n)))  # fmt: skip
        order = torch.randperm(n, generator=torch.Generator().manual_seed(int(opts.seed) + 7))
    val, train = order[:n_val], order[n_val:]
    if len(train) == 0:
        raise CLIError("no training samples left after the held-out split")
    y_tr = None if y is None else y[train]
    y_val = None if y is None else y[val]
    return Dataset(kind, task, x[train], y_tr, x[val], y_val, num_classes, desc)


def _tabular(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if path.suffix.lower() == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                xk = next((k for k in X_KEYS if k in keys), None)
                yk = next((k for k in Y_KEYS if k in keys), None)
                if xk is None or yk is None:
                    raise CLIError(
                        f"data {path}: an .npz needs arrays named X (or x, inputs, "
                        f"features) and y (or labels, targets); found {keys}"
                    )
                x, y = np.asarray(z[xk]), np.asarray(z[yk])
        except CLIError:
            raise
        except Exception as err:
            raise CLIError(f"could not read {path}: {one_line(err)}") from None
    else:
        x, y = _csv(path)
    if x.ndim == 1:
        x = x[:, None]
    if len(x) != len(y):
        raise CLIError(f"data {path}: X has {len(x)} rows but y has {len(y)}")
    if not np.issubdtype(x.dtype, np.number) or not np.issubdtype(y.dtype, np.number):
        raise CLIError(f"data {path}: X and y must be numeric")
    if not np.isfinite(x).all():
        raise CLIError(f"data {path}: X contains NaN or Inf")
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.ascontiguousarray(y))
    return xt, yt


def _csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open(newline="") as fh:
            rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError) as err:
        raise CLIError(f"could not read {path}: {one_line(err)}") from None
    if not rows:
        raise CLIError(f"data {path}: the CSV file is empty")
    header = None
    try:
        [float(c) for c in rows[0]]
    except ValueError:
        header, rows = [c.strip() for c in rows[0]], rows[1:]
    width = len(rows[0]) if rows else 0
    if width < 2:
        raise CLIError(f"data {path}: a CSV needs at least one feature column and a label")
    try:
        table = np.array([[float(c) for c in r] for r in rows], dtype=np.float64)
    except ValueError as err:
        raise CLIError(f"data {path}: non-numeric value in the CSV ({err})") from None
    except Exception as err:  # ragged rows
        raise CLIError(f"data {path}: rows of different lengths ({one_line(err, 100)})") from None
    col = width - 1
    if header is not None:
        for name in ("label", "target", "y", "class"):
            if name in header:
                col = header.index(name)
                break
    y = table[:, col]
    x = np.delete(table, col, axis=1)
    return x, y


def _images(path: Path, size: int | None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    require("PIL", "reading an image folder", "pillow")
    from PIL import Image, UnidentifiedImageError

    classes = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = [
        (f, ci)
        for ci, c in enumerate(classes)
        for f in sorted((path / c).iterdir())
        if f.suffix.lower() in IMAGE_EXT
    ]
    if not files:
        raise CLIError(f"data {path}: no images found in its class sub-folders")
    images = []
    mode = None
    target: tuple[int, int] | None = (size, size) if size else None
    for f, _ in files:
        try:
            with Image.open(f) as im:
                im.load()
                img = im.copy()
        except (UnidentifiedImageError, OSError) as err:
            raise CLIError(f"data: cannot read image {f}: {one_line(err, 120)}") from None
        if mode is None:
            mode = "L" if img.mode in ("1", "L", "I", "I;16", "F", "LA") else "RGB"
            target = target or img.size
        img = img.convert(mode)
        if img.size != target:
            img = img.resize(target)
        images.append(np.asarray(img, dtype=np.float32) / 255.0)
    arr = np.stack(images)
    arr = arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)
    y = torch.tensor([ci for _, ci in files], dtype=torch.long)
    return torch.from_numpy(np.ascontiguousarray(arr)), y, classes


def _text(path: Path, loaded: LoadedModel, seq_len: int) -> tuple[torch.Tensor, None, str]:
    files = (
        [path]
        if path.is_file()
        else sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_EXT)
    )
    if not files:
        raise CLIError(f"data {path}: no text files (.txt, .md, .rst) found")
    try:
        text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    except OSError as err:
        raise CLIError(f"could not read {path}: {one_line(err)}") from None
    if loaded.tokenizer is not None:
        ids = loaded.tokenizer(text, return_tensors=None)["input_ids"]
        tokens = torch.tensor(ids, dtype=torch.long)
        how = "tokenizer"
    else:
        tokens = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
        how = "bytes"
        vocab = loaded.vocab_size
        if vocab is not None and vocab < 256:
            raise CLIError(
                f"data does not fit the model: text without a tokenizer uses bytes "
                f"(256 symbols) but the model's vocabulary has {vocab}"
            )
    count = len(tokens) // seq_len
    if count < 2:
        raise CLIError(
            f"data {path}: {len(tokens)} tokens make fewer than 2 sequences of "
            f"--seq-len {seq_len}; give more text or a shorter --seq-len"
        )
    seqs = tokens[: count * seq_len].view(count, seq_len)
    return seqs, None, f"{len(tokens):,} tokens ({how}) in {count} sequences of {seq_len}"
