"""End-to-end tests of the ``mfac`` command line: every command in a subprocess
(``python -m mfac.cli``) on tiny inputs, the error cases (one line, documented exit code, no
traceback), exact resume, and the written reports (HTML parses, PNGs are PNGs)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from mfac._config import options_of
from mfac.cli import main
from mfac.cli.common import MARKER, CLIError, atomic_dir, atomic_file
from mfac.cli.options import PruneCommand, coerce, method_options
from mfac.prune import read_sparse
from mfac.prune.methods.presets import FisherSparseGPTConfig

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"

FACTORY = textwrap.dedent(
    """
    import torch
    from torch import nn

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def cnn():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(256, 16)
            self.fc = nn.Linear(16, 32)
            self.out = nn.Linear(32, 256)

        def forward(self, x):
            return self.out(torch.relu(self.fc(self.emb(x))))

    def lm():
        torch.manual_seed(0)
        return LM()

    def broken():
        raise RuntimeError("no such weights")
    """
)

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pruning removes weights; the inverse Fisher "
    "tells which ones matter least. Second-order information is cheap when it is matrix-free. "
) * 12


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a model factory, tabular/image/text data and a cache dir."""
    d = tmp_path_factory.mktemp("cli")
    (d / "tiny.py").write_text(FACTORY)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1)
    np.savez(d / "tab.npz", X=x, y=y)
    np.savez(d / "wide.npz", X=rng.normal(size=(20, 5)).astype(np.float32), y=np.arange(20) % 3)
    lines = ["f0,f1,f2,f3,f4,f5,f6,f7,label"] + [
        ",".join(f"{v:.4f}" for v in row) + f",{label}" for row, label in zip(x, y, strict=True)
    ]
    (d / "tab.csv").write_text("\n".join(lines) + "\n")
    (d / "corpus.txt").write_text(TEXT)
    from PIL import Image

    for c in ("cats", "dogs"):
        (d / "images" / c).mkdir(parents=True)
        for i in range(8):
            arr = rng.integers(0, 255, size=(8, 8), dtype=np.uint8)
            arr[:, :4] = 255 if c == "cats" else 0
            Image.fromarray(arr, mode="L").save(d / "images" / c / f"{i}.png")
    n, dim = 48, 24
    A = rng.normal(size=(n, dim)) / np.sqrt(n)
    w = np.zeros(dim)
    w[rng.choice(dim, 3, replace=False)] = rng.normal(size=3)
    np.savez(d / "problem.npz", A=A, y=A @ w, x_true=w)
    np.save(d / "A.npy", A)
    np.save(d / "y.npy", A @ w)
    return d


def mfac(cmd: str, cwd: Path, env: dict | None = None, timeout: float = 300):
    """Run ``python -m mfac.cli CMD`` (CMD split like a shell would) in ``cwd``."""
    args = shlex.split(cmd)
    full_env = {
        **os.environ,
        "MFAC_CACHE": str(cwd / "cache"),
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",  # tiny models: threads only add contention on a shared machine
    }
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "mfac.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


