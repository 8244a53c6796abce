"""`mfac prune` with nothing but its defaults on SmolLM2-135M, against the documented recipe.

Runs, as child processes started at the same time (so that both see the same load on a shared
machine, one thread each through ``OMP_NUM_THREADS``; the CLI command itself carries nothing
but the model, the data, the sparsity and the output folder):

- the CLI: ``mfac prune --model CACHE --data lee_background.txt --sparsity 0.5 -o OUT``
  (``lee_background.txt``: gensim's ``lee_background.cor``, the calibration text of
  :mod:`benchmarks.prune_llm`, copied under a suffix the CLI reads as text);
- the recipe of docs/prune.md: ``python -m benchmarks.prune_llm --seq 128 --calib 32
  --eval-windows 39 --wiki-windows 64 --methods fisher-sparsegpt --damp 0.1`` at 50 %
  (one child of that benchmark, which scores its own pruned model);
- with ``--lm-head``, also the CLI with ``--layers 'model.layers.*' lm_head`` (the tied head).

Each CLI output folder's ``model/`` is then loaded with ``AutoModelForCausalLM`` and scored with
:func:`benchmarks.prune_llm.perplexity` on the recipe's two held-out texts (39 Lee windows and
64 Wikipedia windows of 128 tokens). The calibration-draw spread the CLI is compared with comes
from the recipe's three recorded draws (``prune_llm_fisher_damp0.1``, ``_seed1_`` and
``_seed2_fisher_damp0.1``). Writes ``benchmarks/results/prune_llm_cli_defaults.json``.

    flock /tmp/heavy.lock .venv/bin/python -m benchmarks.prune_cli_defaults --lm-head
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import torch

from benchmarks.prune_llm import CACHE, DATA, RESULTS, convert, perplexity, wiki_windows, windows

ROOT = Path(__file__).resolve().parent.parent
SEQ, EVAL_WINDOWS, WIKI_WINDOWS = 128, 39, 64
RECIPE = [
    "--seq", str(SEQ), "--calib", "32", "--eval-windows", str(EVAL_WINDOWS),
    "--wiki-windows", str(WIKI_WINDOWS), "--methods", "fisher-sparsegpt", "--damp", "0.1",
    "--sparsities", "0.5", "--patterns", "none",
]  # fmt: skip
DRAWS = ("prune_llm_fisher_damp0.1", "prune_llm_seed1_fisher_damp0.1",
         "prune_llm_seed2_fisher_damp0.1")  # fmt: skip


class Job:
    """A child process with its own stdout/stderr files and its own resource usage."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], work: Path) -> None:
        self.name, self.cmd = name, cmd
        self.out: IO[str] = open(work / f"{name}.out", "w+")
        self.err: IO[str] = open(work / f"{name}.err", "w+")
        self.start = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=self.err, env=env, cwd=ROOT)

    def wait(self) -> dict[str, Any]:
        """Reap the child (``os.wait4``: its own CPU times) and return wall, CPU and output."""
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - self.start
        self.out.seek(0)
        self.err.seek(0)
        stdout, stderr = self.out.read(), self.err.read()
        if self.proc.returncode != 0:
            raise RuntimeError(f"{self.name} failed ({self.proc.returncode}):\n{stderr[-3000:]}")
        return {
            "stdout": stdout,
            "process": {"wall_s": round(wall, 1), "user_s": round(usage.ru_utime, 1),
                        "sys_s": round(usage.ru_stime, 1),
                        "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2)},
        }  # fmt: skip


def cli_command(data: Path, out: Path, lm_head: bool = False, seed: int = 0) -> list[str]:
    """The CLI run: model, data, sparsity and output folder, nothing else (plus the head, and
    ``--seed`` when not the default 0: the CLI's draw of the calibration windows)."""
    cmd = [sys.executable, "-m", "mfac", "prune", "--model", str(CACHE), "--data", str(data)]
    cmd += ["--sparsity", "0.5"]
    if seed:
        cmd += ["--seed", str(seed)]
    if lm_head:
        cmd += ["--layers", "model.layers.*", "lm_head"]
    return [*cmd, "-o", str(out)]


def score(folder: Path, threads: int) -> dict[str, float]:
    """Held-out perplexity (Lee, Wikipedia) of a CLI output folder's ``model/``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(CACHE)
    model = AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.float32)
    lee = windows(DATA / "lee.cor", tok, SEQ)[:EVAL_WINDOWS]
    wiki = wiki_windows(tok, SEQ, WIKI_WINDOWS)
    return {"ppl_lee": round(perplexity(model, lee), 2),
            "ppl_wiki": round(perplexity(model, wiki), 2)}  # fmt: skip


def cli_row(job: Job, folder: Path, threads: int) -> dict[str, Any]:
    """What a CLI run reports (report.json) and its held-out perplexity."""
    done = job.wait()
    report = json.loads((folder / "report.json").read_text())
    row: dict[str, Any] = {"command": " ".join(job.cmd[2:]).replace(str(CACHE), "CACHE")}
    row.update(
        method=report["method"], schedule=report["info"].get("schedule"),
        calibration=report["calibration"], layers=len(report["layers"]),
        achieved_sparsity=round(report["achieved_sparsity"], 4),
        timings_s={k: round(v, 1) for k, v in report["timings_s"].items()},
        cli_val_perplexity={k: round(report[k]["perplexity"], 2) for k in ("before", "after")},
        tied=report["tied"], process=done["process"],
    )  # fmt: skip
    row.update(score(folder, threads))
    return row


def draw_spread() -> dict[str, Any]:
    """Lee / Wikipedia perplexity of the recipe's three recorded calibration draws at 50 %."""
    lee, wiki = [], []
    for name in DRAWS:
        rows = json.loads((RESULTS / f"{name}.json").read_text())["rows"]
        row = next(
            r for r in rows if r["method"] == "fisher-sparsegpt"
            and r.get("pattern", "none") == "none" and round(r["target"], 4) == 0.5
        )  # fmt: skip
        lee.append(round(row["ppl"], 2))
        wiki.append(round(row["ppl_wiki"], 2))
    return {"files": list(DRAWS), "ppl_lee": lee, "ppl_wiki": wiki,
            "range_lee": round(max(lee) - min(lee), 2),
            "range_wiki": round(max(wiki) - min(wiki), 2)}  # fmt: skip


def tempfile_root() -> str:
    """The system's temporary folder."""
    import tempfile

    return tempfile.gettempdir()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every child")
    parser.add_argument("--lm-head", action="store_true", help="also the CLI with the tied head")
    parser.add_argument(
        "--work",
        default=str(Path(tempfile_root()) / "mfac-cli-defaults"),
        help="folder for the runs' outputs and logs (emptied first, kept after)",
    )
    parser.add_argument("--name", default="prune_llm_cli_defaults", help="results file name")
    parser.add_argument("--seed", type=int, default=0, help="the CLI's --seed (its draw)")
    parser.add_argument(
        "--cli-only", action="store_true",
        help="run the CLI alone, not the recipe (whose draws are recorded already)",
    )  # fmt: skip
    args = parser.parse_args()
    convert()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")) if p
    )
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = work / "lee_background.txt"
    data.write_text((DATA / "lee_background.cor").read_text(encoding="latin-1"), "utf-8")
    t0 = time.perf_counter()
    recipe_cmd = [sys.executable, "-m", "benchmarks.prune_llm", *RECIPE]
    recipe_cmd += ["--threads", str(args.threads), "--child", "fisher-sparsegpt", "none", "0.5"]
    jobs = {"cli": Job("cli", cli_command(data, work / "cli", seed=args.seed), env, work)}
    if not args.cli_only:
        jobs["recipe"] = Job("recipe", recipe_cmd, env, work)
    if args.lm_head:
        head_cmd = cli_command(data, work / "head", lm_head=True, seed=args.seed)
        jobs["head"] = Job("head", head_cmd, env, work)
    cli = cli_row(jobs["cli"], work / "cli", args.threads)
    head = cli_row(jobs["head"], work / "head", args.threads) if args.lm_head else None
    spread = draw_spread()
    result: dict[str, Any] = {
        "what": "issue #30: `mfac prune` with CLI defaults on SmolLM2-135M against the documented"
        " recipe; produced by benchmarks/prune_cli_defaults.py",
        "script": "python -m benchmarks.prune_cli_defaults"
        + (" --lm-head" if args.lm_head else "") + (f" --seed {args.seed}" if args.seed else "")
        + (" --cli-only" if args.cli_only else ""),
        "data": "lee_background.txt: gensim's lee_background.cor copied",
        "eval": f"benchmarks.prune_llm.perplexity on lee.cor ({EVAL_WINDOWS} windows) and the "
        f"Wikipedia dump ({WIKI_WINDOWS} windows) of {SEQ} tokens",
        "threads": args.threads, "concurrent": len(jobs) > 1, "seed": args.seed,
        "cli": cli, "recipe_draws": spread,
        # the target of issue #30: the CLI's draw inside the recipe's range of draws
        "in_recipe_range_lee": min(spread["ppl_lee"]) <= cli["ppl_lee"] <= max(spread["ppl_lee"]),
        "in_recipe_range_wiki": (
            min(spread["ppl_wiki"]) <= cli["ppl_wiki"] <= max(spread["ppl_wiki"])
        ),
    }  # fmt: skip
    if head is not None:
        result["with_lm_head"] = head
    if not args.cli_only:
        result.update(recipe_row(jobs["recipe"], cli, spread, args.threads))
    result["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{args.name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("cli", "with_lm_head")}))
    print(f"wrote {path}")


def recipe_row(
    job: Job, cli: dict[str, Any], spread: dict[str, Any], threads: int
) -> dict[str, Any]:
    """The recipe child's result (seed 0) and the CLI's gaps to it."""
    rec = job.wait()
    line = next(ln for ln in rec["stdout"].splitlines() if ln.startswith("RESULT "))
    raw = json.loads(line[len("RESULT ") :])
    recipe = {
        "command": "python -m benchmarks.prune_llm " + " ".join(RECIPE)
        + f" --threads {threads}  (one child: fisher-sparsegpt, 50 %)",
        "ppl_lee": round(raw["ppl"], 2), "ppl_wiki": round(raw["ppl_wiki"], 2),
        "prune_wall_s": round(raw["prune_wall_s"], 1), "timings_s": raw["timings"],
        "fisher_s": round(raw.get("fisher_s", 0.0), 1), "schedule": raw.get("schedule"),
        "process": rec["process"],
    }  # fmt: skip
    return {
        "recipe": recipe,
        "ratio_prune_time": round(cli["timings_s"]["total"] / recipe["prune_wall_s"], 3),
        "ratio_process_wall": round(cli["process"]["wall_s"] / recipe["process"]["wall_s"], 3),
        "ppl_lee_gap": round(cli["ppl_lee"] - recipe["ppl_lee"], 2),
        "ppl_wiki_gap": round(cli["ppl_wiki"] - recipe["ppl_wiki"], 2),
        "within_one_draw_lee": abs(cli["ppl_lee"] - recipe["ppl_lee"]) <= spread["range_lee"],
        "within_one_draw_wiki": abs(cli["ppl_wiki"] - recipe["ppl_wiki"]) <= spread["range_wiki"],
    }  # fmt: skip


if __name__ == "__main__":
    main()
