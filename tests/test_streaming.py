"""The streamed placement computes what the resident model computes, holding one decoder layer at a time."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from shortgpt_serve.errors import ConfigError, ModelError
from shortgpt_serve.memplan import RESERVE, parse_size, plan
from shortgpt_serve.models.families import FAMILIES
from shortgpt_serve.passes import Batch, PassEngine, Route
from shortgpt_serve.streaming import Streamed, empty_model

DENSE = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"]


def batches() -> list[Batch]:
    import torch

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (2, 24), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    return [Batch(ids, mask), Batch(ids[:, :12].clone(), mask[:, :12].clone())]


def run(engine: PassEngine) -> tuple[dict[tuple[int, int], object], dict[str, list[object]]]:
    """Every layer's input and output seen by an observer, and the logits of the full model and a candidate."""
    seen: dict[tuple[int, int], object] = {}
    logits: dict[str, list[object]] = {"full": [], "skip": []}

    def watch(layer: int, batch: int, h_in: object, h_out: object, mask: object) -> None:
        seen[(layer, batch)] = (h_in.clone(), h_out.clone())  # type: ignore[attr-defined]

    engine.run(
        batches(),
        [
            Route(observers=[watch], on_logits=lambda b, lg: logits["full"].append(lg.clone())),
            Route(frozenset([1, 2]), on_logits=lambda b, lg: logits["skip"].append(lg.clone())),
        ],
    )
    return seen, logits


def engines(folder: Path, model_type: str, ahead: int | None = None) -> tuple[PassEngine, PassEngine, Streamed]:
    import torch
    from transformers import AutoModelForCausalLM

    family = FAMILIES[model_type]
    resident = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    skeleton = empty_model(folder, "float32", torch.device("cpu"))
    placement = Streamed(skeleton, family, folder, torch.device("cpu"), ahead)
    return PassEngine(resident, family), PassEngine(skeleton, family, placement), placement


@pytest.mark.parametrize("model_type", DENSE)
def test_streamed_pass_equals_the_resident_pass(make_tiny_model: Callable[..., Path], model_type: str) -> None:
    import torch

    resident, streamed, placement = engines(make_tiny_model(model_type), model_type)
    seen_r, logits_r = run(resident)
    seen_s, logits_s = run(streamed)
    assert seen_r.keys() == seen_s.keys() and len(seen_r) == 2 * resident.num_layers
    for key, (h_in, h_out) in seen_r.items():  # type: ignore[misc]
        s_in, s_out = seen_s[key]  # type: ignore[misc]
        assert torch.equal(h_in, s_in) and torch.equal(h_out, s_out), key
    for name in ("full", "skip"):
        assert all(torch.equal(a, b) for a, b in zip(logits_r[name], logits_s[name], strict=True)), name  # type: ignore[arg-type]
    # Nothing stays on the model after the pass: every weight is back on the meta device.
    assert all(p.device.type == "meta" for p in streamed.model.parameters())
    placement.close()


def test_a_pass_holds_one_layer_on_the_model_and_reads_the_next_ahead(
    make_tiny_model: Callable[..., Path],
) -> None:
    _, streamed, placement = engines(make_tiny_model("llama"), "llama")
    from shortgpt_serve.models.layers import decoder_layers

    layers = decoder_layers(streamed.model, streamed.family)
    held: list[list[int]] = []
    ahead: list[int | None] = []

    def watch(layer: int, batch: int, h_in: object, h_out: object, mask: object) -> None:
        held.append([i for i, m in enumerate(layers) if any(p.device.type != "meta" for p in m.parameters())])
        ahead.append(placement._next[0] if placement._next else None)

    streamed.run(batches(), [Route(observers=[watch])])
    assert held and all(h == [layer] for h, layer in zip(held, [i for i in range(6) for _ in range(2)], strict=True))
    # While layer i runs, layer i + 1 is being read (none after the last).
    assert ahead == [i + 1 if i + 1 < 6 else None for i in range(6) for _ in range(2)]
    placement.close()