class Result:
    """What an in-process ``main(argv)`` call left: exit code, stdout, stderr."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def inproc(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """``main(argv)`` in this process (same code path minus interpreter start-up; used for
    the cases that do not need a fresh process, to keep the file fast)."""

    def call(cmd: str, cwd: Path, env: dict | None = None) -> Result:
        args = shlex.split(cmd)
        monkeypatch.chdir(cwd)
        monkeypatch.setenv("MFAC_CACHE", str(cwd / "cache"))
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        capsys.readouterr()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            code = main(list(args))
        finally:
            torch.set_num_threads(threads)
        out = capsys.readouterr()
        return Result(code, out.out, out.err)

    return call


def ok(proc):
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout:{proc.stdout}\nstderr:{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[str] = []
        self.cells = 0
        self.text = ""

    def handle_data(self, data: str) -> None:
        self.text += data

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag == "td":
            self.cells += 1


def parse_html(path: Path) -> _Tags:
    p = _Tags()
    p.feed(path.read_text(encoding="utf-8"))
    p.close()
    return p


def _load_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


# ----------------------------------------------------------------------------- commands
def test_help_and_version(work: Path, inproc) -> None:
    proc = ok(mfac("--help", cwd=work))
    for cmd in ("demo", "prune", "train", "recover", "bench", "exit codes"):
        assert cmd in proc.stdout
    res = inproc("prune --help", cwd=work)
    assert res.returncode == 0 and "--sparsity" in res.stdout and "--recipe" in res.stdout
    text = " ".join(res.stdout.split())
    assert "default: fisher-sparsegpt, the transformer preset, for a Hugging Face model" in text
    assert "--threads N" in text and "used by: default" not in text
    version = inproc("--version", cwd=work)
    assert version.returncode == 0 and "torch-mfac" in version.stdout
    res = inproc("demo --help", cwd=work)  # argparse does not %-format descriptions
    assert "50..95%" in res.stdout and "%%" not in res.stdout and "25 s" in res.stdout
    top = subprocess.run(
        [sys.executable, "-m", "mfac", "--version"], cwd=work, capture_output=True, text=True
    )  # python -m mfac is the command too
    assert top.returncode == 0 and top.stdout == version.stdout


def test_prune_then_train_with_masks_and_exact_resume(work: Path, inproc) -> None:
    cmd = "prune --model tiny.py:mlp --random-weights --data tab.npz --method mfac --sparsity 0.6"
    cmd += " --num-grads 8"
    proc = ok(mfac(cmd + " --block-size 32 -o pr", cwd=work))
    assert "wrote pr/" in proc.stdout
    out = work / "pr"
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "mfac" and report["metric"] == "accuracy"
    assert abs(report["achieved_sparsity"] - 0.6) < 0.01
    assert set(report["before"]) == {"loss", "accuracy"} and "accuracy" in report["after"]
    assert {"collect", "precompute", "prune", "total"} <= set(report["timings_s"])
    assert report["memory"]["peak_rss_bytes"] > 0
    assert [r["layer"] for r in report["layers"]] == ["0", "2"]
    assert is_png(out / "sparsity.png")
    masks = _load_safetensors(out / "masks.safetensors")
    weights = _load_safetensors(out / "model.safetensors")
    for name, mask in masks.items():
        assert (weights[f"{name}.weight"][~mask] == 0).all()
    assert not [p for p in work.iterdir() if p.name.startswith(".pr.")]  # no temp leftovers

    train = (
        "train --model tiny.py:mlp --checkpoint pr/model.safetensors --masks pr --data tab.npz "
        "--epochs 2 --lr 0.01 --batch-size 16 -q"
    )
    ok(inproc(train + " -o straight", cwd=work))  # in this process ...
    ok(inproc(train + " -o resumed --max-steps 7", cwd=work))
    partial = json.loads((work / "resumed" / "train.json").read_text())
    assert partial["steps"] == 7 and partial["stopped_early"]
    ok(
        mfac(train + " -o resumed --resume resumed/checkpoint.pt", cwd=work)
    )  # ... resumed in a fresh one
    a = _load_safetensors(work / "straight" / "model.safetensors")
    b = _load_safetensors(work / "resumed" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # bit-identical to uninterrupted training
        assert a[k].equal(b[k]), k
    for name, mask in masks.items():  # the pruned weights stayed exactly zero
        assert (a[f"{name}.weight"][~mask] == 0).all()
    summary = json.loads((work / "straight" / "train.json").read_text())
    assert summary["optimizer"] == "mfac" and len(summary["loss_history"]) == summary["steps"]
    assert is_png(work / "straight" / "loss.png")
    # resuming with a different optimizer is refused, and sgd/adam train too
    res = inproc(train + " --optimizer adam -o x --resume resumed/checkpoint.pt", cwd=work)
    assert res.returncode == 2 and "optimizer" in res.stderr
    assert ok(inproc(train + " --optimizer sgd --momentum 0.9 -o sgd", cwd=work))


def test_prune_images_torch_checkpoint_nm_pattern(work: Path) -> None:
    import torch

    sys.path.insert(0, str(work))
    try:
        import tiny  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(work))
    torch.save(tiny.cnn().state_dict(), work / "cnn.pt")
    cmd = "prune --model tiny.py:cnn --checkpoint cnn.pt --data images --method magnitude"
    proc = ok(mfac(cmd + " --sparsity 0.5 --pattern 2:4 --exclude 0 -o img", cwd=work))
    report = json.loads((work / "img" / "report.json").read_text())
    assert report["pattern"] == "2:4" and report["data_description"].startswith("16 images")
    mask = _load_safetensors(work / "img" / "masks.safetensors")["3"]
    assert (mask.reshape(-1, 4).sum(1) == 2).all()  # 2 of every 4 kept
    assert "accuracy" in proc.stdout


def test_prune_text_lm_with_yaml_recipe(work: Path, inproc) -> None:
    pytest.importorskip("yaml")
    (work / "recipe.yaml").write_text(
        textwrap.dedent("""
        model: tiny.py:lm
        random_weights: true
        data: corpus.txt
        method: mfac-exact
        sparsity: 0.7
        num-grads: 4
        block_size: 16
        damp: 1e-2      # PyYAML reads this as the string "1e-2": coerced
        seq_len: 32
        batch_size: 4
        """)
    )
    proc = ok(mfac("prune --recipe recipe.yaml -o lmout", cwd=work))
    report = json.loads((work / "lmout" / "report.json").read_text())
    assert report["metric"] == "perplexity" and report["options"]["damp"] == 0.01
    assert report["method"] == "mfac-exact" and abs(report["achieved_sparsity"] - 0.7) < 0.01
    assert report["before"]["perplexity"] > 1 and "perplexity" in proc.stdout
    # the command line wins over the recipe
    ok(inproc("prune --recipe recipe.yaml --method magnitude -q -o lm2", cwd=work))
    assert json.loads((work / "lm2" / "report.json").read_text())["method"] == "magnitude"


def test_prune_csv_diag_fisher_sparsegpt(work: Path, inproc) -> None:
    cmd = "prune --model tiny.py:mlp --random-weights --data tab.csv --sparsity 0.3 --scope layer"
    cmd += " -q"
    ok(inproc(cmd + " --method diag-fisher --num-grads 4 -o csvout", cwd=work))
    report = json.loads((work / "csvout" / "report.json").read_text())
    assert all(abs(r["sparsity"] - 0.3) < 0.02 for r in report["layers"])
    ok(inproc(cmd + " --method sparsegpt --calib-batches 2 -o sgpt", cwd=work))
    assert json.loads((work / "sgpt" / "report.json").read_text())["method"] == "sparsegpt"


def test_prune_iobs_gradual_and_paged_buffer(work: Path, inproc) -> None:
    """The options beyond one-shot: I-OBS, gradual with fine-tuning, a paged Fisher buffer
    built per layer group; each reaches its target and writes a report that says so."""
    base = "prune --model tiny.py:mlp --random-weights --data tab.npz -q"
    ok(inproc(base + " --method iobs --sparsity 0.5 --iterations 2 --dense-steps 3 "
              "--calib-batches 2 -o iobs", cwd=work))  # fmt: skip
    report = json.loads((work / "iobs" / "report.json").read_text())
    assert report["method"] == "iobs" and report["options"]["iterations"] == 2
    assert all(abs(r["sparsity"] - 0.5) < 0.02 for r in report["layers"])
    ok(inproc(base + " --sparsity 0.8 --gradual-steps 3 --finetune-steps 4 --num-grads 8 "
              "-o grad", cwd=work))  # fmt: skip
    report = json.loads((work / "grad" / "report.json").read_text())
    assert report["gradual_steps"] == 3 and abs(report["achieved_sparsity"] - 0.8) < 0.01
    ok(inproc(base + " --sparsity 0.6 --scope layer --layer-groups 1 --num-grads 8 "
              "--memory-budget-gb 1e-6 --spill-dir spill -o paged", cwd=work))  # fmt: skip
    report = json.loads((work / "paged" / "report.json").read_text())
    assert report["info"]["memory_mapped"] is True
    assert report["options"]["layer_groups"] == 1


def test_prune_hugging_face_folder(work: Path, inproc) -> None:
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(cfg).save_pretrained(work / "hf")
    cmd = "prune --model hf --data corpus.txt --method magnitude --sparsity 0.5 --seq-len 16"
    ok(inproc(cmd + " --sparse-file -q -o hfout", cwd=work))  # in-process: one import
    report = json.loads((work / "hfout" / "report.json").read_text())
    assert report["metric"] == "perplexity" and report["achieved_sparsity"] == pytest.approx(0.5)
    assert report["saved_sparsity"] == pytest.approx(report["achieved_sparsity"])
    folder = work / "hfout" / "model"
    assert (folder / "config.json").is_file()
    recipe = json.loads((folder / "mfac_recipe.json").read_text())
    assert recipe["recipe"]["method"] == "magnitude" and recipe["sparsity"] == pytest.approx(0.5)
    reloaded = LlamaForCausalLM.from_pretrained(folder)  # what a user without mfac does
    state, masks = read_sparse(work / "hfout" / "model.sparse.safetensors")
    for key, value in reloaded.state_dict().items():
        assert torch.equal(state[key], value), key
    assert set(masks) == set(report["layers"][i]["layer"] for i in range(len(report["layers"])))
    # a sparsity that contradicts the pattern is refused before anything is loaded
    bad = inproc(cmd + " --pattern 1:4 -q -o hfbad", cwd=work)  # 1:4 removes 0.75
    assert bad.returncode == 2 and "contradicts" in bad.stderr and not (work / "hfbad").exists()
    # the pruned folder trains on, and is written back as a Hugging Face folder
    cmd = "train --model hfout/model --data corpus.txt --seq-len 16 --batch-size 4 --max-steps 2"
    ok(inproc(cmd + " --masks hfout -q -o hftrain", cwd=work))
    assert (work / "hftrain" / "model" / "config.json").is_file()
    assert not (work / "hfout" / "masks.safetensors").exists()  # once, in model/
    assert report["files"]["masks"] == "model/mfac_masks.safetensors"
    assert json.loads((work / "hftrain" / "train.json").read_text())["steps"] == 2


def test_prune_hugging_face_head_only_when_named(work: Path, inproc) -> None:
    """A tied LM head is pruned only when named (glob and name), with a one-line warning and
    ``tied`` in the report; the blocks are still replayed (sequential-blocks)."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(work / "hftied")
    cmd = "prune --model hftied --data corpus.txt --method sparsegpt --seq-len 16 --calib-batches 8"
    res = ok(inproc(cmd + " --layers 'model.layers.*' lm_head -q -o hfhead", cwd=work))
    assert "mfac: warning: lm_head.weight is tied to model.embed_tokens.weight" in res.stderr
    report = json.loads((work / "hfhead" / "report.json").read_text())
    assert report["tied"] == {"lm_head": ["model.embed_tokens.weight"]}
    assert report["info"]["schedule"] == "sequential-blocks"
    assert report["layers"][-1]["layer"] == "lm_head" and len(report["layers"]) == 15
    bad = inproc(cmd + " --exclude lm_haed -q -o hfnever", cwd=work)
    assert bad.returncode == 2 and "did you mean 'lm_head'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (work / "hfnever").exists()


