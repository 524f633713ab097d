"""``python -m conflayers --drafter auto`` on held-out product listings against ``--drafter none``.

The prompts are ``corpus_bench.py``'s ``templated_summary`` workload (product details -> a listing
in a fixed five-line template, so outputs share phrases across rows): a test file and a disjoint
warm-up file, both records of one dataset. Each command is a whole ``python -m conflayers`` process
over the test file, timed from start to exit (the model load included), at width 1 and at
``--batch-size auto``:

- ``none``: plain decoding;
- ``auto cold``: ``--drafter auto`` with no saved index (rows learn from the rows finished before them);
- ``auto warm``: ``--drafter auto --corpus-index DIR``, DIR filled beforehand by a run over the warm-up
  file (a fresh copy for every run).

Before the timed runs, untimed ones fill the warm index and the width and cost-surface caches (a
private ``$CONFLAYERS_CACHE``), so no timed run calibrates. Each round runs every command once, the
order rotated (and reversed every other round); ratios are plain's summed wall time over the command's. Output must equal
plain decoding.

    python benchmarks/corpus_cli_bench.py [--rows 10] [--warm-rows 24] [--max-new-tokens 64] [--rounds 2]
        [--out docs/benchmarks/corpus_cli]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from corpus_bench import templated_summary  # noqa: E402  (run as a script from benchmarks/)
from engine_bench import table  # noqa: E402
from kernel_bench import cpu_name  # noqa: E402

from conflayers.models import default_cache_dir

ROOT = Path(__file__).resolve().parents[1]


def cli(args: list[str], env: dict) -> tuple[float, float, list[str], dict]:
    """(wall seconds, CPU seconds, outputs by index, the summary line) of one ``python -m conflayers
    --json`` process (CPU: user + system time of the process, its threads included)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "conflayers", *args, "--json"], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=1800)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if r.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{r.stderr[-3000:]}")
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    rows = sorted((x for x in lines if "index" in x), key=lambda x: x["index"])
    return wall, cpu, [x["output"] for x in rows], lines[-1]["summary"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10, help="held-out test prompts")
    ap.add_argument("--warm-rows", type=int, default=24, help="warm-up prompts (fill the saved index)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, help="torch threads of every command (OMP_NUM_THREADS; default: torch's)")
    ap.add_argument("--out")
    args = ap.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/corpus_cli_bench.py", *sys.argv[1:]])
    work = Path(tempfile.mkdtemp(prefix="corpus-cli-bench-"))
    env = {**os.environ, "CONFLAYERS_MODELS": str(default_cache_dir()), "CONFLAYERS_CACHE": str(work / "cache"),
           "HF_HUB_OFFLINE": "1", **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    rng = random.Random("templated_summary")  # corpus_bench's rows: its test set first, then its warm-up set
    test = [templated_summary(rng) for _ in range(args.rows)]
    warm = [templated_summary(rng) for _ in range(args.warm_rows)]
    for name, prompts in (("test", test), ("warm", warm)):
        (work / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": p, "dataset": "listings"}) + "\n"
                                                    for p in prompts))
    common = ["--prompts-file", str(work / "test.jsonl"), "--max-new-tokens", str(args.max_new_tokens),
              "--costs", str(work / "cache" / "costs.json")]

    t0 = time.perf_counter()
    # untimed: the warm index (its cost surface at widths up to 8), then the auto width's surface
    cli(["--prompts-file", str(work / "warm.jsonl"), "--max-new-tokens", str(args.max_new_tokens),
         "--costs", str(work / "cache" / "costs.json"), "--batch-size", "8", "--corpus-index", str(work / "warm-index")],
        env)
    s = cli([*common[:2], "--max-new-tokens", "2", *common[4:]], env)[3]
    auto_width = s["width"]
    print(f"setup {time.perf_counter() - t0:.0f} s; auto width {auto_width}", flush=True)

    commands = {}
    for width in ("1", "auto"):
        commands[(width, "none")] = [*common, "--batch-size", width, "--drafter", "none"]
        commands[(width, "auto cold")] = [*common, "--batch-size", width]
        commands[(width, "auto warm")] = [*common, "--batch-size", width, "--corpus-index", "WARM"]
    names = list(commands)
    walls, cpus = {k: [] for k in names}, {k: [] for k in names}
    outputs, summaries = {}, {}
    for rnd in range(args.rounds):
        order = names[rnd % len(names):] + names[: rnd % len(names)]
        for k in order[::-1] if rnd % 2 else order:
            a = commands[k]
            if "WARM" in a:
                idx = work / f"index-{rnd}-{k[0]}"
                shutil.copytree(work / "warm-index", idx)
                a = [str(idx) if x == "WARM" else x for x in a]
            wall, cpu, outs, summary = cli(a, env)
            walls[k].append(wall)
            cpus[k].append(cpu)
            outputs.setdefault(k, outs)
            summaries.setdefault(k, summary)
            assert outs == outputs[k], f"{k}: output changed between rounds"
            print(f"  round {rnd} {k}: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)

    rows, results = [], {}
    for k in names:
        width, method = k
        plain = walls[(width, "none")]
        same = sum(x == y for x, y in zip(outputs[k], outputs[(width, "none")]))
        s = summaries[k]
        shares = s["step_shares"]
        loaded = sum(c["outputs_loaded"] for c in s.get("corpus_index", {}).values())
        ratio = sum(plain) / sum(walls[k])
        per_round = [p / w for p, w in zip(plain, walls[k])]
        cpu_ratio = sum(cpus[(width, "none")]) / sum(cpus[k])
        results[f"{width}|{method}"] = {"walls": walls[k], "cpu_seconds": cpus[k], "vs_plain": ratio,
                                        "per_round": per_round, "cpu_vs_plain": cpu_ratio,
                                        "identical": f"{same}/{len(test)}", "summary": s}
        rows.append([f"{width} ({s['width']})" if width == "auto" else width, method,
                     " ".join(f"{w:.1f}" for w in walls[k]), f"{ratio:.2f}x", " ".join(f"{r:.2f}" for r in per_round),
                     " ".join(f"{c:.1f}" for c in cpus[k]), f"{cpu_ratio:.2f}x",
                     f"{same}/{len(test)}", "-" if method == "none" else loaded,
                     " / ".join(f"{shares[x]:.0%}" for x in ("plain", "ngram", "corpus", "layerskip"))])
    header = (f"SmolLM2-135M-Instruct float32, {cpu_name()}, {os.cpu_count()} cores, {args.threads or torch.get_num_threads()} torch "
              f"thread(s), torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; greedy, up to {args.max_new_tokens} new "
              f"tokens; {len(test)} held-out listings prompts, {len(warm)} warm-up; {args.rounds} rounds, order rotated")
    t = table(["width", "drafter", "wall s (per round, load incl.)", "vs none", "per round", "CPU s", "CPU vs none",
               "identical to none",
               "outputs loaded", "steps plain / ngram / corpus / layerskip"], rows)
    print(f"\n{header}\n\n`{command}`\n\n{t}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(f"# `python -m conflayers` with corpus drafts\n\n{header}\n\n`{command}`\n\n{t}\n")
        (out / "results.json").write_text(json.dumps({"header": header, "command": command, "auto_width": auto_width,
                                                      "cells": results}, indent=1))
        print(f"wrote {out}/table.md, results.json")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
