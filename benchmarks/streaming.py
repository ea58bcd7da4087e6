"""Streaming checkpoint writer vs plain `cp` of the same bytes, on a multi-GB sharded checkpoint generated here.

    .venv/bin/python benchmarks/streaming.py [--layers 24] [--hidden 2048] [--shard-mb 500] [--repeats 3]

Generates a Llama-shaped checkpoint of random bf16 bits (about 2.7 GB with the defaults, in 500 MB shards), then
alternates, ``--repeats`` times: `write_checkpoint` removing a quarter of the layers (the middle ones), in a fresh
child process (peak RSS read from its VmHWM, CPU seconds of all its threads), once with the cache's hash memo of the
source (as the run calls it: shards that come out unchanged are copied whole and not hashed again) and once without;
and `cp` of exactly the files it wrote (the kept bytes) to another folder. Both read the source from the page cache.
The load average is recorded beside the figures: on a shared machine the wall-clock ratio says little, the CPU
seconds more. Targets: time <= 1.5x cp, peak RSS <= largest shard + 300 MB. Results are appended to
benchmarks/results/streaming.md."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _record import record


def generate(folder: Path, layers: int, hidden: int, shard_mb: int, normal: bool = False, device: str = "cpu") -> None:
    """A Llama-shaped checkpoint of ``layers`` layers in bf16 shards of ``shard_mb``: random bits, or with
    ``normal`` weights a model can run (N(0, 0.02), norms 1) for benchmarks that compute with it. ``device``: where
    the random numbers are drawn (a GPU draws a 15 GB model in seconds; the values differ from the CPU's)."""
    import torch
    from safetensors.torch import save_file

    inter, vocab, kv = int(hidden * 2.75), 32000, hidden // 4
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 128,
        "num_key_value_heads": kv // 128,
        "vocab_size": vocab,
        "torch_dtype": "bfloat16",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    }
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.weight", (kv, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    gen = torch.Generator(device).manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in shapes:
        if not normal:  # random bits read as bf16: the writer copies bytes, so their values do not matter
            t = torch.randint(-(1 << 15), 1 << 15, shape, dtype=torch.int16, generator=gen, device=device)
            t = t.view(torch.bfloat16).cpu()
        elif len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu()
        nbytes = t.numel() * 2
        if size and size + nbytes > shard_mb << 20:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for k, tensors in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))


def _unchanged(shard: Path, first_removed: int) -> bool:
    """Whether every tensor of ``shard`` keeps its name when layers from ``first_removed`` on are renumbered."""
    from shortgpt_serve.models.weights import read_header

    header, _ = read_header(shard)
    layers = [int(n.split(".")[2]) for n in header if n.startswith("model.layers.")]
    return all(i < first_removed for i in layers)


