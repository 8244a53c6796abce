"""Loading and saving user models: a Hugging Face transformers folder, or a Python factory
(``package.module:function`` or ``path/to/file.py:function``) plus a checkpoint in
safetensors or torch format. Every failure becomes a one-line :class:`CLIError`."""

from __future__ import annotations

import importlib.util
import logging
import os
import pkgutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .common import SETTINGS, CLIError, atomic_dir, atomic_file, existing_path, one_line, require

log = logging.getLogger("mfac.cli")


@dataclass
class LoadedModel:
    """A model and how it came: ``kind`` is "hf" or "factory"; HF models may carry a
    tokenizer (text data then uses it; otherwise bytes are the tokens)."""

    model: nn.Module
    kind: str
    spec: str
    tokenizer: Any = None

    @property
    def vocab_size(self) -> int | None:
        config = getattr(self.model, "config", None)
        size = getattr(config, "vocab_size", None)
        if isinstance(size, int):
            return size
        emb = next((m for m in self.model.modules() if isinstance(m, nn.Embedding)), None)
        return emb.num_embeddings if emb is not None else None


def load_model(spec: str, checkpoint: Path | None, device: torch.device) -> LoadedModel:
    """Build the model named by ``spec``, load ``checkpoint`` into it, move it to ``device``."""
    path = Path(spec).expanduser()
    if path.is_dir():
        loaded = _load_hf(path)
    elif ":" in spec and not path.exists():
        loaded = LoadedModel(_call_factory(spec), "factory", spec)
    elif path.exists():
        raise CLIError(
            f"--model {spec}: a file is not a model; give a Hugging Face folder or "
            "'module:function' (with --checkpoint for the weights)"
        )
    else:
        raise CLIError(
            f"--model {spec}: not found; give a Hugging Face model folder or a factory "
            "'package.module:function' / 'path/to/file.py:function'"
        )
    if checkpoint is not None:
        load_checkpoint(loaded.model, checkpoint)
    try:
        loaded.model.to(device)
    except RuntimeError as err:
        raise CLIError(f"cannot move the model to {device}: {one_line(err)}") from None
    n = sum(p.numel() for p in loaded.model.parameters())
    log.info("model: %s (%s, %s parameters)", spec, loaded.kind, f"{n:,}")
    return loaded


def _load_hf(path: Path) -> LoadedModel:
    if not (path / "config.json").is_file():
        raise CLIError(f"--model {path}: a folder without config.json is not a Hugging Face model")
    require("transformers", "loading a Hugging Face model")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if SETTINGS.quiet:  # --quiet: transformers' own "Loading weights" bars too
        hf_logging.disable_progress_bar()

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
        model = model.float()
    except Exception as err:  # transformers raises many kinds
        msg = f"could not load the Hugging Face model in {path}: {one_line(err)}"
        raise CLIError(msg) from None
    tokenizer = None
    tok_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if any((path / f).exists() for f in tok_files):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as err:
            log.warning("tokenizer in %s did not load (%s); bytes are the tokens", path, err)
    return LoadedModel(model, "hf", str(path), tokenizer)


def _call_factory(spec: str) -> nn.Module:
    target, _, func = spec.rpartition(":")
    if not target or not func.isidentifier():
        raise CLIError(f"--model {spec}: expected 'package.module:function'")
    if target.endswith(".py"):
        file = existing_path(target, "model factory file")
        name = f"_mfac_user_{abs(hash(str(file.resolve())))}"
        mod_spec = importlib.util.spec_from_file_location(name, file)
        if mod_spec is None or mod_spec.loader is None:
            raise CLIError(f"--model {spec}: cannot import {file}")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module
        try:
            mod_spec.loader.exec_module(module)
        except Exception as err:
            raise CLIError(f"--model {spec}: importing {file} failed: {one_line(err)}") from None
        fn = getattr(module, func, None)
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            fn = pkgutil.resolve_name(spec)
        except (ImportError, AttributeError, ValueError) as err:
            raise CLIError(f"--model {spec}: cannot import {target!r}: {one_line(err)}") from None
        except Exception as err:
            msg = f"--model {spec}: importing {target!r} failed: {one_line(err)}"
            raise CLIError(msg) from None
    if not callable(fn):
        raise CLIError(f"--model {spec}: module {target!r} has no function {func!r}")
    try:
        model = fn()
    except Exception as err:
        raise CLIError(f"--model {spec}: the factory failed: {one_line(err)}") from None
    if not isinstance(model, nn.Module):
        raise CLIError(
            f"--model {spec}: the factory returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (a plain state dict, or a dict holding
    one under ``"model"`` / ``"state_dict"``, as ``mfac train`` checkpoints do)."""
    path = existing_path(path, "checkpoint")
    if path.suffix == ".safetensors":
        require("safetensors", "reading .safetensors")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CLIError(f"could not read checkpoint {path}: {one_line(err)}") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        msg = f"could not read checkpoint {path} (torch or safetensors format): {one_line(err)}"
        raise CLIError(msg) from None
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CLIError(f"checkpoint {path} does not hold a state dict of tensors")
    return obj


def load_checkpoint(model: nn.Module, path: Path) -> None:
    """Load weights (dense, or a sparse checkpoint of ``mfac.prune.save_sparse``)."""
    state = read_state(path)
    if any("::" in k for k in state):
        from ..prune import load_sparse

        try:
            load_sparse(model, str(path))
        except (RuntimeError, ValueError, KeyError) as err:
            raise CLIError(f"checkpoint {path} does not fit the model: {one_line(err)}") from None
        return
    tied = _tied_keys(model)
    missing = sorted(k for k in set(model.state_dict()) - set(state) if k not in tied)
    unexpected = sorted(set(state) - set(model.state_dict()))
    pairs = (("missing", missing), ("unexpected", unexpected))
    parts = [f"{what} keys {keys[:4]}{' ...' * (len(keys) > 4)}" for what, keys in pairs if keys]
    try:
        if parts:
            raise RuntimeError("; ".join(parts))
        model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise CLIError(f"checkpoint {path} does not fit the model: {one_line(err)}") from None
    log.info("checkpoint: %s (%d tensors)", path, len(state))


def _tied_keys(model: nn.Module) -> set[str]:
    """Parameter names whose tensor is shared with an earlier one (tied embeddings)."""
    seen: set[int] = set()
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.add(id(p))
    return tied


def save_model(loaded: LoadedModel, path: Path) -> None:
    """Write the model atomically to ``path``: a Hugging Face folder (``save_pretrained``,
    config and tokenizer included) or, for a factory model, a ``.safetensors`` file."""
    if loaded.kind == "hf":
        with atomic_dir(path) as tmp:
            loaded.model.save_pretrained(str(tmp), safe_serialization=True)
            if loaded.tokenizer is not None:
                loaded.tokenizer.save_pretrained(str(tmp))
        return
    require("safetensors", "writing .safetensors")
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous().clone() for k, v in loaded.model.state_dict().items()}
    with atomic_file(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "model": loaded.spec})