def test_recover_npz_and_npy(work: Path, inproc) -> None:
    proc = ok(mfac("recover --data problem.npz --k 6 --method iobs -o rec", cwd=work))
    summary = json.loads((work / "rec" / "recovery.json").read_text())
    assert summary["relative_error"] < 1e-8 and summary["support_recall"] == 1.0
    with np.load(work / "rec" / "recovery.npz") as z:
        assert np.count_nonzero(z["x"]) <= 6 and len(z["support"]) == 6
        assert len(z["history"]) == summary["iterations"]
    assert "iobs" in proc.stdout
    cmd = "recover --data A.npy --y y.npy --k 6 --method iht --max-iter 50 --step-scale 1"
    ok(inproc(cmd + " -q -o rec2", cwd=work))
    assert json.loads((work / "rec2" / "recovery.json").read_text())["method"] == "iht"


def test_bench_is_gone(work: Path, inproc) -> None:
    """The benchmarks are scripts of the source tree, not a command of the installed package:
    ``mfac bench`` is refused as a usage error, and the top-level help says how to run them."""
    res = inproc("bench --list", cwd=ROOT)
    assert res.returncode == 2 and "invalid choice" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert "python -m benchmarks.NAME --quick" in ok(inproc("--help", cwd=work)).stdout