def child(src: str, out: str, removed: list[int], memo: str) -> None:
    from shortgpt_serve.cache import FileHashes
    from shortgpt_serve.checkpoint import write_checkpoint
    from shortgpt_serve.models.families import family_for
    from shortgpt_serve.models.source import ModelSource, read_config

    config = read_config(Path(src))
    source = ModelSource(Path(src), "bench", src, "0" * 64, config, family_for(config, src))
    start, cpu = time.perf_counter(), time.process_time()
    write_checkpoint(source, removed, Path(out), known=FileHashes(Path(memo)).known if memo else None)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"seconds": elapsed, "cpu_seconds": cpu, "peak_mib": hwm / 1024}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--shard-mb", type=int, default=500)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--remove",
        choices=["middle", "deep"],
        default="middle",
        help="the quarter of layers removed: the middle ones, or the deep ones before the last (where Block "
        "Influence is lowest in the ShortGPT paper's Llama models)",
    )
    p.add_argument("--workdir", default=None)
    p.add_argument("--child", nargs=4, metavar=("SRC", "OUT", "REMOVED", "MEMO"))
    args = p.parse_args()
    if args.child:
        child(args.child[0], args.child[1], json.loads(args.child[2]), args.child[3])
        return

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        t0 = time.perf_counter()
        generate(src, args.layers, args.hidden, args.shard_mb)
        gen_s = time.perf_counter() - t0
        shard_sizes = [f.stat().st_size for f in src.glob("*.safetensors")]
        quarter = args.layers // 4
        first = args.layers // 2 - args.layers // 8 if args.remove == "middle" else args.layers - 1 - quarter
        removed = list(range(first, first + quarter))
        # The run hashes the source for its cache key before it writes (the hash memo): do the same, once, after
        # the memo's 2-second guard against files changed within one timestamp tick.
        memo = Path(tmp) / "cache"
        time.sleep(2.5)
        from shortgpt_serve.cache import FileHashes

        hashes = FileHashes(memo)
        for f in src.glob("*.safetensors"):
            hashes.sha256(f)
        unchanged = sum(hashes.known(f) is not None and _unchanged(f, removed[0]) for f in src.glob("*.safetensors"))
        copies, hashed, copy_cpu = [], [], []
        writes: dict[str, list[float]] = {"memo": [], "none": []}
        write_cpu: dict[str, list[float]] = {"memo": [], "none": []}
        peaks: list[float] = []
        kept_bytes = 0
        for r in range(args.repeats):
            for variant in ("memo", "none"):
                out = Path(tmp) / f"out{r}-{variant}"
                res = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        str(src),
                        str(out),
                        json.dumps(removed),
                        str(memo) if variant == "memo" else "",
                    ],
                    capture_output=True,
                    text=True,
                )
                if res.returncode:
                    raise SystemExit(f"the writer failed:\n{res.stderr[-3000:]}")
                stats = json.loads(res.stdout.strip().splitlines()[-1])
                writes[variant].append(stats["seconds"])
                write_cpu[variant].append(stats["cpu_seconds"])
                peaks.append(stats["peak_mib"])
            shutil.rmtree(Path(tmp) / f"out{r}-none")
            out = Path(tmp) / f"out{r}-memo"
            files = sorted(out.glob("*.safetensors"))
            kept_bytes = sum(f.stat().st_size for f in files)
            dst = Path(tmp) / f"cp{r}"
            dst.mkdir()
            (Path(tmp) / f"cps{r}").mkdir()
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run(["cp", *map(str, files), str(dst)], check=True)
            copies.append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            copy_cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
            # The same integrity as the writer records: cp, then sha256 of what was written.
            start = time.perf_counter()
            subprocess.run(["cp", *map(str, files), str(dst2 := Path(tmp) / f"cps{r}")], check=False)
            subprocess.run(["sha256sum", *map(str, files)], check=True, capture_output=True)
            hashed.append(time.perf_counter() - start)
            shutil.rmtree(dst2, ignore_errors=True)
            shutil.rmtree(out)
            shutil.rmtree(dst)
    w, c, h = statistics.median(writes["memo"]), statistics.median(copies), statistics.median(hashed)
    w0 = statistics.median(writes["none"])
    load, cores = os.getloadavg(), len(os.sched_getaffinity(0))
    largest = max(shard_sizes) / 2**20
    peak = max(peaks)
    lines = [
        f"## {time.strftime('%Y-%m-%d %H:%M')} — {args.layers} layers, hidden {args.hidden}, "
        f"{sum(shard_sizes) / 2**30:.2f} GiB in {len(shard_sizes)} shards, {len(removed)} layers removed",
        "",
        f"- generated in {gen_s:.0f} s; kept bytes {kept_bytes / 2**30:.2f} GiB",
        f"- removed layers {removed[0]}..{removed[-1]}; the source was hashed once before (as the run does for its "
        f"cache key); {unchanged} of {len(shard_sizes)} shards hold only tensors kept under their own names",
        f"- write_checkpoint with the hash memo (as the run calls it): median {w:.2f} s, runs "
        f"{[round(x, 2) for x in writes['memo']]}",
        f"- write_checkpoint without it (every shard hashed as written): median {w0:.2f} s, runs "
        f"{[round(x, 2) for x in writes['none']]}",
        f"- cp of the same files: median {c:.2f} s, runs {[round(x, 2) for x in copies]}",
        f"- **time ratio {w / c:.2f}** with the memo (target <= 1.5); {w0 / c:.2f} without",
        f"- CPU seconds (user + system, all threads): writer median {statistics.median(write_cpu['memo']):.2f} "
        f"with the memo, {statistics.median(write_cpu['none']):.2f} without, cp median "
        f"{statistics.median(copy_cpu):.2f}; {cores} cores, load average {load[0]:.1f} / {load[1]:.1f} / "
        f"{load[2]:.1f} (1 / 5 / 15 min) when the runs ended",
        f"- cp then sha256sum of the same files (the integrity the writer records): median {h:.2f} s, runs "
        f"{[round(x, 2) for x in hashed]}; writer / (cp + sha256sum) = {w / h:.2f}",
        f"- peak RSS of the writer process {peak:.0f} MiB; largest shard {largest:.0f} MiB: **{peak:.0f} <= "
        f"{largest + 300:.0f} MiB target: {'met' if peak <= largest + 300 else 'missed'}**",
        "",
        f"Command: `.venv/bin/python benchmarks/streaming.py --layers {args.layers} --hidden {args.hidden} "
        f"--shard-mb {args.shard_mb} --repeats {args.repeats} --remove {args.remove}`",
        "",
    ]
    record("streaming", lines)


if __name__ == "__main__":
    main()
