"""Hub models live in the standard Hugging Face cache: found there offline, never copied, hashed once.

Each case runs in a fresh process with the real environment variables (HF_HOME, HF_HUB_OFFLINE, HF_ENDPOINT),
because huggingface_hub reads them once, when it is imported. The cache is laid out as huggingface_hub lays it
out (blobs, snapshots of symlinks, refs), and huggingface_hub's own cache scan must recognise it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, save_tiny_llama

REPO_ID = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
# Resolves the hub id twice with one hash memo, as two starts of the tool would, and reports what it read.
RESOLVE = """
import json, sys
from pathlib import Path
import shortgpt_serve.cache.hashes as hashes
from shortgpt_serve.cache import FileHashes
from shortgpt_serve.models.source import resolve_model

hashes.RACY_NS = 0  # files written just now: trust the memo at once (as tests/test_cache.py does)
cache = Path(sys.argv[2])
first, second = FileHashes(cache), FileHashes(cache)
a = resolve_model(sys.argv[1], cache, hashes=first)
b = resolve_model(sys.argv[1], cache, hashes=second)
print(json.dumps({"path": str(a.path), "origin": a.origin, "sha256": [a.sha256, b.sha256], "layers": a.num_layers,
                  "read": [first.bytes_read, second.bytes_read], "hits": [first.memo_hits, second.memo_hits]}))
"""


def seed_hub_cache(hub: Path, repo_id: str, folder: Path) -> Path:
    """Put ``folder``'s files into ``hub`` as huggingface_hub stores a download: content-named blobs, a snapshot
    of relative symlinks to them for the commit, and ``refs/main`` naming that commit."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in sorted(folder.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def hub_env(hf_home: Path, cache: Path, *, offline: bool) -> dict[str, str]:
    """The environment of a fresh process: the tool's cache, HF_HOME, and either offline mode or a hub endpoint
    on a closed loopback port (a network that is down)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHORTGPT_SERVE_", "HF_", "HUGGINGFACE_"))}
    env.pop("TRANSFORMERS_OFFLINE", None)
    env |= {"SHORTGPT_SERVE_CACHE_DIR": str(cache), "HF_HOME": str(hf_home)}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
    return env


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.fixture
def hub_model(tmp_path: Path) -> tuple[Path, Path]:
    """HF_HOME holding a cached snapshot of a tiny Llama, and that snapshot's folder."""
    hf_home = tmp_path / "hf"
    model = save_tiny_llama(tmp_path / "model")
    return hf_home, seed_hub_cache(hf_home / "hub", REPO_ID, model)


def resolve(env: dict[str, str], cache: Path) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", RESOLVE, REPO_ID, str(cache)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    return report


def test_seeded_cache_is_what_huggingface_hub_itself_finds(hub_model: tuple[Path, Path]) -> None:
    """The layout the other tests build is the real one: huggingface_hub's scan and lookup read it."""
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    hf_home, snapshot = hub_model
    info = scan_cache_dir(hf_home / "hub")
    assert info.warnings == []
    (repo,) = info.repos
    assert repo.repo_id == REPO_ID and set(repo.refs) == {"main"}
    (revision,) = repo.revisions
    assert revision.commit_hash == COMMIT and {f.file_name for f in revision.files} >= {"config.json"}
    found = try_to_load_from_cache(REPO_ID, "model.safetensors", cache_dir=hf_home / "hub")
    assert found == str(snapshot / "model.safetensors")


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "hub unreachable"])
def test_cached_snapshot_is_used_in_place_without_a_network(
    hub_model: tuple[Path, Path], tmp_path: Path, offline: bool
) -> None:
    hf_home, snapshot = hub_model
    cache = tmp_path / "tool-cache"
    hub_before = files(hf_home)
    report = resolve(hub_env(hf_home, cache, offline=offline), cache)
    # The snapshot itself, found through HF_HOME: no second copy anywhere.
    assert report["path"] == str(snapshot)
    assert report["origin"] == f"hub:{REPO_ID}" and report["layers"] == 6
    assert files(hf_home) == hub_before
    assert [p for p in files(cache) if not p.startswith("hashes")] == [], "only the hash memo in the tool's cache"
    # Each file is read once: the second start stats config.json and the weights instead of reading them.
    hashed = ("config.json", "model.safetensors")
    size = sum((snapshot / name).resolve().stat().st_size for name in hashed)
    assert report["read"] == [size, 0] and report["hits"] == [0, len(hashed)]
    assert report["sha256"][0] == report["sha256"][1]


def test_hub_cache_location_follows_hf_hub_cache(hub_model: tuple[Path, Path], tmp_path: Path) -> None:
    """HF_HUB_CACHE wins over HF_HOME, as huggingface_hub resolves it: the tool does not pick its own place."""
    hf_home, snapshot = hub_model
    moved = tmp_path / "elsewhere"
    shutil.move(hf_home / "hub", moved)
    cache = tmp_path / "tool-cache"
    env = hub_env(tmp_path / "empty-home", cache, offline=True) | {"HF_HUB_CACHE": str(moved)}
    report = resolve(env, cache)
    assert report["path"] == str(moved / snapshot.relative_to(hf_home / "hub"))
    assert not (tmp_path / "empty-home").exists()


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "hub unreachable"])
def test_no_network_and_no_cached_copy_is_one_line(tmp_path: Path, offline: bool) -> None:
    hf_home, cache, out = tmp_path / "hf", tmp_path / "tool-cache", tmp_path / "out"
    args = ["--model", REPO_ID, "--output", str(out), "--port", str(free_port()), "--metrics-port", "0"]
    result = subprocess.run(
        [sys.executable, "-m", "shortgpt_serve.cli", *args],
        env=hub_env(hf_home, cache, offline=offline),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("[shortgpt-serve]")]
    assert "Traceback" not in result.stderr
    (line,) = lines
    why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
    assert line.startswith(f"Error: --model {REPO_ID}: the Hugging Face cache ({hf_home / 'hub'}) has no copy")
    assert why in line and f"`hf download {REPO_ID}`" in line and "HF_HOME" in line, line
    assert files(hf_home) == [] and not out.exists()
    assert [p for p in files(cache) if not p.startswith("hashes")] == []


def test_partial_snapshot_offline_names_what_to_do(hub_model: tuple[Path, Path], tmp_path: Path) -> None:
    """A snapshot whose download was cut short (the tree listing names a file the snapshot lacks) is not used."""
    hf_home, snapshot = hub_model
    repo = snapshot.parents[1]
    listing = {
        "format_version": 1,
        "files": {f.name: {"size": f.resolve().stat().st_size, "blob_id": "0" * 40} for f in snapshot.iterdir()},
    }
    (repo / "trees").mkdir()
    (repo / "trees" / f"{COMMIT}.json").write_text(json.dumps(listing))
    (snapshot / "model.safetensors").unlink()
    cache = tmp_path / "tool-cache"
    result = subprocess.run(
        [sys.executable, "-c", RESOLVE, REPO_ID, str(cache)],
        env=hub_env(hf_home, cache, offline=True),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "holds only part of it and HF_HUB_OFFLINE is set" in result.stderr, result.stderr[-3000:]
