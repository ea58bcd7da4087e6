"""KL and top-1 agreement with the full model, LAMBADA greedy last words, capped retained shares and the paired
bootstrap, each checked against a plain reference."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from shortgpt_serve.calibration import default_documents
from shortgpt_serve.errors import QualityError
from shortgpt_serve.models.families import FAMILIES
from shortgpt_serve.models.layers import skipped_layers
from shortgpt_serve.passes import Batch, PassEngine, Route
from shortgpt_serve.quality import Request, TaskScore, encode_request, quality_retained
from shortgpt_serve.quality.bootstrap import gain_interval, retained_interval
from shortgpt_serve.quality.divergence import Divergence, FinalStates
from shortgpt_serve.quality.lambada import GreedyScore, lambada_requests, last_word_request
from shortgpt_serve.quality.perplexity import perplexity_batches
from shortgpt_serve.quality.scoring import RequestBatches
from tests.conftest import CORPUS, tiny_config

SKIPS = [(2, 3), (4,), (0, 1, 5)]


@pytest.fixture(scope="module")
def tokenizer(make_tiny_model: Callable[..., Path]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_tiny_model("llama"))


@pytest.fixture(scope="module")
def model() -> Any:
    """A tiny random Llama with weights large enough for peaked next-token distributions (so removing layers
    moves them measurably: KL of order 0.1-1 nats, agreement well below 1)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config("llama", max_position_embeddings=512, initializer_range=0.2)
    return AutoModelForCausalLM.from_config(config).eval()


def logprobs(model: Any, ids: list[int], removed: tuple[int, ...] = ()) -> torch.Tensor:
    """log-softmax of a plain forward of one unpadded sequence, float64, with ``removed`` layers deleted."""
    with torch.no_grad(), skipped_layers(model, FAMILIES["llama"], removed):
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double().log_softmax(-1)


def reference_divergence(
    model: Any, blocks: list[Batch], removed: tuple[int, ...], other: Any = None
) -> dict[str, float]:
    """KL(model || ``other`` (default: the same model) with ``removed`` deleted) per predicted token and top-1
    agreement, and their standard errors over sequences."""
    kls, agrees, counts = [], [], []
    for block in blocks:
        for ids, mask in zip(block.input_ids.tolist(), block.attention_mask.tolist(), strict=True):
            real = [t for t, m in zip(ids, mask, strict=True) if m]
            full, short = logprobs(model, real)[:-1], logprobs(other or model, real, removed)[:-1]
            kls.append(float((full.exp() * (full - short)).sum()))
            agrees.append(float((full.argmax(-1) == short.argmax(-1)).sum()))
            counts.append(len(real) - 1)
    n, m = sum(counts), len(counts)

    def se(values: list[float]) -> float:
        r = sum(values) / n
        return math.sqrt(sum((v - r * c) ** 2 for v, c in zip(values, counts, strict=True)) * m / (m - 1)) / n

    return {"kl": sum(kls) / n, "kl_se": se(kls), "agreement": sum(agrees) / n, "agreement_se": se(agrees)}


def divergences(model: Any, blocks: list[Batch], skips: list[tuple[int, ...]]) -> list[Any]:
    """Each skip-set's divergence from the full model, measured in one pass with the full model's route first."""
    engine = PassEngine.of(model)
    final = FinalStates(engine.num_layers - 1, 0, len(blocks))
    readers = [Divergence(engine, blocks, final.states) for _ in skips]
    routes = [Route(observers=[final])]
    routes += [Route(frozenset(s), on_logits=r) for s, r in zip(skips, readers, strict=True)]
    engine.run(blocks, routes)
    return [r.stats for r in readers]


def test_kl_and_agreement_match_plain_forwards(model: Any, tokenizer: Any) -> None:
    docs = [s.strip() + "." for s in CORPUS.split(".") if s.strip()]
    blocks = perplexity_batches(tokenizer, docs, max_tokens=500, seq_len=48, batch_size=3, max_len=512)
    assert len(blocks) > 1 and int(blocks[-1].attention_mask.sum()) < blocks[-1].attention_mask.numel()  # padding
    got = divergences(model, blocks, [(), *SKIPS])
    itself, *removed = got
    assert itself is not None and itself.kl == pytest.approx(0.0, abs=1e-6) and itself.agreement == 1.0
    for skip, stats in zip(SKIPS, removed, strict=True):
        want = reference_divergence(model, blocks, skip)
        assert stats.kl > 0.01 and stats.agreement < 0.9  # the comparison is not trivial
        assert stats.kl == pytest.approx(want["kl"], abs=1e-4)
        assert stats.agreement == pytest.approx(want["agreement"], abs=1e-9)
        assert stats.kl_se == pytest.approx(want["kl_se"], abs=1e-4)
        assert stats.agreement_se == pytest.approx(want["agreement_se"], abs=1e-9)
    assert removed[0].tokens == sum(int(b.attention_mask[:, 1:].sum()) for b in blocks)


