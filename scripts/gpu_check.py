"""GPU check: profile, score and shorten a generated ~8B-shaped model on a GPU, streamed and resident.

    bash scripts/gpu_check.sh            # on a machine with CUDA, torch, transformers, accelerate; no vLLM, no network

Generates a Llama-shaped checkpoint of random N(0, 0.02) bf16 weights (40 layers, hidden 4096: 7.5B parameters,
15 GB), then on the GPU:

1. streamed (the memory setting at a third of the weights): Block Influence of every layer, then a scoring pass of
   the full model and the model without its 25% lowest-BI layers (per-token log-likelihood), then two steps of
   distillation of that removal (rank-16 adapters, trained one layer at a time on the streamed layers); then the
   same two passes with half a layer read ahead (a memory setting between one and two layers: the rest of each
   layer read when it starts, into page-locked buffers reused from layer to layer), which must give the same BI;
2. resident (the model loaded whole onto the GPU): the same two passes, then one step of full-layer distillation
   (float32 copies of the kept layers trained with AdamW), its peak beside the model set against the estimate
   the choice between full layers and adapters uses, and that choice on this GPU;
3. the shortened checkpoint written from the shards (no GPU);
4. the launcher's check before a vLLM boot, on the real ``nvidia-smi``: it passes once the work has returned the
   memory, and refuses with one line naming the holder while this process holds a third of the GPU;

and checks: the plan streamed and held at most two layers' weights on the GPU beyond the resident parts, the BI
of both placements agree to 1e-3 (bf16 on a GPU), and the GPU memory is back to within 1 GiB of the start after the
work ends. Each step runs on when one before it fails (its traceback printed), so one run reports them all. Prints
one line per step and PASS/FAIL; exits non-zero on a failure.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

SEQ = 512
GiB = 2**30


def say(text: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {text}", flush=True)


def lowest_quarter(bi: list[float]) -> list[int]:
    """The 25% of the layers with the lowest Block Influence."""
    return sorted(range(len(bi)), key=lambda i: bi[i])[: len(bi) // 4]


def passes(engine, calib, vocab: int) -> tuple[list[float], dict[str, float], float]:  # type: ignore[no-untyped-def]
    """Profile and score on ``engine``: BI per layer, mean NLL of the full and the 25%-removed model, seconds."""
    import torch

    from shortgpt_serve.passes import Batch, Route
    from shortgpt_serve.profile import profile_model

    t0 = time.perf_counter()
    bi = profile_model(engine, calib, batch_size=1).bi
    removed = lowest_quarter(bi)
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


class Checks:
    """The failures so far; :meth:`step` runs one step and records its exception instead of ending the run."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def fail(self, text: str) -> None:
        self.failures.append(text)

    def step(self, name: str, fn, *args):  # type: ignore[no-untyped-def]
        try:
            return fn(*args)
        except Exception as e:  # reported, and the next step still runs
            traceback.print_exc()
            self.fail(f"{name}: {type(e).__name__}: {e}")
            return None


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
    import transformers
    from streaming import generate

    from shortgpt_serve.calibration import CalibrationSet, batches
    from shortgpt_serve.checkpoint import write_checkpoint
    from shortgpt_serve.errors import ServeError
    from shortgpt_serve.healing.layerwise import distill_adapters
    from shortgpt_serve.healing.linear import TOKENS_PER_DIM
    from shortgpt_serve.memplan import format_size, plan
    from shortgpt_serve.models.families import family_for
    from shortgpt_serve.models.loading import load_model
    from shortgpt_serve.models.source import ModelSource, read_config
    from shortgpt_serve.models.weights import params_by_layer, tensor_infos
    from shortgpt_serve.passes import Batch, PassEngine
    from shortgpt_serve.placement import free_bytes
    from shortgpt_serve.serving.gpus import check_before_boot
    from shortgpt_serve.streaming import Streamed, empty_model

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    checks = Checks()
    say(f"torch {torch.__version__}, transformers {transformers.__version__}, python {sys.version.split()[0]}")
    start_free = 0
    if cuda:
        torch.cuda.init()
        torch.empty(1, device=device)  # the context exists from here on; its memory is not the work's
        start_free, total = torch.cuda.mem_get_info(device)
        say(f"{torch.cuda.get_device_name(device)}: {start_free / GiB:.1f} GiB free of {total / GiB:.1f} GiB")
    root = Path(args.dir)
    model_dir = root / "model"
    if not (model_dir / "config.json").is_file():
        model_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        generate(model_dir, args.layers, args.hidden, 2000, normal=True, device=str(device))
        say(f"generated {model_dir} in {time.perf_counter() - t0:.0f} s")
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    config = read_config(model_dir)
    vocab = int(config["vocab_size"])
    family = family_for(config, str(model_dir))
    source = ModelSource(model_dir, "gpu-check", str(model_dir), "0" * 64, config, family)
    shapes = {n: s for n, (_, s) in tensor_infos(model_dir).items()}
    per_layer, other = params_by_layer(shapes, family.layers_module, args.layers)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, vocab, (SEQ,), generator=gen).tolist() for _ in range(args.tokens // SEQ)]
    calib = CalibrationSet(seqs, "random tokens", SEQ, "0" * 64, [])
    memory = args.memory or f"{size // 3 // 2**20}MiB"

    def distill_data() -> list[Batch]:
        # the tokens distillation asks for (as linear healing does), random
        need = TOKENS_PER_DIM * args.hidden
        text = [torch.randint(0, vocab, (SEQ,), generator=gen).tolist() for _ in range(-(-need // SEQ))]
        return [Batch(ids, mask) for ids, mask in batches(text, 4, 0)]

    def peak() -> int:
        return torch.cuda.max_memory_allocated(device) if cuda else 0

    def reset() -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)

    def memory_plan() -> None:
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
            checks.fail(f"the plan at --memory {memory} is {chosen.mode}, not stream")

    def streamed():  # type: ignore[no-untyped-def]
        reset()
        model = empty_model(model_dir, "bfloat16", device)
        placement = Streamed(model, family, model_dir, device)
        try:
            estimate = placement.probe()  # what the run logs before its first pass
            bi, nll, sec = passes(PassEngine(model, family, placement), calib, vocab)
            say(f"streamed reading: estimated {estimate:.1f} s per pass, read {placement.read_s / 2:.1f} s per pass")
            units = placement.unit_bytes()
            limit = 2 * max(units.values()) + 2 * args.tokens * args.hidden * 2 + GiB  # two units, states, 1 GiB
            say(
                f"streamed: profile + score {sec:.1f} s (reading {placement.read_s:.1f} s), peak GPU allocated "
                f"{format_size(peak())} (layer {format_size(units['layer'])}, embeddings "
                f"{format_size(units['embedding'])}, head {format_size(units['head'])}); NLL full "
                f"{nll['full']:.4f}, 25% removed {nll['short']:.4f}"
            )
            if cuda and peak() > limit:
                checks.fail(f"streamed peak {format_size(peak())} above {format_size(limit)}")
            checks.step("streamed distillation", distilled, model, placement, lowest_quarter(bi), limit + 2 * GiB)
            checks.step("streamed, half a layer ahead", part_ahead, bi, units["layer"] // 2, limit)
            return bi, sec
        finally:
            placement.close()

    def part_ahead(want: list[float], ahead: int, limit: int) -> None:
        reset()
        model = empty_model(model_dir, "bfloat16", device)
        placement = Streamed(model, family, model_dir, device, ahead)
        try:
            bi, _, sec = passes(PassEngine(model, family, placement), calib, vocab)
        finally:
            placement.close()
        diff = max(abs(a - b) for a, b in zip(bi, want, strict=True))
        say(
            f"streamed, {format_size(ahead)} of each layer read ahead: profile + score {sec:.1f} s (reading "
            f"{placement.read_s:.1f} s), peak GPU allocated {format_size(peak())}; BI against the whole-layer "
            f"read-ahead: max |difference| {diff:.2e}"
        )
        if diff > 0:
            checks.fail(f"half a layer ahead: BI differs by {diff:.2e} from the whole-layer read-ahead")
        if cuda and peak() > limit:
            checks.fail(f"half a layer ahead: peak {format_size(peak())} above {format_size(limit)}")

    def distilled(model, placement, short, limit: int) -> None:  # type: ignore[no-untyped-def]
        # rank-16 adapters trained one layer at a time on the streamed layers, two steps
        reset()
        engine = PassEngine(model, family, placement)
        dist = distill_adapters(engine, distill_data(), short, rank=16, steps=2, batch_size=2, lr=3e-3, seed=0)
        say(
            f"streamed distillation: 2 steps of 2 x {SEQ} tokens, rank-16 adapters on {args.layers - len(short)} "
            f"layers, {dist.seconds:.1f} s; KL {dist.kl[0]:.4f} -> {dist.kl[-1]:.4f}; peak GPU allocated "
            f"{format_size(peak())}"
        )
        if not all(math.isfinite(k) for k in dist.kl):
            checks.fail(f"streamed distillation KL not finite: {dist.kl}")
        if cuda and peak() > limit:
            checks.fail(f"streamed distillation peak {format_size(peak())} above {format_size(limit)}")

    def resident(streamed_sec: float | None):  # type: ignore[no-untyped-def]
        reset()
        model = load_model(source, str(device), "bfloat16")
        bi, nll, sec = passes(PassEngine(model, family), calib, vocab)
        ratio = f"; streamed/resident time {streamed_sec / sec:.2f}" if streamed_sec else ""
        say(
            f"resident: profile + score {sec:.1f} s, peak GPU allocated {format_size(peak())}; NLL full "
            f"{nll['full']:.4f}, 25% removed {nll['short']:.4f}{ratio}"
        )
        checks.step("resident full-layer distillation", full_distilled, PassEngine(model, family), lowest_quarter(bi))
        return bi

    def full_distilled(engine, short) -> None:  # type: ignore[no-untyped-def]
        # what heal.distill_rank 0 (auto) chooses here, and whether its estimate holds the step's real peak
        from shortgpt_serve.config import Config
        from shortgpt_serve.healing.distill import distill, training_bytes
        from shortgpt_serve.healing.evaluate import distill_rank

        rank, why = distill_rank(Config(), engine, short)
        need, free = training_bytes(engine, short), engine.placement.free_bytes() or 0
        base = torch.cuda.memory_allocated(device) if cuda else 0
        reset()
        data = distill_data()
        chose = "adapters" if rank else "the layers themselves"
        try:
            dist = distill(engine, data, short, steps=1, batch_size=2, lr=1e-5, seed=0, progress=False)
        except torch.cuda.OutOfMemoryError:
            if rank == 0:
                raise
            say(f"resident full-layer distillation: out of memory, as the choice foresaw (auto chooses {chose})")
            return
        beside = peak() - base
        say(
            f"resident full-layer distillation: 1 step of 2 x {SEQ} tokens, {dist.seconds:.1f} s; peak beside the "
            f"model {format_size(beside)}, estimate {format_size(need)} (x{beside / need:.2f}), "
            f"{format_size(free)} free before; auto chooses {chose}"
            f"{': ' + why if why else ''}"
        )
        if cuda and rank == 0 and beside > free:
            checks.fail(f"auto chose full layers, but the step took {format_size(beside)} of {format_size(free)}")

    def shortened(bi: list[float]) -> None:
        removed = lowest_quarter(bi)
        out = root / "short"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        t0 = time.perf_counter()
        write_checkpoint(source, removed, out)
        kept = json.loads((out / "config.json").read_text())["num_hidden_layers"]
        took = time.perf_counter() - t0
        say(f"shortened checkpoint: {kept} of {args.layers} layers written to {out} in {took:.1f} s")
        if kept != args.layers - len(removed):
            checks.fail(f"the checkpoint keeps {kept} layers, not {args.layers - len(removed)}")

    def before_boot() -> None:
        # the work's memory is back (the launcher boots vLLM next): the check passes, then refuses while held
        check_before_boot([])
        say("check before a vLLM boot, after the work: passes")
        held = torch.empty(torch.cuda.mem_get_info(device)[0] // 3, dtype=torch.uint8, device=device)
        try:
            check_before_boot([])
            checks.fail("the check before a vLLM boot passed while a third of the GPU was held")
        except ServeError as e:
            say(f"check before a vLLM boot, a third held: {e}")
        finally:
            del held
            torch.cuda.empty_cache()

    checks.step("memory plan", memory_plan)
    got = checks.step("streamed", streamed)
    bi_s, sec_s = got if got else (None, None)
    gc.collect()
    bi_r = checks.step("resident", resident, sec_s)
    gc.collect()
    if bi_s and bi_r:
        diff = max(abs(a - b) for a, b in zip(bi_s, bi_r, strict=True))
        say(f"BI streamed vs resident: max |difference| {diff:.2e} over {len(bi_r)} layers")
        if diff > 1e-3:
            checks.fail(f"BI differs by {diff:.2e} between placements")
    checks.step("shortened checkpoint", shortened, bi_r or bi_s or [float(i) for i in range(args.layers)])
    if cuda:
        torch.cuda.empty_cache()
        end_free = torch.cuda.mem_get_info(device)[0]
        say(f"GPU free after the work: {end_free / GiB:.1f} GiB (start {start_free / GiB:.1f} GiB)")
        if end_free < start_free - GiB:
            checks.fail(f"{(start_free - end_free) / GiB:.1f} GiB of GPU memory not returned")
        checks.step("check before a vLLM boot", before_boot)
    for f in checks.failures:
        say(f"FAIL: {f}")
    say("PASS" if not checks.failures else f"{len(checks.failures)} check(s) failed")
    return 1 if checks.failures else 0


if __name__ == "__main__":
    sys.exit(main())
