"""BI profiling vs a plain forward pass over the same tokens: time and peak memory, side by side in one run.

    .venv/bin/python benchmarks/profile_overhead.py [--repeats 3] [--tokens 16384]

Both passes alternate ``--repeats`` times in one process (same model, same batches); the medians are compared.
Memory: before each pass the process's peak-RSS mark is reset (``/proc/self/clear_refs`` = 5) and VmHWM is read
after it, so each figure is the peak of that pass alone: the resident model plus what the pass allocates.
Targets: time ratio <= 1.10, peak-memory ratio <= 1.2. Results are appended to
benchmarks/results/profile_overhead.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

from _record import record


def setup(tokens: int, dtype: str):  # type: ignore[no-untyped-def]
    from shortgpt_serve.calibration import load_documents, pack
    from shortgpt_serve.config import default_cache_dir
    from shortgpt_serve.models.loading import load_model, load_tokenizer
    from shortgpt_serve.models.source import resolve_model

    source = resolve_model(None, default_cache_dir())
    calib = pack(load_documents(None), load_tokenizer(source), tokens, 512)
    model = load_model(source, "cpu", dtype)
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


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", default="auto", help="as profile.dtype: auto, float32, bfloat16")
    args = p.parse_args()

    source, calib, model = setup(args.tokens, args.dtype)
    plain(model, calib, args.batch_size)  # warm-up: first-call allocations and kernel selection
    reset_peak()
    resting = peak_mib()  # the loaded model and runtime, between passes
    t_plain, t_prof, m_plain, m_prof = [], [], [], []
    for _ in range(args.repeats):
        reset_peak()
        t_plain.append(plain(model, calib, args.batch_size))
        m_plain.append(peak_mib())
        reset_peak()
        t_prof.append(profiled(model, source, calib, args.batch_size))
        m_prof.append(peak_mib())

    tp, tq = statistics.median(t_plain), statistics.median(t_prof)
    mp, mq = statistics.median(m_plain), statistics.median(m_prof)
    lines = [
        f"## {time.strftime('%Y-%m-%d %H:%M')} — {calib.num_tokens} tokens, batch {args.batch_size}, "
        f"{args.repeats} repeats, {source.name}, {next(model.parameters()).dtype}",
        "",
        f"- plain forward: median {tp:.2f} s ({calib.num_tokens / tp:.0f} tok/s); "
        f"runs {[round(t, 2) for t in t_plain]}",
        f"- BI profiling: median {tq:.2f} s; runs {[round(t, 2) for t in t_prof]}",
        f"- **time ratio {tq / tp:.3f}** (target <= 1.10)",
        f"- peak RSS during the pass: plain {mp:.0f} MiB, profiling {mq:.0f} MiB: **ratio {mq / mp:.3f}** "
        f"(target <= 1.2); at rest between passes {resting:.0f} MiB, so the passes allocate {mp - resting:.0f} "
        f"and {mq - resting:.0f} MiB",
        "",
        f"Command: `.venv/bin/python benchmarks/profile_overhead.py --repeats {args.repeats} --tokens {args.tokens} "
        f"--dtype {args.dtype}`",
        "",
    ]
    record("profile_overhead", lines)


if __name__ == "__main__":
    main()
