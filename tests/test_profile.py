from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from shortgpt_serve.calibration import batches
from shortgpt_serve.models.families import FAMILIES
from shortgpt_serve.profile import LayerProfile, block_influence, profile_layers


def reference_bi(model, sequences: list[list[int]]) -> list[float]:  # type: ignore[no-untyped-def]
    """BI straight from the definition, one unpadded sequence at a time, in float64 Python arithmetic.

    Layer inputs/outputs come from output_hidden_states; the last layer's output is read with the final norm
    replaced by identity, since hidden_states[-1] comes after that norm.
    """
    norm = model.model.norm
    n_layers = model.config.num_hidden_layers
    sums = [0.0] * n_layers
    count = 0
    try:
        model.model.norm = torch.nn.Identity()
        with torch.no_grad():
            for seq in sequences:
                ids = torch.tensor([seq])
                hs = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
                for i in range(n_layers):
                    a, b = hs[i][0].double().tolist(), hs[i + 1][0].double().tolist()
                    for x, y in zip(a, b, strict=True):
                        dot = sum(p * q for p, q in zip(x, y, strict=True))
                        sums[i] += dot / (math.sqrt(sum(p * p for p in x)) * math.sqrt(sum(q * q for q in y)))
                count += len(seq)
    finally:
        model.model.norm = norm
    return [1.0 - s / count for s in sums]


def test_bi_matches_reference_on_padded_batches(tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    # Uneven lengths: batches are right-padded and the pad positions must not count.
    sequences = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (17, 9, 23, 5, 12)]
    ours, tokens = profile_layers(model, FAMILIES["llama"], batches(sequences, 2, pad_id=0), progress=False)
    expected = reference_bi(model, sequences)
    assert tokens == sum(map(len, sequences))
    assert len(ours) == model.config.num_hidden_layers
    for got, want in zip(ours, expected, strict=True):
        assert got == pytest.approx(want, abs=1e-4)
    # The layers differ, so this is not trivially satisfied by a constant.
    assert max(expected) - min(expected) > 1e-3


def test_profiling_leaves_the_model_as_it_was(tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    layers = list(model.model.layers)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    profile_layers(model, FAMILIES["llama"], batches([[1, 2, 3, 4]], 1, 0), progress=False)
    assert list(model.model.layers) == layers and type(model.model.layers[0]).__name__ == "LlamaDecoderLayer"
    assert all(not layer._forward_hooks for layer in model.model.layers)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_iterative_bi_reprofiles_the_shortened_model(tiny_llama: Path) -> None:
    """Each step's BI is the BI of the model with the removed layers deleted (the in-memory reference)."""
    from transformers import AutoModelForCausalLM

    from shortgpt_serve.models.layers import skipped_layers
    from shortgpt_serve.passes import Batch, PassEngine
    from shortgpt_serve.profile import block_influences, iterative_bi_order

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(4)
    sequences = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (21, 13, 30)]
    chunks = [Batch(ids, mask) for ids, mask in batches(sequences, 2, pad_id=0)]
    engine = PassEngine(model, FAMILIES["llama"])
    first, _ = block_influences(engine, chunks)
    order = iterative_bi_order(engine, chunks, first, range(1, 5), lambda o: len(o) >= 3)
    assert len(order) == 3 and len(set(order)) == 3 and set(order) <= {1, 2, 3, 4}
    assert order[0] == min(range(1, 5), key=lambda i: (first[i], i))
    # Replay by hand: delete the layers chosen so far, profile the smaller model, pick its lowest kept layer.
    for step in (1, 2):
        kept = [i for i in range(6) if i not in order[:step]]
        with skipped_layers(model, FAMILIES["llama"], order[:step]):
            short = reference_bi(model, sequences)
        ours, _ = block_influences(engine, chunks, skip=order[:step])
        for new, old in enumerate(kept):
            assert ours[old] == pytest.approx(short[new], abs=1e-4)
        assert all(math.isinf(ours[i]) for i in order[:step])
        candidates = [i for i in range(1, 5) if i not in order[:step]]
        assert order[step] == min(candidates, key=lambda i: (ours[i], i))


def test_block_influence_definition() -> None:
    h = torch.randn(2, 5, 8)
    assert block_influence(h, h) == pytest.approx(0.0, abs=1e-6)
    assert block_influence(h, -h) == pytest.approx(2.0, abs=1e-6)
    assert block_influence(h, 3.0 * h) == pytest.approx(0.0, abs=1e-6)  # scale does not matter
    # Masked tokens are ignored: only token 0 of row 0 counts, where out == in.
    out = -h.clone()
    out[0, 0] = h[0, 0]
    mask = torch.zeros(2, 5, dtype=torch.long)
    mask[0, 0] = 1
    assert block_influence(h, out, mask) == pytest.approx(0.0, abs=1e-6)


def test_profile_json_roundtrip_and_table(tmp_path: Path) -> None:
    p = LayerProfile(
        bi=[0.9, 0.02, 0.05, 0.3],
        num_tokens=100,
        num_sequences=2,
        seq_len=50,
        calibration_source="x",
        calibration_sha256="abc",
    )
    p.save(tmp_path / "p.json")
    back = LayerProfile.from_json((tmp_path / "p.json").read_text())
    assert back == p
    assert json.loads(p.to_json())["bi"] == [0.9, 0.02, 0.05, 0.3]
    assert p.ranking() == [1, 2, 3, 0]
    table = p.table(removed=[1])
    rows = [line for line in table.splitlines() if "removed" in line]
    assert len(rows) == 1 and rows[0].split()[0] == "1"


def test_angular_distances_match_reference(tiny_llama: Path) -> None:
    """d[i][j] = mean over real tokens of arccos(cos(x_i, x_j)) / pi, x_i entering layer i (x_L before the norm)."""
    from transformers import AutoModelForCausalLM

    from shortgpt_serve.profile import angular_distances

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(2)
    sequences = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (11, 4, 19)]
    ours = angular_distances(model, batches(sequences, 2, pad_id=0))
    n = model.config.num_hidden_layers
    sums = [[0.0] * (n + 1) for _ in range(n + 1)]
    norm, model.model.norm = model.model.norm, torch.nn.Identity()
    try:
        with torch.no_grad():
            for seq in sequences:
                hs = model(input_ids=torch.tensor([seq]), output_hidden_states=True, use_cache=False).hidden_states
                for i in range(n + 1):
                    for j in range(n + 1):
                        cos = torch.nn.functional.cosine_similarity(hs[i][0].double(), hs[j][0].double(), dim=-1)
                        sums[i][j] += float((torch.arccos(cos.clamp(-1, 1)) / math.pi).sum())
    finally:
        model.model.norm = norm
    count = sum(map(len, sequences))
    for i in range(n + 1):
        for j in range(n + 1):
            assert ours[i][j] == pytest.approx(sums[i][j] / count, abs=1e-4)
    assert ours[0][n] > ours[2][3] > 0  # far boundaries differ more than neighbours
