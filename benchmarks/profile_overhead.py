"""BI profiling vs a plain forward pass over the same tokens: time and peak memory, side by side in one run.

    .venv/bin/python benchmarks/profile_overhead.py [--repeats 3] [--tokens 16384]

Time: the two passes alternate ``--repeats`` times in one process (same model, same batches) and the median of
each is compared. Memory: each pass runs in a fresh child process that loads the model and runs it once; peak
RSS (ru_maxrss) is compared, and so is the growth over the loaded-model RSS. Targets: time ratio <= 1.10,
peak-memory ratio <= 1.2. Results are appended to benchmarks/results/profile_overhead.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "profile_overhead.md"


def setup(tokens: int):  # type: ignore[no-untyped-def]
    from shortgpt_serve.calibration import load_documents, pack
    from shortgpt_serve.config import default_cache_dir
    from shortgpt_serve.models import load_model, load_tokenizer, resolve_model

    source = resolve_model(None, default_cache_dir())
    calib = pack(load_documents(None), load_tokenizer(source), tokens, 512)
    model = load_model(source, "cpu", "float32")
    return source, calib, model


def plain(model, calib, batch_size: int) -> float:  # type: ignore[no-untyped-def]
    import torch

    from shortgpt_serve.calibration import batches

    start = time.perf_counter()
    with torch.inference_mode():
        for ids, mask in batches(calib.sequences, batch_size, 0):
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    return time.perf_counter() - start


def profiled(model, source, calib, batch_size: int) -> float:  # type: ignore[no-untyped-def]
    from shortgpt_serve.calibration import batches
    from shortgpt_serve.profile import profile_layers

    start = time.perf_counter()
    profile_layers(model, source.family, batches(calib.sequences, batch_size, 0), progress=False)
    return time.perf_counter() - start


def child(mode: str, tokens: int, batch_size: int) -> None:
    source, calib, model = setup(tokens)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "plain":
        plain(model, calib, batch_size)
    else:
        profiled(model, source, calib, batch_size)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"loaded_kib": loaded, "peak_kib": peak}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--child", choices=["plain", "profile"])
    args = p.parse_args()
    if args.child:
        child(args.child, args.tokens, args.batch_size)
        return

    source, calib, model = setup(args.tokens)
    plain(model, calib, args.batch_size)  # warm-up: first-call allocations and kernel selection
    t_plain, t_prof = [], []
    for _ in range(args.repeats):
        t_plain.append(plain(model, calib, args.batch_size))
        t_prof.append(profiled(model, source, calib, args.batch_size))
    del model

    mem = {}
    for mode in ("plain", "profile"):
        out = subprocess.run(
            [sys.executable, __file__, "--child", mode, "--tokens", str(args.tokens), "--batch-size", str(args.batch_size)],
            check=True, capture_output=True, text=True,
        ).stdout
        mem[mode] = json.loads(out.strip().splitlines()[-1])

    tp, tq = statistics.median(t_plain), statistics.median(t_prof)
    peak_ratio = mem["profile"]["peak_kib"] / mem["plain"]["peak_kib"]
    growth_plain = mem["plain"]["peak_kib"] - mem["plain"]["loaded_kib"]
    growth_prof = mem["profile"]["peak_kib"] - mem["profile"]["loaded_kib"]
    lines = [
        f"## {time.strftime('%Y-%m-%d %H:%M')} — {calib.num_tokens} tokens, batch {args.batch_size}, "
        f"{args.repeats} repeats, {source.name}",
        "",
        f"- plain forward: median {tp:.2f} s ({calib.num_tokens / tp:.0f} tok/s); runs {[round(t, 2) for t in t_plain]}",
        f"- BI profiling: median {tq:.2f} s; runs {[round(t, 2) for t in t_prof]}",
        f"- **time ratio {tq / tp:.3f}** (target <= 1.10)",
        f"- peak RSS: plain {mem['plain']['peak_kib'] / 1024:.0f} MiB, profiling {mem['profile']['peak_kib'] / 1024:.0f} "
        f"MiB: **ratio {peak_ratio:.3f}** (target <= 1.2); growth over the loaded model: plain "
        f"{growth_plain / 1024:.0f} MiB, profiling {growth_prof / 1024:.0f} MiB",
        "",
        f"Command: `.venv/bin/python benchmarks/profile_overhead.py --repeats {args.repeats} --tokens {args.tokens}`",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
