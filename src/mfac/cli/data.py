"""Reading user data into tensors: ``text`` (a .txt file or a folder of them; tokens from the
model's tokenizer, else UTF-8 bytes), ``images`` (one sub-folder per class, read with Pillow)
and ``tabular`` (``.npz`` with X and y, or a ``.csv`` whose label is the
``label``/``target``/``y``/``class`` column or the last one)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..experiments.tasks import Dataset, make_dataset
from .common import CLIError, existing_path, one_line, require
from .models import LoadedModel

log = logging.getLogger("mfac.cli")

IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
TEXT_EXT = {".txt", ".text", ".md", ".rst"}
X_KEYS = ("X", "x", "inputs", "features", "data")
Y_KEYS = ("y", "Y", "labels", "label", "targets", "target")


def load_data(opts: Any, loaded: LoadedModel) -> Dataset:
    """Read ``opts.data`` as ``opts.data_kind`` (auto-detected by default); the held-out part is
    ``opts.val_data`` when given, else a ``val_fraction`` slice of ``opts.data``."""
    path = existing_path(opts.data, "data")
    kind = detect_kind(path) if opts.data_kind == "auto" else opts.data_kind
    x, y, desc = _read(path, kind, opts.seq_len, opts.image_size, loaded)
    split = {"task": opts.task, "val_fraction": opts.val_fraction, "seed": opts.seed}
    if opts.val_data is not None:
        xv, yv, vdesc = _read(existing_path(opts.val_data, "val-data"), kind, opts.seq_len,
                              opts.image_size or tuple(x.shape[-2:]), loaded)  # fmt: skip
        if (y is None) != (yv is None) or x.shape[1:] != xv.shape[1:]:
            raise CLIError(f"--val-data: samples of shape {tuple(xv.shape[1:])} do not match "
                           f"--data's {tuple(x.shape[1:])}")  # fmt: skip
        x, y = torch.cat([x, xv]), None if y is None else torch.cat([y, yv])
        split["n_val"], desc = len(xv), f"{desc}; held out: {vdesc}"
    try:
        ds = make_dataset(kind, x, y, description=desc, **split)
    except ValueError as err:
        raise CLIError(f"data {path}: {err}") from None
    log.info("data: %s (%s: %s; %d train / %d held out)", path, ds.kind, ds.description,
             len(ds.x_train), len(ds.x_val))  # fmt: skip
    return ds


def _read(
    path: Path, kind: str, seq_len: int, size: Any, loaded: LoadedModel
) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    if kind == "text":
        return _text(path, loaded, seq_len)
    if kind == "images":
        x, y, classes = _images(path, size)
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


def _tabular(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as z:
                xk = next((k for k in X_KEYS if k in z), None)
                yk = next((k for k in Y_KEYS if k in z), None)
                if xk is None or yk is None:
                    raise CLIError(
                        f"data {path}: an .npz needs arrays named X (or x, inputs, features) "
                        f"and y (or labels, targets); found {list(z.keys())}"
                    )
                x, y = np.asarray(z[xk]), np.asarray(z[yk])
        else:
            x, y = _csv(path)
    except CLIError:
        raise
    except Exception as err:
        raise CLIError(f"could not read {path}: {one_line(err)}") from None
    x = x[:, None] if x.ndim == 1 else x
    if len(x) != len(y):
        raise CLIError(f"data {path}: X has {len(x)} rows but y has {len(y)}")
    if not np.issubdtype(x.dtype, np.number) or not np.issubdtype(y.dtype, np.number):
        raise CLIError(f"data {path}: X and y must be numeric")
    if not np.isfinite(x).all():
        raise CLIError(f"data {path}: X contains NaN or Inf")
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return xt, torch.from_numpy(np.ascontiguousarray(y))


def _csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A numeric CSV table (numpy's reader); a first row that is not numeric is the header."""
    with path.open() as fh:
        head = [c.strip() for c in fh.readline().split(",")]
    try:
        [float(c) for c in head]
        header: list[str] = []
    except ValueError:
        header = head
    table = np.loadtxt(path, delimiter=",", skiprows=1 if header else 0, ndmin=2)
    if table.shape[1] < 2:
        raise CLIError(f"data {path}: a CSV needs at least one feature column and a label")
    names = ("label", "target", "y", "class")
    col = next((header.index(n) for n in names if n in header), table.shape[1] - 1)
    return np.delete(table, col, axis=1), table[:, col]


