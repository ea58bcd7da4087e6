"""Profiling and scoring a model streamed layer by layer vs held whole, on a generated Llama-shaped checkpoint.

    .venv/bin/python benchmarks/streaming_profile.py [--layers 28] [--hidden 3072] [--tokens 2048] [--rounds 2]

Generates (once, into ``--dir``) a Llama-shaped checkpoint of random N(0, 0.02) bf16 weights, about 6 GB with the
defaults, then alternates, ``--rounds`` times, five fresh child processes on the same calibration tokens:

- ``resident``: the model loaded whole (``--memory auto``: it fits this machine);
- ``stream``: the memory setting at a third of the weights' size (``--memory``), so the plan streams and reads
  the whole next layer ahead;
- ``tight``: the memory setting at the peak RSS target itself (2 x the largest unit + the hidden states + 500 MB),
  so the plan reads ahead only the part of the next layer that the setting leaves (the rest when it starts);
- ``least``: the least memory setting the plan streams with (one layer, the states and its reserve): nothing read
  ahead;
- ``least-2MiB``: the same with glibc's mmap threshold at 2 MiB (``MALLOC_MMAP_THRESHOLD_``; the tool's own is
  8 MiB): steadier and lower, slower.

Each child runs the tool's own profile (Block Influence of every layer, one pass) and a scoring pass (per-token
log-likelihood of the full model and of the model without its 25% lowest-BI layers, one pass with two routes, read
by the tool's own perplexity reader), and
reports its seconds, peak RSS (VmHWM) and the BI it measured. Targets: the streamed peak RSS <= 2 x the largest
layer + the hidden states + 500 MB; its time <= 1.3 x resident; the same BI to 1e-4. The load average is recorded
beside the figures (the machine is shared). Results are appended to benchmarks/results/streaming_profile.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _record import record
from streaming import generate

from shortgpt_serve.memplan import RESERVE

SEQ = 512


def _status_mib(key: str) -> float:
    """A /proc/self/status figure (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def child(folder: Path, mode: str, tokens: int, memory: str) -> None:
    import torch

    from shortgpt_serve.calibration import CalibrationSet
    from shortgpt_serve.config.files import config_from_dict
    from shortgpt_serve.models.families import family_for
    from shortgpt_serve.models.source import ModelSource, read_config
    from shortgpt_serve.passes import Batch, Route
    from shortgpt_serve.profile import profile_model
    from shortgpt_serve.quality.perplexity import NegLogLikelihood
    from shortgpt_serve.session import ModelSession

    torch.manual_seed(0)
    config_json = read_config(folder)
    source = ModelSource(folder, "bench", str(folder), "0" * 64, config_json, family_for(config_json, str(folder)))
    config = config_from_dict(
        {"profile": {"memory": memory, "dtype": "bfloat16", "batch_size": 1}, "calibration": {"num_tokens": tokens}}
    )
    session = ModelSession(config, source, docs=None)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(1)
    vocab = int(config_json["vocab_size"])
    sequences = [torch.randint(0, vocab, (SEQ,), generator=gen).tolist() for _ in range(tokens // SEQ)]
    session._calib = CalibrationSet(sequences, "random tokens", SEQ, "0" * 64, [])
    plan = session.memory_plan()
    runtime_mib = _status_mib("VmRSS")
    t0 = time.perf_counter()
    engine = session.engine()
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    profile = profile_model(engine, session.calib(), batch_size=1)
    profile_s = time.perf_counter() - t0
    profile_peak = _status_mib("VmHWM")
    removed = sorted(range(len(profile.bi)), key=lambda i: profile.bi[i])[: len(profile.bi) // 4]
    ids = torch.tensor(sequences)[:, None, :]
    data = [Batch(ids[i], torch.ones_like(ids[i])) for i in range(len(sequences))]
    nll = {"full": NegLogLikelihood(data), "short": NegLogLikelihood(data)}  # the tool's own perplexity reader
    t0 = time.perf_counter()
    engine.run(data, [Route(on_logits=nll["full"]), Route(frozenset(removed), on_logits=nll["short"])])
    score_s = time.perf_counter() - t0
    placement = session._placement
    print(
        json.dumps(
            {
                "mode": plan.mode,
                "units": placement.unit_bytes() if placement is not None else {},
                "states": plan.states,
                "weights": plan.weights,
                "setup_s": setup_s,
                "profile_s": profile_s,
                "score_s": score_s,
                "read_s": placement.read_s if placement is not None else 0.0,
                "peak_mib": _status_mib("VmHWM"),
                "profile_peak_mib": profile_peak,
                "runtime_mib": runtime_mib,
                "bi": profile.bi,
                "nll": {k: r.total / r.count for k, r in nll.items()},
            }
        )
    )
    session.close()


def _units(folder: Path, tokens: int) -> tuple[int, int]:
    """The largest unit a streamed pass brings in and the hidden states' bytes, as the tool's memory plan counts them
    from the checkpoint's headers."""
    from shortgpt_serve.config.files import config_from_dict
    from shortgpt_serve.models.families import family_for
    from shortgpt_serve.models.source import ModelSource, read_config
    from shortgpt_serve.session import ModelSession

    config_json = read_config(folder)
    source = ModelSource(folder, "bench", str(folder), "0" * 64, config_json, family_for(config_json, str(folder)))
    config = config_from_dict(
        {"profile": {"memory": "stream", "dtype": "bfloat16"}, "calibration": {"num_tokens": tokens}}
    )
    plan = ModelSession(config, source, docs=None)._memory_plan()  # type: ignore[arg-type]
    return plan.largest, plan.states


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--hidden", type=int, default=3072)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dir", default="/tmp/shortgpt-bench/llama-streaming")
    p.add_argument(
        "--stream-memory", default=None, help="the streamed child's --memory (default: a third of the weights)"
    )
    p.add_argument("--child", nargs=4, metavar=("DIR", "MODE", "TOKENS", "MEMORY"))
    args = p.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1], int(args.child[2]), args.child[3])
        return
    folder = Path(args.dir)
    if not (folder / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        generate(folder, args.layers, args.hidden, 1000, normal=True)
        print(f"generated {folder} in {time.perf_counter() - t0:.0f} s", flush=True)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    memory = args.stream_memory or f"{size // 3 // 2**20}MiB"
    largest, states = _units(folder, args.tokens)
    rss_target = (2 * largest + states + 500e6) / 2**20  # the allowance is 500 MB (477 MiB)
    least = largest + 2 * states + RESERVE
    memories = {
        "resident": "auto",
        "stream": memory,
        "tight": f"{int(rss_target)}MiB",
        "least": f"{least}",
        "least-2MiB": f"{least}",
    }
    envs = {"least-2MiB": {"MALLOC_MMAP_THRESHOLD_": str(2 << 20)}}
    variants = tuple(memories)
    runs: dict[str, list[dict[str, object]]] = {v: [] for v in variants}
    loads = []
    for r in range(args.rounds):
        for variant in variants if r % 2 == 0 else variants[::-1]:
            loads.append(os.getloadavg()[0])
            mode = "resident" if variant == "resident" else "stream"
            res = subprocess.run(
                [sys.executable, __file__, "--child", str(folder), mode, str(args.tokens), memories[variant]],
                capture_output=True,
                text=True,
                env={**os.environ, **envs.get(variant, {})},
            )
            if res.returncode:
                raise SystemExit(f"the {variant} child failed:\n{res.stderr[-3000:]}")
            out = json.loads(res.stdout.strip().splitlines()[-1])
            assert out["mode"] == mode, f"the plan chose {out['mode']} for {variant}"
            runs[variant].append(out)
            print(variant, {k: v for k, v in out.items() if k not in ("bi",)}, flush=True)

    def med(mode: str, key: str) -> float:
        return statistics.median(float(x[key]) for x in runs[mode])  # type: ignore[arg-type]

    s0 = runs["stream"][0]
    units: dict[str, int] = s0["units"]  # type: ignore[assignment]
    assert (largest, states) == (max(units.values()), int(s0["states"])), "the plan's sizes differ from the pass's"  # type: ignore[call-overload]
    bi_diff = max(
        abs(a - b)
        for v in variants[1:]
        for x in runs[v]
        for a, b in zip(x["bi"], runs["resident"][0]["bi"], strict=True)  # type: ignore[call-overload]
    )

    def ratio(mode: str) -> float:
        return (med(mode, "profile_s") + med(mode, "score_s")) / (
            med("resident", "profile_s") + med("resident", "score_s")
        )

    nll = {m: runs[m][0]["nll"] for m in variants}
    lines = [
        f"\n## {time.strftime('%Y-%m-%d %H:%M')} — {args.layers} layers, hidden {args.hidden}, "
        f"{size / 1e9:.2f} GB bf16; {args.tokens} calibration tokens; {args.rounds} rounds (alternating)",
        "",
        f"Streamed with `--memory {memory}` (a third of the weights: `stream`) and `--memory {memories['tight']}` "
        f"(the peak RSS target: `tight`) and `--memory {least / 2**20:.0f}MiB` (the least that streams: `least`, "
        "and `least-2MiB` with `MALLOC_MMAP_THRESHOLD_=2097152`); "
        "resident with `--memory auto`. "
        f"Load average (1 min) before each child: {', '.join(f'{x:.1f}' for x in loads)}; {os.cpu_count()} CPUs.",
        "",
        "| mode | setup s | profile pass s | score pass s | read s (reader thread) | RSS before weights MiB "
        "| peak RSS after profile MiB | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in variants:
        lines.append(
            f"| {mode} | {med(mode, 'setup_s'):.1f} | {med(mode, 'profile_s'):.1f} | {med(mode, 'score_s'):.1f} | "
            f"{med(mode, 'read_s'):.1f} | {med(mode, 'runtime_mib'):.0f} | {med(mode, 'profile_peak_mib'):.0f} | "
            f"{med(mode, 'peak_mib'):.0f} |"
        )

    def verdict(ok: bool) -> str:
        return "met" if ok else "missed"

    peaks = {mode: [float(x["peak_mib"]) for x in runs[mode]] for mode in variants[1:]}  # type: ignore[arg-type]
    lines += [
        "",
        "- Time, profile + score passes, against resident: "
        + "; ".join(f"{m} **{ratio(m):.3f}** ({verdict(ratio(m) <= 1.3)})" for m in variants[1:])
        + " (target <= 1.3).",
        f"- Peak RSS target: 2 x the largest unit brought in ({largest / 2**20:.0f} MiB; decoder layer "
        f"{units['layer'] / 2**20:.0f}, embeddings {units['embedding'] / 2**20:.0f}, head {units['head'] / 2**20:.0f})"
        f" + hidden states ({states / 2**20:.0f} MiB) + 500 MB = {rss_target:.0f} MiB. "
        + "; ".join(
            f"{m}: median **{med(m, 'peak_mib'):.0f} MiB**, highest {max(peaks[m]):.0f} "
            f"({'met by every child' if max(peaks[m]) <= rss_target else 'missed by at least one child'})"
            for m in variants[1:]
        )
        + f"; resident {med('resident', 'peak_mib'):.0f} MiB.",
        f"- Block Influence, streamed vs resident: max |difference| {bi_diff:.2e} over {len(s0['bi'])} layers "  # type: ignore[arg-type]
        f"(target 1e-4: {'met' if bi_diff <= 1e-4 else 'missed'}).",
        f"- Scoring, mean NLL per token ({' / '.join(variants)}): full "
        + " / ".join(f"{nll[m]['full']:.5f}" for m in variants)  # type: ignore[index]
        + "; 25% removed "
        + " / ".join(f"{nll[m]['short']:.5f}" for m in variants)  # type: ignore[index]
        + ".",
    ]
    record("streaming_profile", lines)


if __name__ == "__main__":
    main()