def test_demo_tiny_writes_a_report(work: Path, inproc) -> None:
    proc = ok(mfac("demo -o report", cwd=work, env={"MFAC_DEMO_TINY": "1"}))
    for marker in ("[1/3]", "[2/3]", "[3/3]", "mfac-exact", "M-FAC", "I-OBS", "index.html"):
        assert marker in proc.stdout, marker
    rep = work / "report"
    tags = parse_html(rep / "index.html")
    assert {"html", "table", "img", "h2"} <= set(tags.tags) and tags.cells > 10
    pngs = ["accuracy_vs_sparsity.png", "loss_curves.png", "recovery_error.png"]
    assert sorted(tags.images) == pngs
    from PIL import Image

    for name in tags.images:
        assert is_png(rep / name)
        with Image.open(rep / name) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    md = (rep / "report.md").read_text()
    assert md.count("![") == 3 and "| sparsity |" in md
    assert "| final \\|w - w*\\| |" in md  # a "|" inside a cell is escaped
    results = json.loads((rep / "results.json").read_text())
    assert results["skipped"] == {} and results["tiny"] is True
    assert len(list((work / "cache").glob("demo-cnn-*.safetensors"))) == 1
    again = ok(inproc("demo --tiny -o report2 --parts prune", cwd=work))
    assert "reusing the cached CNN" in again.stderr
    assert parse_html(work / "report2" / "index.html").images == ["accuracy_vs_sparsity.png"]


