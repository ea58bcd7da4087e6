"""GPU check: profile, score and shorten a generated ~8B-shaped model on a GPU, streamed and resident.

    bash scripts/gpu_check.sh            # on a machine with CUDA, torch, transformers, accelerate; no vLLM, no network

Generates a Llama-shaped checkpoint of random N(0, 0.02) bf16 weights (40 layers, hidden 4096: 7.5B parameters,
15 GB), then on the GPU:

1. streamed (the memory setting at a third of the weights): Block Influence of every layer, then a scoring pass of
   the full model and the model without its 25% lowest-BI layers (per-token log-likelihood), then two steps of
   distillation of that removal (rank-16 adapters, trained one layer at a time on the streamed layers);
2. resident (the model loaded whole onto the GPU): the same two passes;
3. the shortened checkpoint written from the shards (no GPU);

and checks: the plan streamed and held at most two layers' weights on the GPU beyond the resident parts, the BI
of both placements agree to 1e-3 (bf16 on a GPU), and the GPU memory is back to within 1 GiB of the start after the
work ends. Prints one line per step and PASS/FAIL; exits non-zero on a failure.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

SEQ = 512
GiB = 2**30


def say(text: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {text}", flush=True)


def passes(engine, calib, vocab: int) -> tuple[list[float], dict[str, float], float]:  # type: ignore[no-untyped-def]
    """Profile and score on ``engine``: BI per layer, mean NLL of the full and the 25%-removed model, seconds."""
    import torch

    from shortgpt_serve.passes import Batch, Route
    from shortgpt_serve.profile import profile_model

    t0 = time.perf_counter()
    bi = profile_model(engine, calib, batch_size=1).bi
    removed = sorted(range(len(bi)), key=lambda i: bi[i])[: len(bi) // 4]
    nll: dict[str, list[float]] = {"full": [], "short": []}
    ids = torch.tensor(calib.sequences)

    def reader(name: str):  # type: ignore[no-untyped-def]
        def on_logits(b: int, logits: torch.Tensor) -> None:
            lp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
            nll[name].append(float(-lp.gather(1, ids[b, 1:, None].to(lp.device)).mean()))

        return on_logits

    data = [Batch(ids[i : i + 1], torch.ones_like(ids[i : i + 1])) for i in range(len(ids))]
    engine.run(data, [Route(on_logits=reader("full")), Route(frozenset(removed), on_logits=reader("short"))])
    return bi, {k: sum(v) / len(v) for k, v in nll.items()}, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", default="/tmp/shortgpt-gpu-check")
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--device", default="cuda")
    p.add_argument("--memory", default=None, help="the memory setting for the streamed run (default: a third)")
    args = p.parse_args()

    import torch
    from streaming import generate

    from shortgpt_serve.calibration import CalibrationSet, batches
    from shortgpt_serve.checkpoint import write_checkpoint
    from shortgpt_serve.healing.layerwise import distill_adapters
    from shortgpt_serve.healing.linear import TOKENS_PER_DIM
    from shortgpt_serve.memplan import format_size, plan
    from shortgpt_serve.models.families import family_for
    from shortgpt_serve.models.loading import load_model
    from shortgpt_serve.models.source import ModelSource, read_config
    from shortgpt_serve.models.weights import params_by_layer, tensor_infos
    from shortgpt_serve.passes import Batch, PassEngine
    from shortgpt_serve.placement import free_bytes
    from shortgpt_serve.streaming import Streamed, empty_model

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    failures: list[str] = []
    if cuda:
        torch.cuda.init()
        torch.empty(1, device=device)  # the context exists from here on; its memory is not the work's
        start_free = torch.cuda.mem_get_info(device)[0]
        say(f"{torch.cuda.get_device_name(device)}: {start_free / GiB:.1f} GiB free at the start")
    root = Path(args.dir)
    model_dir = root / "model"
    if not (model_dir / "config.json").is_file():
        model_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        generate(model_dir, args.layers, args.hidden, 2000, normal=True)
        say(f"generated {model_dir} in {time.perf_counter() - t0:.0f} s")
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    config = read_config(model_dir)
    family = family_for(config, str(model_dir))
    source = ModelSource(model_dir, "gpu-check", str(model_dir), "0" * 64, config, family)
    shapes = {n: s for n, (_, s) in tensor_infos(model_dir).items()}
    per_layer, other = params_by_layer(shapes, family.layers_module, args.layers)
    gen = torch.Generator().manual_seed(1)
    seqs = [
        torch.randint(0, int(config["vocab_size"]), (SEQ,), generator=gen).tolist() for _ in range(args.tokens // SEQ)
    ]
    calib = CalibrationSet(seqs, "random tokens", SEQ, "0" * 64, [])
    memory = args.memory or f"{size // 3 // 2**20}MiB"
    chosen = plan(
        weights=size,
        largest=max([*per_layer, other]) * 2,
        states=args.tokens * args.hidden * 2,
        memory=memory,
        free=free_bytes(device),
        device=str(device),
        name="gpu-check",
    )
    say(f"{size / 1e9:.1f} GB of weights; --memory {memory}: {chosen.describe('gpu-check', args.layers)}")
    if chosen.mode != "stream":
        failures.append(f"the plan at --memory {memory} is {chosen.mode}, not stream")

    # 1. streamed
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    model = empty_model(model_dir, "bfloat16", device)
    placement = Streamed(model, family, model_dir, device)
    bi_s, nll_s, sec_s = passes(PassEngine(model, family, placement), calib, int(config["vocab_size"]))
    units = placement.unit_bytes()
    peak_s = torch.cuda.max_memory_allocated(device) if cuda else 0
    say(
        f"streamed: profile + score {sec_s:.1f} s (reading {placement.read_s:.1f} s), peak GPU allocated "
        f"{format_size(peak_s)} (layer {format_size(units['layer'])}, embeddings {format_size(units['embedding'])}, "
        f"head {format_size(units['head'])}); NLL full {nll_s['full']:.4f}, 25% removed {nll_s['short']:.4f}"
    )
    budget = 2 * max(units.values()) + 2 * args.tokens * args.hidden * 2 + GiB
    if cuda and peak_s > budget:
        failures.append(f"streamed peak {format_size(peak_s)} above two units + states + 1 GiB ({format_size(budget)})")

    # 1b. streamed distillation: rank-16 adapters trained one layer at a time, two steps
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    engine = PassEngine(model, family, placement)
    short = sorted(range(len(bi_s)), key=lambda i: bi_s[i])[: len(bi_s) // 4]
    need = TOKENS_PER_DIM * args.hidden  # the tokens distillation asks for (as linear healing does)
    vocab = int(config["vocab_size"])
    text = [torch.randint(0, vocab, (SEQ,), generator=gen).tolist() for _ in range(-(-need // SEQ))]
    data = [Batch(ids, mask) for ids, mask in batches(text, 4, 0)]
    dist = distill_adapters(engine, data, short, rank=16, steps=2, batch_size=2, lr=3e-3, seed=0)
    peak_d = torch.cuda.max_memory_allocated(device) if cuda else 0
    say(
        f"streamed distillation: 2 steps of 2 x {SEQ} tokens, rank-16 adapters on {args.layers - len(short)} layers, "
        f"{dist.seconds:.1f} s; KL {dist.kl[0]:.4f} -> {dist.kl[-1]:.4f}; peak GPU allocated {format_size(peak_d)}"
    )
    if not all(math.isfinite(k) for k in dist.kl):
        failures.append(f"streamed distillation KL not finite: {dist.kl}")
    if cuda and peak_d > budget + 2 * GiB:
        failures.append(f"streamed distillation peak {format_size(peak_d)} above {format_size(budget + 2 * GiB)}")
    del engine, dist
    placement.close()
    del model, placement
    gc.collect()

    # 2. resident
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    resident = load_model(source, str(device), "bfloat16")
    bi_r, nll_r, sec_r = passes(PassEngine(resident, family), calib, int(config["vocab_size"]))
    peak_r = torch.cuda.max_memory_allocated(device) if cuda else 0
    say(
        f"resident: profile + score {sec_r:.1f} s, peak GPU allocated {format_size(peak_r)}; NLL full "
        f"{nll_r['full']:.4f}, 25% removed {nll_r['short']:.4f}; streamed/resident time {sec_s / sec_r:.2f}"
    )
    diff = max(abs(a - b) for a, b in zip(bi_s, bi_r, strict=True))
    say(f"BI streamed vs resident: max |difference| {diff:.2e} over {len(bi_r)} layers")
    if diff > 1e-3:
        failures.append(f"BI differs by {diff:.2e} between placements")
    del resident
    gc.collect()

    # 3. the shortened checkpoint
    removed = sorted(range(len(bi_r)), key=lambda i: bi_r[i])[: len(bi_r) // 4]
    out = root / "short"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    t0 = time.perf_counter()
    write_checkpoint(source, removed, out)
    kept = json.loads((out / "config.json").read_text())["num_hidden_layers"]
    say(f"shortened checkpoint: {kept} of {args.layers} layers written to {out} in {time.perf_counter() - t0:.1f} s")
    if kept != args.layers - len(removed):
        failures.append(f"the checkpoint keeps {kept} layers, not {args.layers - len(removed)}")

    if cuda:
        torch.cuda.empty_cache()
        end_free = torch.cuda.mem_get_info(device)[0]
        say(f"GPU free after the work: {end_free / GiB:.1f} GiB (start {start_free / GiB:.1f} GiB)")
        if end_free < start_free - GiB:
            failures.append(f"{(start_free - end_free) / GiB:.1f} GiB of GPU memory not returned")
    for f in failures:
        say(f"FAIL: {f}")
    say("PASS" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
