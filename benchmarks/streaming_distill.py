"""Distillation of low-rank adapters with the model streamed layer by layer vs held whole, on a generated model.

    .venv/bin/python benchmarks/streaming_distill.py [--layers 16] [--hidden 2048] [--steps 2] [--rank 16]

Generates (once, into ``--dir``) a Llama-shaped checkpoint of random N(0, 0.02) bf16 weights, then runs two fresh
child processes on the same calibration tokens (4 per hidden dimension, as distillation asks) and the same removal
(the quarter of the layers before the last two):

- ``resident``: the model loaded whole, adapters trained on it;
- ``stream``: the memory setting at a third of the weights' size, so the plan streams and each step brings every
  kept layer in twice (forward, then backward).

Each child reports its seconds, peak RSS (VmHWM), the training KL of each step and the adapters it trained.
Checks: the streamed adapters equal the resident ones (the same computation, another placement); the streamed
peak RSS against what the module says a step holds: the runtime before any weight, two layers, the states kept per
kept layer, the teacher's final states, the head's logits work (teacher and student logits, their float32
log-softmaxes and the student's gradient, for a block of positions: 5 x 4 bytes x the smaller of tokens x vocab and
``layerwise.LOGIT_ELEMENTS``), the adapters with their gradients and
AdamW moments (16 bytes per parameter), plus 500 MB. Results are appended to benchmarks/results/streaming_distill.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _record import record
from streaming import generate

SEQ = 512
BATCH = 2


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def child(folder: Path, mode: str, steps: int, rank: int, memory: str) -> None:
    import torch

    from shortgpt_serve.calibration import batches
    from shortgpt_serve.config.files import config_from_dict
    from shortgpt_serve.healing.layerwise import distill_adapters
    from shortgpt_serve.healing.linear import TOKENS_PER_DIM
    from shortgpt_serve.models.families import family_for
    from shortgpt_serve.models.source import ModelSource, read_config
    from shortgpt_serve.passes import Batch
    from shortgpt_serve.session import ModelSession

    torch.manual_seed(0)
    config_json = read_config(folder)
    source = ModelSource(folder, "bench", str(folder), "0" * 64, config_json, family_for(config_json, str(folder)))
    config = config_from_dict({"profile": {"memory": memory, "dtype": "bfloat16"}})
    session = ModelSession(config, source, docs=None)  # type: ignore[arg-type]
    hidden, vocab, layers = (int(config_json[k]) for k in ("hidden_size", "vocab_size", "num_hidden_layers"))
    gen = torch.Generator().manual_seed(1)
    n_seq = -(-TOKENS_PER_DIM * hidden // SEQ)
    sequences = [torch.randint(0, vocab, (SEQ,), generator=gen).tolist() for _ in range(n_seq)]
    data = [Batch(ids, mask) for ids, mask in batches(sequences, 4, 0)]
    from shortgpt_serve.calibration import CalibrationSet

    session._calib = CalibrationSet(sequences, "random tokens", SEQ, "0" * 64, [])
    plan = session.memory_plan()
    runtime_mib = _status_mib("VmRSS")
    engine = session.engine()
    removed = list(range(layers - 2 - layers // 4, layers - 2))
    t0 = time.perf_counter()
    dist = distill_adapters(
        engine, data, removed, rank=rank, steps=steps, batch_size=BATCH, lr=3e-3, seed=0, progress=False
    )
    seconds = time.perf_counter() - t0
    assert dist.adapters is not None
    adapters = {f"{i}.{n}": a.b[n].float().flatten()[:64].tolist() for i, a in dist.adapters.items() for n in a.b}
    n_adapter = sum(p.numel() for a in dist.adapters.values() for p in a.parameters())
    placement = session._placement
    print(
        json.dumps(
            {
                "mode": plan.mode,
                "units": placement.unit_bytes() if placement is not None else {},
                "weights": plan.weights,
                "seconds": seconds,
                "read_s": placement.read_s if placement is not None else 0.0,
                "peak_mib": _status_mib("VmHWM"),
                "runtime_mib": runtime_mib,
                "kl": dist.kl,
                "adapters": adapters,
                "adapter_params": n_adapter,
                "kept": layers - len(removed),
                "tokens": n_seq * SEQ,
                "hidden": hidden,
                "vocab": vocab,
            }
        )
    )
    session.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dir", default="/tmp/shortgpt-bench/llama-distill")
    p.add_argument("--stream-memory", default=None, help="the streamed child's --memory (default: a third)")
    p.add_argument("--child", nargs=5, metavar=("DIR", "MODE", "STEPS", "RANK", "MEMORY"))
    args = p.parse_args()
    if args.child:
        folder, mode, steps, rank, memory = args.child
        child(Path(folder), mode, int(steps), int(rank), memory)
        return
    folder = Path(args.dir)
    if not (folder / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        generate(folder, args.layers, args.hidden, 1000, normal=True)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    memory = args.stream_memory or f"{size // 3 // 2**20}MiB"
    runs: dict[str, dict[str, object]] = {}
    loads = []
    for mode in ("resident", "stream"):
        loads.append(os.getloadavg()[0])
        cmd = [sys.executable, __file__, "--child", str(folder), mode, str(args.steps), str(args.rank)]
        res = subprocess.run([*cmd, "auto" if mode == "resident" else memory], capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"the {mode} child failed:\n{res.stderr[-3000:]}")
        out = json.loads(res.stdout.strip().splitlines()[-1])
        assert out["mode"] == mode, f"the plan chose {out['mode']} for {mode}"
        runs[mode] = out
        print(mode, {k: v for k, v in out.items() if k != "adapters"}, flush=True)

    from shortgpt_serve.healing.layerwise import LOGIT_ELEMENTS

    r, s = runs["resident"], runs["stream"]
    diff = max(
        abs(a - b)
        for k, v in r["adapters"].items()  # type: ignore[attr-defined]
        for a, b in zip(v, s["adapters"][k], strict=True)  # type: ignore[index]
    )
    units: dict[str, int] = s["units"]  # type: ignore[assignment]
    hidden, vocab, kept = int(s["hidden"]), int(s["vocab"]), int(s["kept"])  # type: ignore[call-overload]
    step_tokens = BATCH * SEQ
    parts = {
        "runtime": float(s["runtime_mib"]) * 2**20,  # type: ignore[arg-type]
        "two layers": 2 * units["layer"],
        "kept states": kept * step_tokens * hidden * 2,
        "teacher states": int(s["tokens"]) * hidden * 2,  # type: ignore[call-overload]
        "logits work": 5 * 4 * min(step_tokens * vocab, LOGIT_ELEMENTS),
        "adapters": 16 * int(s["adapter_params"]),  # type: ignore[call-overload]
        "allowance": 500e6,
    }
    target = sum(parts.values()) / 2**20
    peak = float(s["peak_mib"])  # type: ignore[arg-type]
    lines = [
        f"\n## {time.strftime('%Y-%m-%d %H:%M')} — {args.layers} layers, hidden {hidden}, {size / 1e9:.2f} GB bf16; "
        f"rank-{args.rank} adapters, {args.steps} steps of {BATCH} x {SEQ} tokens, {s['tokens']} calibration tokens",
        "",
        f"Streamed with `--memory {memory}`{'' if args.stream_memory else ' (a third of the weights)'}; resident "
        "with `--memory auto`. Load average "
        f"(1 min) before each child: {', '.join(f'{x:.1f}' for x in loads)}; {os.cpu_count()} CPUs.",
        "",
        "| mode | distillation s | read s (reader thread) | RSS before weights MiB | peak RSS MiB | KL per step |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for mode, x in runs.items():
        kl = ", ".join(f"{k:.4f}" for k in x["kl"])  # type: ignore[attr-defined]
        lines.append(
            f"| {mode} | {x['seconds']:.1f} | {x['read_s']:.1f} | {x['runtime_mib']:.0f} | {x['peak_mib']:.0f} | {kl} |"
        )
    lines += [
        "",
        f"- Adapters, streamed vs resident: max |difference| {diff:.2e} (first 64 entries of every B).",
        f"- Peak RSS streamed: **{peak:.0f} MiB**, resident {r['peak_mib']:.0f} MiB; what a step holds, as the module "
        "counts it: " + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in parts.items()) + f" = {target:.0f} MiB "
        f"({'within' if peak <= target else 'above'}).",
        f"- Time streamed / resident: {float(s['seconds']) / float(r['seconds']):.2f}.",  # type: ignore[arg-type]
    ]
    record("streaming_distill", lines)


if __name__ == "__main__":
    main()