# ----------------------------------------------------------------------------- bad input
# (arguments, exit code, words the message must contain); the first few run in a fresh
# process, the rest through main() in this one (same code path, no interpreter start-up).
SUBPROCESS_ERRORS = [
    ("prune --model tiny.py:mlp --data missing.npz", 2, ["data not found"]),
    ("prune --model tiny.py:mlp --data tab.npz --sparsity 1.5", 2, ["--sparsity", "[0, 1)"]),
    ("prune --recipe bad_key.yaml", 2, ["unknown key 'sparsty'", "did you mean"]),
    ("prune --model tiny.py:mlp --data wide.npz", 2, ["does not fit the model"]),
    ("prune --model tiny.py:mlp --data tab.npz --device cuda:7", 3, ["cuda:7", "not available"]),
]
INPROCESS_ERRORS = [
    ("prune --model nosuchpkg.models:make --data tab.npz", 2, ["nosuchpkg"]),
    ("prune --model tiny.py:broken --data tab.npz", 2, ["factory failed"]),
    ("prune --model tiny.py:mlp --checkpoint other.pt --data tab.npz", 2, ["does not fit"]),
    ("prune --model tiny.py:mlp --checkpoint junk.pt --data tab.npz", 2, ["could not read"]),
    ("prune --model tiny.py:mlp --data tab.npz --pattern 4:2", 2, ["N:M"]),
    ("prune --model tiny.py:mlp --data tab.npz --method mfak", 2, ["did you mean 'mfac'"]),
    ("prune --model tiny.py:mlp --data tab.npz --num-grads 1e400", 2, ["finite"]),
    ("prune --recipe bad_number.yaml", 2, ["damp", "expected a number"]),
    ("prune --recipe bad_yaml.yaml", 2, ["not valid YAML"]),
    ("prune --recipe missing.yaml", 2, ["recipe not found"]),
    ("prune --data tab.npz", 2, ["missing required option --model"]),
    ("prune --model tiny.py:lm --data corpus.txt --seq-len 100000", 2, ["fewer than 2"]),
    ("prune --model tiny.py:mlp --data corpus.txt", 2, ["does not fit the model"]),
    ("train --model tiny.py:mlp --data tab.npz --resume nope.pt", 2, ["not found"]),
    ("train --model tiny.py:mlp --data tab.npz --masks nope", 2, ["masks not found"]),
    ("train --model tiny.py:mlp --data tab.npz --momentum 1", 2, ["--momentum"]),
    ("recover --data problem.npz --k 0", 2, ["--k", ">= 1"]),
    ("recover --data problem.npz --k 500", 2, ["k must satisfy"]),
    ("recover --data A.npy --k 3", 2, ["--y"]),
    ("recover --data problem.npz --k 3 --method omp --rule topk", 2, ["--rule applies"]),
    ("bench nosuch", 2, ["invalid choice"]),
    ("recover --data problem.npz --k 3 -o images", 2, ["not written by mfac"]),
    ("prune --no-such-option", 2, ["unrecognized arguments"]),
    ("prune --model tiny.py:mlp --data tab.npz --finetune-steps 5", 2, ["--gradual-steps"]),
    ("prune --model tiny.py:mlp --data tab.npz --layer-groups 1", 2, ["--scope layer"]),
    ("prune --model tiny.py:mlp --data tab.npz --method iobs --gradual-steps 3", 2, ["iobs"]),
    ("prune --model tiny.py:mlp --data tab.npz --memory-budget-gb 0", 2, ["--memory-budget-gb"]),
    ("prune --model tiny.py:mlp --data tab.npz --random-weights --exclude 5", 2,
     ["exclude: '5' matches no prunable layer"]),
    ("prune --model tiny.py:mlp --data tab.npz --random-weights --layers 1", 2,
     ["layers: '1'", "its type is ReLU"]),
    ("prune --model tiny.py:lm --data latin.txt --random-weights", 2,
     ["latin.txt: not UTF-8 text (byte 0xe9 at offset 3"]),
]