def test_a_partial_read_ahead_reads_the_rest_when_the_layer_starts_and_computes_the_same(
    make_tiny_model: Callable[..., Path],
) -> None:
    """A memory setting between one and two layers: the reader brings the next layer's first tensors, up to the
    bytes the plan gave it, and the layer's own start reads the rest, after the layer before was dropped."""
    import torch

    folder = make_tiny_model("llama")
    *_, whole = engines(folder, "llama")
    layer_bytes = whole.unit_bytes()["layer"]
    whole.close()
    resident, streamed, placement = engines(folder, "llama", ahead=layer_bytes // 2)
    reads: list[tuple[str, list[str]]] = []
    read = placement._read

    def logged(names: list[str]) -> dict[str, torch.Tensor]:
        import threading

        reads.append((threading.current_thread().name, names))
        return read(names)

    placement._read = logged  # type: ignore[method-assign]
    seen_r, logits_r = run(resident)
    seen_s, logits_s = run(streamed)
    assert all(torch.equal(a, b) for a, b in zip(logits_r["full"], logits_s["full"], strict=True))  # type: ignore[arg-type]
    assert all(torch.equal(a, b) for a, b in zip(logits_r["skip"], logits_s["skip"], strict=True))  # type: ignore[arg-type]
    for key, (_, h_out) in seen_r.items():  # type: ignore[misc]
        assert torch.equal(h_out, seen_s[key][1]), key  # type: ignore[index]
    ahead = [names for thread, names in reads if thread.startswith("shortgpt-stream")]
    # Layers 1..5 read ahead in part (layer 0 has no layer before it), each part within the bytes given.
    assert ahead == [placement._ahead[i] for i in range(1, 6)]
    assert all(0 < placement._bytes(names) <= layer_bytes // 2 for names in ahead)
    for i in range(1, 6):  # the rest of each layer is read on the pass's own thread: every tensor read once
        rest = [
            names
            for thread, names in reads
            if not thread.startswith("shortgpt-stream") and names[0] in placement._layer_names[i]
        ]
        assert sorted(ahead[i - 1] + rest[0]) == sorted(placement._layer_names[i]) and len(rest) == 1
    placement.close()


def test_the_read_estimate_scales_layer_0_and_its_read_serves_the_first_pass(
    make_tiny_model: Callable[..., Path],
) -> None:
    _, streamed, placement = engines(make_tiny_model("llama"), "llama")
    reads: list[list[str]] = []
    read = placement._read
    placement._read = lambda names: reads.append(names) or read(names)  # type: ignore[method-assign,func-returns-value]
    seconds = placement.probe()
    assert seconds > 0 and reads == [placement._layer_names[0]]
    assert seconds >= placement.read_s * placement.total_bytes() / placement._bytes(reads[0]) * 0.999
    streamed.run(batches(), [Route(observers=[])])
    # The pass reads every layer once: layer 0 not again, the one the estimate read is used.
    layer_reads = [names for names in reads if names in placement._layer_names]
    assert layer_reads == placement._layer_names
    placement.close()


@pytest.mark.parametrize("model_type", ["qwen2_moe", "mixtral"])
def test_families_whose_weights_are_converted_on_load_are_refused(
    make_tiny_model: Callable[..., Path], model_type: str
) -> None:
    import torch

    folder = make_tiny_model(model_type)
    skeleton = empty_model(folder, "float32", torch.device("cpu"))
    with pytest.raises(ModelError, match="cannot be streamed; give the profile enough memory"):
        Streamed(skeleton, FAMILIES[model_type], folder, torch.device("cpu"))


def test_weights_stream_in_the_models_dtype(make_tiny_model: Callable[..., Path]) -> None:
    """``model.to(dtype)`` on the empty model changes what the next pass computes in (scoring's dtype)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = make_tiny_model("llama")
    resident = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    skeleton = empty_model(folder, "float32", torch.device("cpu")).to(torch.float64)
    placement = Streamed(skeleton, FAMILIES["llama"], folder, torch.device("cpu"))
    _, want = run(PassEngine(resident, FAMILIES["llama"]))
    _, got = run(PassEngine(skeleton, FAMILIES["llama"], placement))
    assert got["full"][0].dtype == torch.float64  # type: ignore[attr-defined]
    assert all(torch.equal(a, b) for a, b in zip(want["full"], got["full"], strict=True))  # type: ignore[arg-type]
    placement.close()


# --- the memory plan ---------------------------------------------------------------------------------------------

GiB = 2**30


@pytest.mark.parametrize(
    ("text", "size"), [("16GiB", 16 * GiB), ("800MB", 800 * 10**6), ("1.5 GB", 1_500_000_000), ("4096", 4096)]
)
def test_sizes_parse(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "-1GB", "0", "16 GiBs", ""])
def test_bad_sizes_name_the_flag(text: str) -> None:
    with pytest.raises(ConfigError, match="--memory must be auto, stream or a size such as 16GiB"):
        parse_size(text)


def plan_of(memory: str, free: int | None = 100 * GiB) -> str:
    return plan(
        weights=20 * GiB, largest=GiB, states=GiB // 4, memory=memory, free=free, device="cuda:0", name="m"
    ).mode


def test_weights_that_fit_are_held_whole_else_streamed() -> None:
    assert plan_of("auto") == "resident"
    assert plan_of("auto", free=10 * GiB) == "stream"
    assert plan_of("8GiB") == "stream"
    assert plan_of("22GiB") == "resident"
    assert plan_of("22GiB", free=20 * GiB) == "stream"  # the setting cannot exceed what the device has free
    assert plan_of("stream") == "stream"
    assert plan_of("auto", free=None) == "resident"  # unknown free memory: no limit applied


def test_a_model_that_cannot_fit_even_streamed_is_refused_with_what_it_needs() -> None:
    need = GiB + 2 * (GiB // 4) + RESERVE
    with pytest.raises(ModelError) as err:
        plan_of("1.5GiB")
    assert f"profiling needs {need / GiB:.1f} GiB (a layer of 1.0 GiB" in str(err.value)
    assert "1.5 GiB is by --memory 1.5GiB; raise --memory, or lower --calibration-tokens" in str(err.value)


def test_the_next_layer_is_read_ahead_as_far_as_the_setting_allows() -> None:
    def ahead(memory: str) -> int:
        p = plan(weights=20 * GiB, largest=GiB, states=GiB // 4, memory=memory, free=None, device="cpu", name="m")
        assert p.mode == "stream"
        return p.ahead

    one = GiB + 2 * (GiB // 4) + RESERVE  # a layer, the states and the reserve
    assert ahead(f"{one}") == 0
    assert ahead(f"{one + GiB // 4}") == GiB // 4
    assert ahead(f"{one + GiB}") == ahead("8GiB") == GiB  # two layers fit: the whole next layer
    part = plan(
        weights=20 * GiB, largest=GiB, states=0, memory=f"{GiB + RESERVE + GiB // 2}", free=None, device="cpu", name="m"
    )
    assert "a layer of 1.0 GiB and 512.0 MiB of the next held" in part.describe("m", 40)


def test_linear_maps_fitted_streamed_equal_the_resident_ones(make_tiny_model: Callable[..., Path]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from shortgpt_serve.healing.linear import fit_linear
    from tests.conftest import padded_calibration

    folder = make_tiny_model("llama")
    resident = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    skeleton = empty_model(folder, "float64", torch.device("cpu"))
    placement = Streamed(skeleton, FAMILIES["llama"], folder, torch.device("cpu"))
    data = padded_calibration()
    want = fit_linear(PassEngine(resident, FAMILIES["llama"]), data, [2, 4], progress=False)
    got = fit_linear(PassEngine(skeleton, FAMILIES["llama"], placement), data, [2, 4], progress=False)
    assert want.maps.keys() == got.maps.keys() == {1, 3}
    assert all(torch.allclose(want.maps[k], got.maps[k], atol=1e-12) for k in want.maps)
    placement.close()


def test_prune_streamed_writes_the_same_profile_as_resident(
    make_tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    import json

    from tests.conftest import CORPUS, prune_args
    from tests.test_cli import invoke

    text = tmp_path / "cal.txt"
    text.write_text("\n\n".join([CORPUS] * 4))
    model = make_tiny_model("llama")
    records = {}
    for memory in ("auto", "stream"):
        out = tmp_path / memory
        args = prune_args(
            model, text, "--output", str(out), "--memory", memory, "--cache-dir", str(tmp_path / f"cache-{memory}")
        )
        result = invoke(args)
        assert result.exit_code == 0, result.output
        records[memory] = json.loads((out / "shortgpt.json").read_text())
    assert records["stream"]["block_influence"] == pytest.approx(records["auto"]["block_influence"], abs=1e-6)
    assert records["stream"]["removed_layers"] == records["auto"]["removed_layers"]


def test_divergence_measured_streamed_equals_resident(make_tiny_model: Callable[..., Path]) -> None:
    """KL and agreement read inside the pass's head (the reader computes the full model's logits there, a second
    use of the head while the pass holds it) come out as on the resident model."""
    from shortgpt_serve.quality.divergence import Divergence, FinalStates

    def measure(engine: PassEngine) -> object:
        blocks = batches()
        final = FinalStates(engine.num_layers - 1, 0, len(blocks))
        div = Divergence(engine, blocks, final.states)
        engine.run(blocks, [Route(observers=[final]), Route(frozenset([1, 2]), on_logits=div)])
        return div.stats

    resident, streamed, placement = engines(make_tiny_model("llama"), "llama")
    want, got = measure(resident), measure(streamed)
    placement.close()
    assert want is not None and got is not None and want.kl > 0  # type: ignore[attr-defined]
    assert got.kl == pytest.approx(want.kl, rel=1e-5)  # type: ignore[attr-defined]
    assert got.agreement == want.agreement  # type: ignore[attr-defined]


def test_the_heap_is_trimmed_after_a_step_only_when_the_process_grew() -> None:
    from shortgpt_serve.hostmem import Settler

    trims: list[int] = []
    sizes = iter([100, 100, 150, 150, 170, 171, 260, 200])
    settle = Settler(lambda: trims.append(1), slack=50)
    settle._resident = lambda: next(sizes)  # type: ignore[method-assign]
    settle()  # 100 > 0 + 50: trimmed, the floor is 100
    settle()  # 150: not past 100 + 50
    settle()  # 150: not past
    settle()  # 170 > 150: trimmed, the floor is 171
    settle()  # 260 > 221: trimmed, the floor is 200
    assert len(trims) == 3 and settle._floor == 200


@pytest.mark.parametrize(("ahead", "tight"), [(None, False), (1, True)], ids=["whole-layer-ahead", "tight"])
def test_a_tight_setting_settles_after_every_batch_step(
    make_tiny_model: Callable[..., Path], ahead: int | None, tight: bool
) -> None:
    """The engine calls ``settle`` after each batch's step through a layer and the head; a streamed placement with
    less than a layer read ahead trims there (on the CPU), one with the whole layer does not."""
    _, streamed, placement = engines(make_tiny_model("llama"), "llama", ahead)
    trims: list[int] = []
    placement._trim = lambda: trims.append(1)  # type: ignore[method-assign]
    if tight:
        placement._settle._trim = placement._trim  # type: ignore[attr-defined]
        placement._settle._slack = -1  # type: ignore[attr-defined]  # every step counts as grown
    settled: list[int] = []
    settle = placement.settle
    placement.settle = lambda: settled.append(1) or settle()  # type: ignore[method-assign,func-returns-value]
    run(streamed)
    placement.close()
    # The full route: 6 layers x 2 batches; the route skipping 1 and 2 shares layer 0, runs 3-5 on its own states
    # (3 x 2); the head: 2 routes x 2 batches.
    assert len(settled) == 6 * 2 + 3 * 2 + 2 * 2
    dropped = 6 + 2 + 2  # as each layer is dropped; before the embeddings and the head are read, and after
    assert len(trims) == dropped + (len(settled) if tight else 0)
