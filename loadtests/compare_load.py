"""Load test of the shortened and the full model with vLLM's own serving benchmark, same workload, side by side.

The load tool is vLLM's benchmark client (`vllm bench serve`, module ``vllm.benchmarks.serve``): random token
prompts of a fixed length, a fixed number of output tokens (end of sequence ignored), streaming, with TTFT, TPOT,
ITL and end-to-end latency percentiles. Each endpoint kind (completions, chat) runs at each concurrency on both
models; the ratios shortened / full are printed at the end and everything is saved as JSON.

Two ways to run it:

1. Against running servers, local or remote (the full model served too, e.g. `shortgpt-serve --budget 1.0`,
   which removes nothing, or plain vLLM on the original model):

       .venv/bin/python loadtests/compare_load.py \\
           --shortened http://host-a:8000 --shortened-model SmolLM2-135M-Instruct-short \\
           --full http://host-b:8000 --full-model SmolLM2-135M-Instruct \\
           --tokenizer PATH_OR_HUB_ID --concurrency 1,16 --num-prompts 64

   The API key comes from OPENAI_API_KEY (or --api-key), as vLLM's benchmark reads it.

2. Locally from a checkpoint written by `shortgpt-serve prune`: the full model (found from the checkpoint's
   provenance) and the shortened one are started one after the other with the launcher's engine settings, so
   they never compete for the machine:

       .venv/bin/python loadtests/compare_load.py --checkpoint ~/.cache/shortgpt-serve/checkpoints/<name>

Bounded: --num-prompts requests per run, and the runs listed; point it only at servers you operate.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ENDPOINTS = {"completions": ("openai", "/v1/completions"), "chat": ("openai-chat", "/v1/chat/completions")}
SHOWN = ("output_throughput", "request_throughput", "median_ttft_ms", "median_tpot_ms", "median_e2el_ms", "p99_e2el_ms")


def bench(
    base_url: str, model: str, tokenizer: str, kind: str, concurrency: int, args: argparse.Namespace, out: Path
) -> dict[str, Any]:
    """One run of vLLM's serving benchmark; its saved result."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    backend, endpoint = ENDPOINTS[kind]
    name = f"{model}-{kind}-c{concurrency}.json"
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    bench_args = parser.parse_args(
        [
            "--backend",
            backend,
            "--base-url",
            base_url,
            "--endpoint",
            endpoint,
            "--model",
            model,
            "--tokenizer",
            tokenizer,
            "--dataset-name",
            "random",
            "--random-input-len",
            str(args.input_len),
            "--random-output-len",
            str(args.output_len),
            "--ignore-eos",
            "--num-prompts",
            str(args.num_prompts),
            "--max-concurrency",
            str(concurrency),
            "--request-rate",
            "inf",
            "--seed",
            str(args.seed),
            "--temperature",
            "0",
            "--num-warmups",
            "2",
            "--percentile-metrics",
            "ttft,tpot,itl,e2el",
            "--metric-percentiles",
            "50,90,99",
            "--save-result",
            "--result-dir",
            str(out),
            "--result-filename",
            name,
            "--disable-tqdm",
        ]
    )
    main(bench_args)
    result: dict[str, Any] = json.loads((out / name).read_text())
    return result


@contextlib.contextmanager
def local_engine(model_dir: Path, served_name: str) -> Iterator[str]:
    """The launcher's engine, started with its settings on a private loopback port; yields its base URL."""
    from shortgpt_serve.config import ServeConfig
    from shortgpt_serve.serving.serve import free_loopback_port, start_engine

    cfg = ServeConfig(port=free_loopback_port(), metrics_port=0)
    engine = start_engine(model_dir, cfg, served_name)
    try:
        engine.wait_ready(cfg.health_timeout)
        yield engine.base_url
    finally:
        engine.stop(cfg.stop_timeout)


@dataclasses.dataclass
class Target:
    label: str
    url: str | None
    model: str
    folder: Path | None = None