def _bad_files(work: Path) -> None:
    import torch
    from torch import nn

    (work / "bad_key.yaml").write_text("model: tiny.py:mlp\ndata: tab.npz\nsparsty: 0.5\n")
    (work / "bad_number.yaml").write_text("model: tiny.py:mlp\ndata: tab.npz\ndamp: abc\n")
    (work / "bad_yaml.yaml").write_text("model: [unclosed\n")
    (work / "junk.pt").write_bytes(b"not a checkpoint")
    (work / "latin.txt").write_bytes("café au lait ".encode("latin-1") * 200)
    if not (work / "other.pt").exists():
        torch.save(nn.Linear(3, 3).state_dict(), work / "other.pt")


def _check_error(proc, code: int, words: list, work: Path) -> None:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not (work / "never").exists()  # nothing half-written


@pytest.mark.parametrize(("cmd", "code", "words"), SUBPROCESS_ERRORS)
def test_bad_input_subprocess(work: Path, cmd: str, code: int, words: list) -> None:
    if "yaml" in cmd:
        pytest.importorskip("yaml")
    _bad_files(work)
    _check_error(mfac(cmd + " -q -o never", cwd=work), code, words, work)


@pytest.mark.parametrize(("cmd", "code", "words"), INPROCESS_ERRORS)
def test_bad_input_in_process(work: Path, inproc, cmd: str, code: int, words: list) -> None:
    if "yaml" in cmd:
        pytest.importorskip("yaml")
    _bad_files(work)
    out = "" if cmd.startswith("bench") or " -o " in cmd else " -o never"
    _check_error(inproc(cmd + " -q" + out, cwd=work), code, words, work)


def test_debug_shows_the_traceback(work: Path, inproc) -> None:
    res = inproc("prune --model tiny.py:mlp --data missing.npz --debug", cwd=work)
    assert res.returncode == 2 and "Traceback" in res.stderr


# ----------------------------------------------------------------------------- in-process units
def test_recipe_coercion() -> None:
    f = {o.name: o for o in options_of(PruneCommand)}
    f |= {name: o for name, (o, _) in method_options("prune").items()}
    assert coerce(f["damp"], "1e-5", "damp") == 1e-5  # the YAML 1.1 string
    assert coerce(f["num_grads"], "1e3", "num_grads") == 1000
    assert coerce(f["block_size"], "full", "block_size") is None
    assert coerce(f["pattern"], " 2 : 4 ", "pattern") == "2:4"
    preset = {o.name: o for o in options_of(FisherSparseGPTConfig)}
    assert coerce(preset["damp"], "auto", "damp") is None  # the calibration-size rule
    assert coerce(preset["damp"], "0.1", "damp") == 0.1
    with pytest.raises(CLIError):
        coerce(f["damp"], "auto", "damp")  # M-FAC's damping has no rule: a number is needed
    for field, value in [
        ("damp", "abc"),
        ("damp", True),
        ("damp", "nan"),
        ("num_grads", 2.5),
        ("sparsity", 1.0),
        ("sparsity", -0.1),
        ("damp", 0),
        ("method", "x"),
    ]:
        with pytest.raises(CLIError):
            coerce(f[field], value, field)


def test_atomic_outputs_leave_nothing_half_written(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(CLIError, match="not written by mfac"), atomic_dir(target):
        pass  # a user's folder is never replaced
    (target / MARKER).write_text("")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("partial")
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "old.txt"]
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("done")
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    f = tmp_path / "file.json"
    with pytest.raises(ValueError), atomic_file(f) as tmp:
        tmp.write_text("{")
        raise ValueError("boom")
    assert not f.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_demo_skips_a_part_whose_api_is_missing(
    work: Path, inproc, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "mfac.optim", None)  # import now raises ImportError
    res = ok(inproc("demo --tiny --parts optim recovery -o skipped", cwd=work))
    assert "skipped the optim part" in res.stderr and "[3/3]" in res.stdout
    results = json.loads((work / "skipped" / "results.json").read_text())
    assert set(results["skipped"]) == {"optim"} and "recovery" in results
    assert "Skipped parts" in parse_html(work / "skipped" / "index.html").text


def test_docs_list_every_option() -> None:
    """docs/cli.md carries every option table exactly as the option sets print them
    (regenerate with ``python -c "from mfac.cli.options import write_docs; write_docs()"``)."""
    from mfac.cli.options import COMMANDS, docs_tables

    doc = (ROOT / "docs" / "cli.md").read_text()
    assert docs_tables() in doc, "docs/cli.md: the option tables are stale"
    for command in COMMANDS:
        assert f"### Keys of `mfac {command}`" in doc


