"""Plain removal vs linear healing (and the angular block, plain) at several depths on the default model, side by side.

    .venv/bin/python benchmarks/healing.py [--depths 4,8,10] [--eval-limit 100] [--distill 10]
        [--objectives squared,relative] [--ranks 16 [--adapter-lr 1e-3] [--no-full-distill]] [--heal-text NAME=PATH]

One process, one model: the BI profile (and all-pairs angular distances) on the calibration text, the full model's
scores, then at each depth the lowest-BI removal scored plain and healed in one pass (the maps fitted on the
calibration text, disjoint from everything evaluated; one healed row per least-squares objective given to
``--objectives``), and the angular criterion's block plain; at the depths given to ``--distill``, also linear (the
first objective) followed by distillation (heal.distill_* defaults): of the kept layers themselves, and of rank-N
low-rank adapters trained one layer at a time for each rank given to ``--ranks`` (the path a streamed model takes;
``--adapter-lr`` their learning rate); with ``--heal-text NAME=PATH`` (repeatable), one more linear row per text,
its maps fitted on that text (the same number of tokens as the calibration set) instead of the calibration text, for
the same removal (the profile stays on the calibration text), and at the ``--distill`` depths a distilled row
trained on that text too (``benchmarks/qa_text.py`` writes question-and-answer text for it). Each row: quality
retained with its 95% paired bootstrap interval, held-out perplexity, mean KL(full || model) per token, top-1
agreement with the full model, LAMBADA last-word greedy accuracy, healed minus plain retained with its 95% paired
interval (the same items resampled for the full, the plain and the healed model), and the healing time. Results are
appended to benchmarks/results/healing.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from typing import Any

from _record import record


def fmt(q: dict[str, Any]) -> list[str]:
    ci = q.get("retained_ci")
    interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    return [
        f"{q['retained']:.3f}{interval}",
        f"{q['perplexity']:.2f}",
        f"{q['kl']:.3f}",
        f"{q['agreement']:.3f}",
        f"{q['lambada']:.3f}",
    ]


def gain(q: dict[str, Any]) -> str:
    """Healed minus plain retained with its paired 95% interval ('—' for an unhealed row)."""
    ci, plain = q.get("gain_ci"), q.get("plain")
    if plain is None:
        return "—"
    diff = f"{q['retained'] - plain['retained']:+.3f}"
    return f"{diff} [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="4,8,10")
    parser.add_argument("--eval-limit", type=int, default=100)
    parser.add_argument("--distill", default="", help="depths to distil too, e.g. 10")
    parser.add_argument("--objectives", default="", help="linear objectives side by side (default: heal.objective)")
    parser.add_argument("--ranks", default="", help="adapter ranks to distil at the --distill depths too, e.g. 16")
    parser.add_argument("--adapter-lr", type=float, default=None, help="adapters' learning rate (heal.adapter_lr)")
    parser.add_argument(
        "--no-full-distill",
        action="store_true",
        help="at the --distill depths, no full distillation on the calibration text",
    )
    parser.add_argument(
        "--heal-text",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="fit linear maps (and distil at --distill) on this text too",
    )
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",") if r]
    depths = [int(d) for d in args.depths.split(",")]
    distilled = {int(d) for d in args.distill.split(",") if d}

    from shortgpt_serve.cache import FileHashes
    from shortgpt_serve.calibration import batches, load_documents, pack
    from shortgpt_serve.config import Config, HealConfig, QualityConfig
    from shortgpt_serve.healing.evaluate import Healer
    from shortgpt_serve.inputs import read_calibration, resolve_source
    from shortgpt_serve.keys import quality_key
    from shortgpt_serve.models.loading import load_tokenizer
    from shortgpt_serve.passes import Batch
    from shortgpt_serve.profile import profile_model
    from shortgpt_serve.quality.meter import QualityMeter
    from shortgpt_serve.selection import plan_angular, plan_bi
    from shortgpt_serve.session import ModelSession

    config = Config(quality=QualityConfig(limit=args.eval_limit), heal=HealConfig(method="linear"))
    docs = read_calibration(config)
    source = resolve_source(config)
    session = ModelSession(config, source, docs)
    t0 = time.perf_counter()
    profile = profile_model(
        session.engine(),
        session.calib(),
        batch_size=config.profile.batch_size,
        model_sha256=source.sha256,
        angular=True,
        progress=False,
    )
    profile_s = time.perf_counter() - t0
    sel = config.selection
    bi_plan = plan_bi(profile.bi, sel.keep_first, sel.keep_last)
    assert profile.angular is not None
    angular_plan = plan_angular(profile.angular, sel.keep_first, sel.keep_last)
    engine = session.engine(config.quality.dtype)
    meter = QualityMeter(
        config,
        source,
        engine,
        load_tokenizer(source),
        docs.heldout,
        key={**quality_key(config, source, docs.heldout, FileHashes(config.resolved_cache_dir())), "run": "healing"},
        exclude=docs.calibration,
    )
    meter.progress = False
    full = meter.measure_full()
    objectives = [o for o in args.objectives.split(",") if o] or [config.heal.objective]
    healers = [
        Healer(
            dataclasses.replace(config, heal=dataclasses.replace(config.heal, objective=o)),
            lambda: engine,
            session.calibration_batches,
            meter,
            progress=False,
        )
        for o in objectives
    ]

    def text_batches(path: str) -> Callable[[], list[Any]]:
        cal = config.calibration
        packed = pack(load_documents(path, 0.0, cal.seed), load_tokenizer(source), cal.num_tokens, cal.seq_len)
        pad = int(getattr(engine.model.config, "pad_token_id", None) or 0)
        return lambda: [Batch(i, m) for i, m in batches(packed.sequences, config.profile.batch_size, pad)]

    text_healers = {
        name: Healer(config, lambda: engine, text_batches(path), meter, progress=False)
        for name, path in (t.split("=", 1) for t in args.heal_text)
    }

    header = [
        "removed",
        "method",
        "layers",
        "retained [95% CI]",
        "ppl",
        "KL",
        "top-1",
        "LAMBADA",
        "vs plain [95% CI]",
        "healing s",
    ]
    rows = [
        [
            "0",
            "full model",
            "—",
            "1.000",
            f"{full['perplexity']:.2f}",
            "0.000",
            "1.000",
            f"{full['lambada']:.3f}",
            "—",
            "—",
        ]
    ]
    for n in depths:
        removed = bi_plan[n]
        layers = ",".join(map(str, removed))
        for i, healer in enumerate(healers):
            healed = healer(removed)
            healing = healer.fitted[tuple(sorted(removed))]
            if i == 0:
                rows.append([str(n), "bi plain", layers, *fmt(healed["plain"]), "—", "—"])
            method = f"bi linear ({healer.config.heal.objective})"
            rows.append([str(n), method, layers, *fmt(healed), gain(healed), f"{healing.seconds:.1f}"])
        for name, text_healer in text_healers.items():
            healed = text_healer(removed)
            linear_s = text_healer.fitted[tuple(sorted(removed))].seconds
            rows.append(
                [str(n), f"bi linear (fitted on {name})", layers, *fmt(healed), gain(healed), f"{linear_s:.1f}"]
            )
            if n in distilled:
                distilled_q, dist = text_healer.distilled(removed)
                seconds = f"{linear_s + dist.seconds:.1f}"
                rows.append([str(n), f"bi distill (on {name})", layers, *fmt(distilled_q), gain(distilled_q), seconds])
        healer = healers[0]
        if n in distilled and not args.no_full_distill:
            distilled_q, dist = healer.distilled(removed)
            seconds = f"{healing.seconds + dist.seconds:.1f}"
            rows.append([str(n), "bi distill", layers, *fmt(distilled_q), gain(distilled_q), seconds])
        for rank in ranks if n in distilled else []:
            heal = dataclasses.replace(healer.config.heal, distill_rank=rank)
            if args.adapter_lr is not None:
                heal = dataclasses.replace(heal, adapter_lr=args.adapter_lr)
            config_r = dataclasses.replace(healer.config, heal=heal)
            adapter = Healer(config_r, lambda: engine, session.calibration_batches, meter, progress=False)
            adapter.fitted = healer.fitted  # the linear start already fitted
            distilled_q, dist = adapter.distilled(removed)
            seconds = f"{healing.seconds + dist.seconds:.1f}"
            method = f"bi distill, rank-{rank} adapters (lr {heal.adapter_lr:g})"
            rows.append([str(n), method, layers, *fmt(distilled_q), gain(distilled_q), seconds])
        angular = meter(angular_plan[n])
        rows.append([str(n), "angular plain", ",".join(map(str, angular_plan[n])), *fmt(angular), "—", "—"])

    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        f"## {time.strftime('%Y-%m-%d')}: {source.name}, {args.eval_limit} items per task "
        f"({', '.join(config.quality.tasks)}), {config.quality.perplexity_tokens} held-out tokens, "
        f"{full.get('lambada_n')} LAMBADA passages, calibration {profile.num_tokens} tokens "
        f"(profile {profile_s:.1f} s), dtype {config.quality.dtype}",
        "",
        "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
        *("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows),
        "",
        f"Settings: {dataclasses.asdict(healers[0].config.heal)}; bootstrap {config.quality.bootstrap} resamples.",
        "",
    ]
    record("healing", lines)


if __name__ == "__main__":
    main()