def _images(path: Path, size: Any) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images of one sub-folder per class, grey or RGB as the first image, resized to ``size``
    (an int or (h, w); default the first image's size), scaled to [0, 1]."""
    require("PIL", "reading an image folder", "pillow")
    from PIL import Image, UnidentifiedImageError

    classes = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = [(f, ci) for ci, c in enumerate(classes) for f in sorted((path / c).iterdir())
             if f.suffix.lower() in IMAGE_EXT]  # fmt: skip
    if not files:
        raise CLIError(f"data {path}: no images found in its class sub-folders")
    images, mode = [], None
    target = (size, size) if isinstance(size, int) else size[::-1] if size else None
    for f, _ in files:
        try:
            with Image.open(f) as im:
                img = im.copy()
        except (UnidentifiedImageError, OSError) as err:
            raise CLIError(f"data: cannot read image {f}: {one_line(err, 120)}") from None
        if mode is None:
            mode = "L" if img.mode in ("1", "L", "I", "I;16", "F", "LA") else "RGB"
            target = target or img.size
        img = img.convert(mode)
        images.append(np.asarray(img if img.size == target else img.resize(target)) / 255.0)
    arr = np.stack(images).astype(np.float32)
    arr = arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)
    y = torch.tensor([ci for _, ci in files], dtype=torch.long)
    return torch.from_numpy(np.ascontiguousarray(arr)), y, classes


def _read_utf8(file: Path) -> str:
    """The file's text, decoded strictly as UTF-8: a file in another encoding is one clear
    error naming the file and the first bad byte's offset, never silently altered."""
    try:
        raw = file.read_bytes()
    except OSError as err:
        raise CLIError(f"could not read {file}: {one_line(err)}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        byte = raw[err.start]
        raise CLIError(
            f"data {file}: not UTF-8 text (byte 0x{byte:02x} at offset {err.start}: "
            f"{err.reason}); convert it first, e.g. iconv -f latin1 -t utf-8"
        ) from None


def _text(path: Path, loaded: LoadedModel, seq_len: int) -> tuple[torch.Tensor, None, str]:
    """Sequences of ``seq_len`` tokens of the concatenated text files."""
    files = [path] if path.is_file() else sorted(
        f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_EXT)  # fmt: skip
    if not files:
        raise CLIError(f"data {path}: no text files (.txt, .md, .rst) found")
    text = "\n\n".join(_read_utf8(f) for f in files)
    how = "tokenizer" if loaded.tokenizer is not None else "bytes"
    if loaded.tokenizer is not None:
        tokens = torch.tensor(loaded.tokenizer(text)["input_ids"], dtype=torch.long)
    else:
        tokens = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
        if (loaded.vocab_size or 256) < 256:
            raise CLIError(
                f"data does not fit the model: text without a tokenizer uses bytes "
                f"(256 symbols) but the model's vocabulary has {loaded.vocab_size}"
            )
    count = len(tokens) // seq_len
    if count < 2:
        raise CLIError(
            f"data {path}: {len(tokens)} tokens make fewer than 2 sequences of "
            f"--seq-len {seq_len}; give more text or a shorter --seq-len"
        )
    seqs = tokens[: count * seq_len].view(count, seq_len)
    return seqs, None, f"{len(tokens):,} tokens ({how}) in {count} sequences of {seq_len}"