# ---------------------------------------------------------------------------------------------------------------
# LAMBADA


def greedy_requests(model: Any, tokenizer: Any) -> list[Request]:
    """Requests whose continuation is the model's own greedy continuation (one or two tokens) and others that
    are not, so the greedy check sees both outcomes."""
    out = []
    for text in ["The quick brown", "She sells sea", "A journey of a", "All that glitters is", "The lazy"]:
        ids = list(tokenizer(text, add_special_tokens=False).input_ids)
        for steps in (1, 2):
            seq = list(ids)
            for _ in range(steps):
                seq.append(int(logprobs(model, seq)[-1].argmax()))
            cont = tokenizer.decode(seq[len(ids) :])
            out.append(Request(text, cont))
        out.append(Request(text, " fox"))
        out.append(Request(text, " dog jumps"))
    return out


def test_greedy_check_matches_a_plain_forward(model: Any, tokenizer: Any) -> None:
    requests = greedy_requests(model, tokenizer)
    engine = PassEngine.of(model)
    prepared = RequestBatches.build(tokenizer, requests, 3, engine)
    lls = [(0.0, 0)] * len(requests)
    greedy = [False] * len(requests)
    engine.run(prepared.batches, [Route(on_logits=prepared.reader(lls, greedy))])
    want = []
    for req in requests:
        ids, n = encode_request(tokenizer, req)
        lp = logprobs(model, ids)
        want.append(all(int(lp[t - 1].argmax()) == ids[t] for t in range(len(ids) - n, len(ids))))
    assert greedy == want
    assert any(want) and not all(want)
    assert GreedyScore.of(greedy) == GreedyScore(
        sum(want) / len(want), math.sqrt(sum(want) / len(want) * (1 - sum(want) / len(want)) / len(want)), len(want)
    )
    assert GreedyScore.of([]) is None


def test_lambada_items_split_the_last_word_and_skip_calibration_text() -> None:
    assert last_word_request('He said, "Go home, Shane') == Request('He said, "Go home,', " Shane")
    assert last_word_request("nospace") is None and last_word_request("trailing ") is None
    passages = list(dict.fromkeys(p for p in default_documents()[0] if p.strip()))
    items = lambada_requests(50, seed=3)
    assert len(items) == 50 and items == lambada_requests(50, seed=3) and items != lambada_requests(50, seed=4)
    assert all(r.context + r.continuation in passages for r in items)
    # Held-out documents that are LAMBADA passages are the pool (other held-out text is not).
    heldout = [*passages[:40], "Some other held-out text that is not LAMBADA."]
    held = lambada_requests(100, seed=3, heldout=heldout)
    assert {r.context + r.continuation for r in held} == set(passages[:40])
    # Calibration passages never become items.
    calibration = [r.context + r.continuation for r in items[:25]]
    kept = lambada_requests(50, seed=3, exclude=calibration)
    assert len(kept) == 50 and not {r.context + r.continuation for r in kept} & set(calibration)
    assert lambada_requests(0, seed=3) == []


# ---------------------------------------------------------------------------------------------------------------
# Capped shares and the paired bootstrap


def scores_of(correct: dict[str, list[bool]], chance: float) -> dict[str, TaskScore]:
    return {t: TaskScore(t, sum(v) / len(v), 0.0, len(v), chance) for t, v in correct.items()}


def test_a_gain_on_one_task_does_not_hide_a_loss_on_another() -> None:
    full = {"a": TaskScore("a", 0.70, 0.0, 200, 0.5), "b": TaskScore("b", 0.70, 0.0, 200, 0.5)}
    short = {"a": TaskScore("a", 0.80, 0.0, 200, 0.5), "b": TaskScore("b", 0.60, 0.0, 200, 0.5)}
    r = quality_retained(full, short)
    assert r.per_task == {"a": 1.0, "b": pytest.approx(0.5)}
    assert r.retained == pytest.approx(0.75)  # uncapped, (1.5 + 0.5) / 2 would call it lossless