def targets_from_checkpoint(checkpoint: Path) -> list[Target]:
    from shortgpt_serve.checkpoint import verify_checkpoint
    from shortgpt_serve.models.source import resolve_model

    record = verify_checkpoint(checkpoint)
    src = record.source
    origin = str(src.origin)
    spec = None if origin.startswith("embedded default") else origin.removeprefix("hub:")
    cache = Path(os.environ.get("SHORTGPT_SERVE_CACHE_DIR") or Path.home() / ".cache" / "shortgpt-serve")
    full = resolve_model(spec, cache)
    name = record.served_model_name or f"{src.name}-short"
    return [Target("full", None, src.name, full.path), Target("shortened", None, name, checkpoint)]


def run_target(target: Target, tokenizer: str, args: argparse.Namespace, out: Path) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        url = target.url or stack.enter_context(local_engine(target.folder, target.model))  # type: ignore[arg-type]
        for kind in args.endpoints:
            for c in args.concurrency:
                print(f"[load] {target.label} ({target.model}) {kind} concurrency {c}", file=sys.stderr)
                results[f"{kind} c{c}"] = bench(url, target.model, tokenizer, kind, c, args, out)
    return results


def report(full: dict[str, dict[str, Any]], short: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| run | model | " + " | ".join(SHOWN) + " | failed |",
        "|---|---|" + "---:|" * (len(SHOWN) + 1),
    ]
    for run in short:
        for label, res in (("full", full[run]), ("shortened", short[run])):
            values = " | ".join(f"{res.get(k, float('nan')):.2f}" for k in SHOWN)
            lines.append(f"| {run} | {label} | {values} | {res.get('failed', 0)} |")
    lines += [
        "",
        "| run | throughput ratio (short/full) | median e2e ratio | median TTFT ratio |",
        "|---|---:|---:|---:|",
    ]
    for run in short:
        f, s = full[run], short[run]
        lines.append(
            f"| {run} | {s['output_throughput'] / f['output_throughput']:.3f} | "
            f"{s['median_e2el_ms'] / f['median_e2el_ms']:.3f} | {s['median_ttft_ms'] / f['median_ttft_ms']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="A shortened checkpoint: start both models locally.")
    parser.add_argument("--shortened", help="Base URL of the shortened model's server (e.g. http://host:8000).")
    parser.add_argument("--shortened-model", help="Model name the shortened server serves.")
    parser.add_argument("--full", help="Base URL of the full model's server.")
    parser.add_argument("--full-model", help="Model name the full server serves.")
    parser.add_argument("--tokenizer", help="Tokenizer folder or hub id for the prompts. Default: the checkpoint.")
    parser.add_argument("--api-key", help="API key of the servers (default: $OPENAI_API_KEY).")
    parser.add_argument("--endpoints", default="completions,chat", help="completions, chat or both (comma-separated).")
    parser.add_argument("--concurrency", default="1,16", help="Comma-separated concurrency levels.")
    parser.add_argument("--num-prompts", type=int, default=64, help="Requests per run.")
    parser.add_argument("--input-len", type=int, default=128, help="Prompt tokens per request.")
    parser.add_argument("--output-len", type=int, default=64, help="Output tokens per request.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("loadtests/results"), help="Folder for the JSON results.")
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.endpoints = [e.strip() for e in args.endpoints.split(",") if e.strip()]
    if unknown := [e for e in args.endpoints if e not in ENDPOINTS]:
        parser.error(f"--endpoints: unknown {unknown}; use completions, chat or both")
    if args.api_key:
        os.environ["OPENAI_API_KEY"] = args.api_key
    if args.checkpoint:
        targets = targets_from_checkpoint(args.checkpoint)
        tokenizer = args.tokenizer or str(args.checkpoint)
    elif args.shortened and args.full and args.shortened_model and args.full_model and args.tokenizer:
        targets = [
            Target("full", args.full, args.full_model),
            Target("shortened", args.shortened, args.shortened_model),
        ]
        tokenizer = args.tokenizer
    else:
        parser.error("pass --checkpoint, or --shortened/--shortened-model, --full/--full-model and --tokenizer")
    out = args.out / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    full = run_target(targets[0], tokenizer, args, out)
    short = run_target(targets[1], tokenizer, args, out)
    text = report(full, short)
    (out / "report.md").write_text(text + "\n")
    print(text)
    print(f"\nResults: {out}")
    failed = sum(r.get("failed", 0) for r in (*full.values(), *short.values()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