# ----------------------------------------------------------------------------- reliability
TRAIN = "train --model tiny.py:mlp --data tab.npz --batch-size 16 --lr 0.01 -q"


def test_train_output_guards(work: Path, inproc) -> None:
    """A user's folder, the current folder and an earlier run are never overwritten silently;
    an unwritable output fails before training, with exit 2 and no traceback."""
    user = work / "userdir"
    user.mkdir(exist_ok=True)
    (user / "notes.txt").write_text("mine")
    res = inproc(TRAIN + " --max-steps 1 -o userdir", cwd=work)
    assert res.returncode == 2 and "not written by mfac" in res.stderr
    assert [p.name for p in user.iterdir()] == ["notes.txt"]
    res = inproc(TRAIN + " --max-steps 1 -o .", cwd=work)
    assert res.returncode == 2 and "not the current folder" in res.stderr
    ok(inproc(TRAIN + " --max-steps 2 -o run1", cwd=work))
    before = (work / "run1" / "checkpoint.pt").read_bytes()
    res = inproc(TRAIN + " --max-steps 3 -o run1", cwd=work)
    assert res.returncode == 2 and "--resume" in res.stderr and "--overwrite" in res.stderr
    assert (work / "run1" / "checkpoint.pt").read_bytes() == before
    ok(inproc(TRAIN + " --max-steps 3 --overwrite -o run1", cwd=work))
    assert json.loads((work / "run1" / "train.json").read_text())["steps"] == 3
    for cmd in (TRAIN + " --max-steps 1", "recover --data problem.npz --k 3",
                "prune --model tiny.py:mlp --random-weights --data tab.npz --method magnitude"):
        res = inproc(cmd + " -o /proc/mfac-cannot-write", cwd=work)  # read-only, even for root
        assert res.returncode == 2 and "cannot write" in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and "internal" not in res.stderr