def outcomes(n: int, p_full: float, p_short: float, seed: int) -> tuple[list[bool], list[bool]]:
    """Paired outcomes: the shortened model loses some items the full model gets and gains a few."""
    rng = random.Random(seed)
    full = [rng.random() < p_full for _ in range(n)]
    short = [f if rng.random() < 0.85 else rng.random() < p_short for f in full]
    return full, short


def test_paired_bootstrap_interval() -> None:
    widths = []
    for n in (100, 1000):
        fa, sa = outcomes(n, 0.75, 0.55, seed=1)
        fb, sb = outcomes(n, 0.70, 0.60, seed=2)
        full, short = {"a": fa, "b": fb}, {"a": sa, "b": sb}
        chances = {"a": [0.5] * n, "b": [0.5] * n}
        point = quality_retained(scores_of(full, 0.5), scores_of(short, 0.5)).retained
        ci = retained_interval(full, short, chances, 1000, seed=1234)
        assert ci is not None and ci[0] < point < ci[1] <= 1.0
        assert retained_interval(full, short, chances, 1000, seed=1234) == ci
        assert retained_interval(full, short, chances, 1000, seed=99) != ci
        widths.append(ci[1] - ci[0])
    assert widths[1] < widths[0] / 2  # ten times the items: about a third of the width
    assert retained_interval(full, short, chances, 0, seed=1) is None
    # Pairing: the same outcomes for both models leave no doubt that everything is retained.
    assert retained_interval(full, full, chances, 200, seed=1) == (1.0, 1.0)


def test_paired_gain_interval() -> None:
    """Healed minus plain retained: zero-width at zero for the same outcomes, excluding zero for a model that
    gets clearly more items right, holding zero for the same gain on a tenth of the items."""
    n = 400
    fa, plain_a = outcomes(n, 0.80, 0.55, seed=3)
    fb, plain_b = outcomes(n, 0.75, 0.55, seed=4)
    full, plain = {"a": fa, "b": fb}, {"a": plain_a, "b": plain_b}
    chances = {"a": [0.5] * n, "b": [0.5] * n}
    assert gain_interval(full, plain, plain, chances, 500, seed=7) == (0.0, 0.0)
    # A healed model that recovers a quarter of the items plain removal lost.
    rng = random.Random(5)
    better = {t: [p or (f and rng.random() < 0.25) for f, p in zip(full[t], plain[t], strict=True)] for t in full}
    point = (
        quality_retained(scores_of(full, 0.5), scores_of(better, 0.5)).retained
        - quality_retained(scores_of(full, 0.5), scores_of(plain, 0.5)).retained
    )
    ci = gain_interval(full, plain, better, chances, 1000, seed=7)
    assert ci is not None and 0.0 < ci[0] < point < ci[1]
    # The same gain on a tenth of the items is within noise.
    few = {t: v[:40] for t, v in full.items()}
    small = gain_interval(
        few,
        {t: v[:40] for t, v in plain.items()},
        {t: v[:40] for t, v in better.items()},
        {t: v[:40] for t, v in chances.items()},
        1000,
        seed=7,
    )
    assert small is not None and small[0] <= 0.0 < small[1]
    assert gain_interval(full, plain, better, chances, 0, seed=7) is None
    with pytest.raises(QualityError, match="same items"):
        gain_interval(full, plain, {"a": better["a"][:-1], "b": better["b"]}, chances, 10, seed=7)


def test_negative_log_likelihood_in_slices_matches_the_whole_batch() -> None:
    """The reader scores positions in slices (16 MiB of float32 logits at a time, across row boundaries, pads
    skipped): the same sum and count as one cross-entropy over the whole batch."""
    from shortgpt_serve.quality.perplexity import NegLogLikelihood, chunk_rows

    gen = torch.Generator().manual_seed(0)
    vocab = 1 << 16
    chunk = chunk_rows(vocab)
    assert chunk == 64 and chunk_rows(32_000) == 131 and chunk_rows(10**9) == 1
    rows, width = 3, chunk // 2 + 7  # the rows' positions straddle slice boundaries
    ids = torch.randint(0, vocab, (rows, width), generator=gen)
    mask = torch.ones(rows, width, dtype=torch.long)
    mask[1, width - 20 :] = 0  # a padded row
    logits = torch.randn(rows, width, vocab, generator=gen).to(torch.bfloat16)
    reader = NegLogLikelihood([Batch(ids, mask)])
    reader(0, logits)
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    want = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, vocab), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    assert reader.count == rows * (width - 1) - 20
    assert reader.total == pytest.approx(float(want), rel=1e-6)
    assert rows * (width - 1) > chunk  # more than one slice was read