def test_missing_optional_package_is_exit_3(
    work: Path, inproc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing optional package (here matplotlib, needed for the plot) is one line naming it
    and how to install it, exit code 3, and no output folder (the outputs are atomic)."""
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    cmd = "prune --model tiny.py:mlp --random-weights --data tab.npz --method magnitude -q"
    res = inproc(cmd + " -o noplot", cwd=work)
    assert res.returncode == 3, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "internal" not in res.stderr
    assert "matplotlib" in res.stderr and "pip install" in res.stderr
    assert not (work / "noplot").exists()


def test_prune_refuses_random_weights(work: Path, inproc) -> None:
    res = inproc("prune --model tiny.py:mlp --data tab.npz --method magnitude -o rw", cwd=work)
    assert res.returncode == 2 and "--checkpoint" in res.stderr and not (work / "rw").exists()


def test_prune_val_data_is_the_held_out_split(work: Path, inproc) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 8)).astype(np.float32)
    np.savez(work / "held.npz", X=x, y=(x[:, 0] > 0).astype(np.int64))
    cmd = "prune --model tiny.py:mlp --random-weights --data tab.npz --val-data held.npz"
    ok(inproc(cmd + " --method magnitude -q -o vd", cwd=work))
    report = json.loads((work / "vd" / "report.json").read_text())
    desc = report["data_description"]
    assert "96 rows" in desc and "held out: 30 rows" in desc


def test_resume_hyperparameters_and_position(work: Path, inproc) -> None:
    """A changed --lr on resume is applied and recorded; a changed --damp is refused; a
    checkpoint with an impossible position is refused naming the field; stale temporary
    files of a killed run are removed."""
    ok(inproc(TRAIN + " --epochs 2 --max-steps 4 -o hp", cwd=work))
    ckpt = work / "hp" / "checkpoint.pt"
    (work / "hp" / ".checkpoint.pt.x1y2.tmp").write_bytes(b"partial")
    res = inproc(TRAIN + " --epochs 2 --damp 1e-3 --resume hp/checkpoint.pt -o hp", cwd=work)
    assert res.returncode == 2 and "damp" in res.stderr
    ok(inproc(TRAIN.replace("0.01", "0.02") + " --epochs 2 --resume hp/checkpoint.pt -o hp",
              cwd=work))  # fmt: skip
    summary = json.loads((work / "hp" / "train.json").read_text())
    assert summary["options"]["lr"] == 0.02
    assert summary["changed_on_resume"] == {"lr": {"was": 0.01, "now": 0.02}}
    assert not list((work / "hp").glob(".*.tmp"))
    state = torch.load(ckpt, weights_only=True)
    for key, value in (("batch", 10_000), ("step", -1), ("epoch", True), ("step", 3)):
        bad = dict(state, **{key: value})
        torch.save(bad, work / "bad.pt")
        res = inproc(TRAIN + " --epochs 3 --resume bad.pt -o hp", cwd=work)
        assert res.returncode == 2 and key in res.stderr, (key, res.stderr)


def test_killed_during_checkpoint_writes_resumes_exactly(work: Path, inproc) -> None:
    """kill -9 a training run that checkpoints every step, several times: the checkpoint
    always loads, and the resumed chain ends bit-identical to an uninterrupted run."""
    import random
    import signal
    import time

    args = TRAIN + " --epochs 40 --save-every 1 --ngrads 16"  # 240 steps, each checkpointed
    ok(inproc(args + " -o straight-k", cwd=work))
    rng = random.Random(0)
    out = work / "killed"
    kills = 0
    resume = ""
    for _ in range(6):  # up to six starts, until three of them were killed mid-run
        if kills == 3:
            break
        env = {**os.environ, "MFAC_CACHE": str(work / "cache"), "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "mfac.cli", *shlex.split(args + resume + " -o killed")],
            cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        start = (out / "checkpoint.pt").stat().st_mtime if resume else 0.0
        ck, writing = out / "checkpoint.pt", False
        while not writing and proc.poll() is None:  # kill only once it checkpoints
            writing = ck.exists() and ck.stat().st_mtime > start
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.1))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=300)
        state = torch.load(out / "checkpoint.pt", weights_only=True)  # always a whole file
        assert len(state["history"]) == state["step"]
        resume = " --resume killed/checkpoint.pt"
    assert kills >= 2
    ok(mfac(args + resume + " -o killed", cwd=work))
    assert not list(out.glob(".*.tmp"))
    a = _load_safetensors(work / "straight-k" / "model.safetensors")
    b = _load_safetensors(out / "model.safetensors")
    for k in a:
        assert a[k].equal(b[k]), k


def test_prune_text_lm_with_the_fisher_preset(work: Path, inproc) -> None:
    """fisher-sparsegpt from the CLI on a text LM: the Fisher budgets need a scalar loss, which
    the CLI's LM loss gives; the blocks get their own budgets around the target."""
    cmd = "prune --model tiny.py:lm --random-weights --data corpus.txt --method fisher-sparsegpt"
    ok(inproc(cmd + " --sparsity 0.5 --seq-len 32 --batch-size 4 -q -o fout", cwd=work))
    report = json.loads((work / "fout" / "report.json").read_text())
    assert report["method"] == "fisher-sparsegpt"
    assert abs(report["achieved_sparsity"] - 0.5) < 0.01


def test_prune_refine_flags(work: Path, inproc) -> None:
    """``--refine pcg`` and ``--refine admm`` reach SparseGPT's option set: the report records
    them, each layer's CG summary and ADMM search; a value outside the choices is refused by
    name."""
    cmd = "prune --model tiny.py:lm --random-weights --data corpus.txt --method sparsegpt"
    cmd += " --pattern 2:4 --seq-len 32 --batch-size 4 -q"
    ok(inproc(cmd + " --refine pcg --pcg-iters 30 -o pcgout", cwd=work))
    report = json.loads((work / "pcgout" / "report.json").read_text())
    assert report["options"]["refine"] == "pcg" and report["options"]["pcg_iters"] == 30
    assert 1 <= report["info"]["pcg_max_iterations"] <= 30
    assert abs(report["achieved_sparsity"] - 0.5) < 0.01
    ok(inproc(cmd + " --refine admm --admm-iters 7 -o admmout", cwd=work))
    report = json.loads((work / "admmout" / "report.json").read_text())
    assert report["options"]["refine"] == "admm" and report["options"]["admm_iters"] == 7
    assert 1 <= report["info"]["admm_max_iterations"] <= 7
    assert 0 < report["info"]["admm_moved"] < 1
    assert abs(report["achieved_sparsity"] - 0.5) < 0.01
    bad = inproc(cmd + " --refine ladmm -o bad", cwd=work)
    assert bad.returncode != 0 and "refine" in bad.stderr
