"""The cache: keys follow their inputs, warm starts reuse verified entries, damage is rebuilt, launchers share it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import Result

from shortgpt_serve import cache
from shortgpt_serve.config import Config
from tests.conftest import CORPUS, prune_args
from tests.test_cli import error_line, invoke

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def calibration(tmp_path: Path) -> Path:
    text = tmp_path / "cal.txt"
    text.write_text("\n\n".join(f"Document {i}. {CORPUS}" for i in range(10)))
    return text


def checkpoint_of(result: Result) -> Path:
    line = next(line for line in result.output.splitlines() if line.startswith("Checkpoint: "))
    return Path(line.removeprefix("Checkpoint: "))


def printed(result: Result) -> list[str]:
    """What `prune` prints at the end: the BI table, the summary and the checkpoint."""
    lines = result.output.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("layer "))
    return [line for line in lines[start:] if not line.startswith("[shortgpt-serve]")]


def entry_folders(root: Path, kind: str) -> list[Path]:
    folder = root / kind
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*") if cache.LEFTOVER.match(p.name))


# --- keys ------------------------------------------------------------------------------------------------------


def test_digest_is_canonical() -> None:
    assert cache.digest({"a": 1, "b": [1, 2]}) == cache.digest({"b": [1, 2], "a": 1})
    assert cache.digest({"a": 1}) != cache.digest({"a": 1.5})
    assert cache.entry_name("profiles", {"a": 1}) != cache.entry_name("quality", {"a": 1})
    assert cache.entry_name("checkpoints", {"a": 1}, label="My Model/x").startswith("My_Model_x-")


def test_keys_change_exactly_when_their_inputs_change(tiny_llama: Path, calibration: Path, tmp_path: Path) -> None:
    from shortgpt_serve.config import override
    from shortgpt_serve.inputs import read_calibration
    from shortgpt_serve.keys import checkpoint_key, profile_key, quality_key
    from shortgpt_serve.models.source import resolve_model

    base = override(
        Config(),
        {"model": str(tiny_llama), "calibration.path": str(calibration), "calibration.seq_len": 32},
    )

    def keys(config: Config, model: Path = tiny_llama) -> dict[str, str]:
        hashes = cache.FileHashes(tmp_path / "c")
        source = resolve_model(str(model), tmp_path / "c")
        docs = read_calibration(config)
        p = profile_key(config, source, docs, hashes)
        q = quality_key(config, source, docs.heldout, hashes)
        return {
            "profile": cache.digest(p),
            "quality": cache.digest(q),
            "checkpoint": cache.digest(checkpoint_key(config, p, q)),
        }

    ref = keys(base)
    assert keys(base) == ref  # deterministic

    def changed(overrides: dict[str, object]) -> set[str]:
        got = keys(override(base, overrides))
        return {k for k in ref if got[k] != ref[k]}

    assert changed({"selection.budget": 0.6}) == {"checkpoint"}
    assert changed({"selection.min_quality": 0.7}) == {"checkpoint"}
    assert changed({"selection.strict": True}) == {"checkpoint"}
    assert changed({"selection.criterion": "iterative-bi"}) == {"checkpoint"}  # same one-shot BI profile
    assert changed({"selection.criterion": "angular"}) == {"profile", "checkpoint"}  # also angular distances
    assert changed({"calibration.num_tokens": 256}) == {"profile", "checkpoint"}
    assert changed({"calibration.heldout_fraction": 0.3}) == {"profile", "quality", "checkpoint"}
    assert changed({"quality.tasks": ("arc_easy",)}) == {"quality", "checkpoint"}
    assert changed({"quality.limit": 50}) == {"quality", "checkpoint"}
    assert changed({"profile.dtype": "float16"}) == {"profile", "checkpoint"}
    # Settings that do not change results change no key.
    assert changed({"profile.batch_size": 2, "serve.port": 9000, "overwrite": True}) == set()
    # The model's content: a changed tokenizer changes every key; a copy of the same files changes none.
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama, copy)
    assert keys(base, copy) == ref
    tok = copy / "tokenizer_config.json"
    tok.write_text(tok.read_text().replace("}", ', "model_max_length": 77}', 1))
    got = keys(base, copy)
    assert all(got[k] != ref[k] for k in ref)


def test_tool_version_is_part_of_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    before = cache.entry_name("profiles", {"x": 1})
    monkeypatch.setattr("shortgpt_serve.cache.keys.__version__", "999.0")  # where the keys read it
    assert cache.entry_name("profiles", {"x": 1}) != before


# --- file hash memo --------------------------------------------------------------------------------------------


def test_file_hash_memo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from shortgpt_serve.fsutil import sha256_file

    f = tmp_path / "weights.bin"
    f.write_bytes(os.urandom(1 << 16))
    root = tmp_path / "cache"
    # A file changed within the memo's timestamp tolerance is read again every time (its size and times could
    # survive a same-tick edit).
    fresh = cache.FileHashes(root)
    assert fresh.sha256(f) == sha256_file(f) and fresh.bytes_read == 1 << 16
    again = cache.FileHashes(root)
    assert again.sha256(f) == sha256_file(f) and again.bytes_read == 1 << 16
    # As if the file had been written long before it was hashed.
    monkeypatch.setattr("shortgpt_serve.cache.hashes.RACY_NS", 0)
    warm = cache.FileHashes(root)
    assert warm.sha256(f) == sha256_file(f)
    assert (warm.bytes_read, warm.memo_hits) == (0, 1)  # stat only
    with open(f, "r+b") as handle:  # change one byte in place: same size, same inode
        handle.write(b"\x00" if f.read_bytes()[:1] != b"\x00" else b"\x01")
    changed = cache.FileHashes(root)
    assert changed.sha256(f) == sha256_file(f) and changed.bytes_read == 1 << 16
    # A damaged memo record is ignored, not trusted.
    for memo in (root / cache.HASHES).glob("*.json"):
        memo.write_text("{not json")
    assert cache.FileHashes(root).sha256(f) == sha256_file(f)


# --- warm starts -----------------------------------------------------------------------------------------------


class FakeScores:
    """Stands in for benchmark scoring (a tiny random model is at chance): counts full and candidate scorings."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, meter: object) -> object:
        from shortgpt_serve.quality import TaskScore
        from shortgpt_serve.quality.record import Measured

        self.calls += 1
        correct = [True] * 9 + [False]
        lambada = [True] * len(getattr(meter, "lambada", None) or ()) or None
        return Measured({"arc_easy": TaskScore("arc_easy", 0.9, 0.9, 10, 0.25)}, None, {"arc_easy": correct}, lambada)


def test_warm_prune_reuses_profile_quality_and_checkpoint(
    tiny_llama: Path, calibration: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shortgpt_serve.quality.meter import QualityMeter

    scores = FakeScores()
    monkeypatch.setattr(
        QualityMeter, "_measure", lambda self, removals, replacements=None: [scores(self) for _ in removals]
    )
    quality = ["--quality", "--tasks", "arc_easy", "--eval-limit", "10"]
    args = [*prune_args(tiny_llama, calibration), *quality]
    cold = invoke(args)
    assert cold.exit_code == 0, cold.output
    assert "Scoring the full model" in cold.output and "Profile reused" not in cold.output
    cold_calls = scores.calls
    assert cold_calls >= 2  # the full model and at least one candidate
    ckpt = checkpoint_of(cold)
    created = (ckpt / cache.MANIFEST).stat().st_mtime_ns

    warm = invoke(args)
    assert warm.exit_code == 0, warm.output
    assert f"Reusing the verified checkpoint {ckpt}" in warm.output
    assert "Loading" not in warm.output  # the model is not even loaded
    assert scores.calls == cold_calls
    assert checkpoint_of(warm) == ckpt and (ckpt / cache.MANIFEST).stat().st_mtime_ns == created
    assert printed(warm) == printed(cold)  # the same BI table, summary and checkpoint

    # A new latency budget: the profile and the full model's scores are reused, the depth is searched again
    # and a new checkpoint written.
    other = invoke([*prune_args(tiny_llama, calibration), *quality, "--budget", "0.6"])
    assert other.exit_code == 0, other.output
    assert "Profile reused from the cache" in other.output
    assert "Full-model scores reused from the cache" in other.output
    assert "Scoring the full model" not in other.output
    assert scores.calls > cold_calls
    assert checkpoint_of(other) != ckpt and checkpoint_of(other).is_dir() and ckpt.is_dir()


# --- damage ----------------------------------------------------------------------------------------------------


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped byte": lambda entry, main: _flip(entry / main),
    "truncated": lambda entry, main: (entry / main).write_bytes((entry / main).read_bytes()[:100]),
    "manifest deleted": lambda entry, main: (entry / cache.MANIFEST).unlink(),
    "manifest edited": lambda entry, main: (entry / cache.MANIFEST).write_text(
        (entry / cache.MANIFEST).read_text().replace('"describe": "', '"describe": "x', 1)
    ),
    "file added": lambda entry, main: (entry / "extra.txt").write_text("x"),
}


@pytest.mark.parametrize("kind,main", [("checkpoints", "model.safetensors"), ("profiles", cache.DATA)])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_entry_is_rebuilt_not_served(
    tiny_llama: Path, calibration: Path, isolated_env: Path, kind: str, main: str, damage: str
) -> None:
    args = prune_args(tiny_llama, calibration)
    assert invoke(args).exit_code == 0
    [entry] = entry_folders(isolated_env, kind)
    good = (entry / main).read_bytes()
    DAMAGE[damage](entry, main)
    # The profile is read when the checkpoint for these settings is not cached yet: another budget.
    again = invoke(args if kind == "checkpoints" else [*args, "--budget", "0.7"])
    assert again.exit_code == 0, again.output
    notes = [line for line in again.output.splitlines() if "is damaged" in line]
    assert len(notes) == 1 and f"{kind}/{entry.name}" in notes[0] and "rebuilding it" in notes[0]
    assert cache.check(entry, None) is None
    if kind == "checkpoints":
        assert (entry / main).read_bytes() == good  # rebuilt to the same content
    else:
        assert json.loads((entry / main).read_bytes())["bi"] == json.loads(good)["bi"]
    assert leftovers(isolated_env) == []


def test_leftover_temp_folders_are_removed(tiny_llama: Path, calibration: Path, isolated_env: Path) -> None:
    args = prune_args(tiny_llama, calibration)
    ckpt = checkpoint_of(invoke(args))
    # A killed writer left its temp folder beside the complete entry: removed, the entry reused.
    stale = ckpt.parent / f".{ckpt.name}.tmp-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    again = invoke(args)
    assert again.exit_code == 0, again.output
    assert again.output.count("left half-written by an interrupted shortgpt-serve") == 1
    assert f"Reusing the verified checkpoint {ckpt}" in again.output
    # Killed before its rename: only the temp folder exists. It is removed and the entry computed.
    [profile] = entry_folders(isolated_env, "profiles")
    shutil.rmtree(profile)
    (isolated_env / "profiles" / f".{profile.name}.tmp-x1y2z3").mkdir()
    other = invoke([*args, "--budget", "0.7"])
    assert other.exit_code == 0, other.output
    assert other.output.count("left half-written by an interrupted shortgpt-serve") == 1
    assert "Profile reused" not in other.output
    assert leftovers(isolated_env) == []
    assert cache.check(profile, None) is None


# --- concurrent launchers --------------------------------------------------------------------------------------


def _launch(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "shortgpt_serve.cli", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_two_launchers_compute_the_entry_once(tiny_llama: Path, calibration: Path, isolated_env: Path) -> None:
    args = prune_args(tiny_llama, calibration)
    procs = [_launch(args), _launch(args)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    both = "\n".join(outputs)
    assert both.count("Writing the shortened checkpoint") == 1, both
    assert both.count("[shortgpt-serve] Loading ") == 1  # one model load, one profiling pass
    [ckpt] = entry_folders(isolated_env, "checkpoints")
    assert all(f"Checkpoint: {ckpt}" in out for out in outputs)
    assert cache.check(ckpt, None) is None
    assert leftovers(isolated_env) == []


def test_second_launcher_waits_for_the_first(tiny_llama: Path, calibration: Path, isolated_env: Path) -> None:
    """Deterministic: this test holds the checkpoint's lock the way a first launcher would, then lets go."""
    first = invoke(prune_args(tiny_llama, calibration))
    ckpt = checkpoint_of(first)
    shutil.rmtree(ckpt)
    with cache.lock(isolated_env, "checkpoints", ckpt.name):
        proc = _launch(prune_args(tiny_llama, calibration))
        assert proc.stdout is not None
        seen = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            seen.append(line)
            if "waiting for another shortgpt-serve to finish" in line or not line:
                break
        assert f"waiting for another shortgpt-serve to finish checkpoints/{ckpt.name}" in "".join(seen), seen
        assert proc.poll() is None  # still waiting while the lock is held
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, rest
    assert f"Checkpoint: {ckpt}" in rest


# --- unwritable cache ------------------------------------------------------------------------------------------


def test_file_in_place_of_a_cache_folder(tiny_llama: Path, calibration: Path, isolated_env: Path) -> None:
    """A write that really fails (as root too, where permission bits do not stop writes): a file where the
    cache's profiles folder should be."""
    blocker = isolated_env / "profiles"
    blocker.write_text("not a folder")
    args = prune_args(tiny_llama, calibration)
    result = invoke(args)
    assert result.exit_code == 1
    line = error_line(result)
    assert f"cannot write to the cache {isolated_env}" in line
    assert "--cache-dir (or SHORTGPT_SERVE_CACHE_DIR)" in line
    assert leftovers(isolated_env) == []
    assert entry_folders(isolated_env, "checkpoints") == []
    blocker.unlink()
    assert invoke(args).exit_code == 0  # the next start recovers


NAMESPACE_SCRIPT = r"""
set -u
mount -t tmpfs -o {opts} tmpfs "$CACHE" || exit 77
run() {{ "$PY" -m shortgpt_serve.cli "$@" 2>&1; echo "EXIT=$?"; }}
echo "== first"
run {args}
echo "== leftovers"
find "$CACHE" -name '.*.tmp-*' -o -name '.*.old-*' -o -name '.*.del-*'
echo "== verify"
run cache list --verify
echo "== fixed"
mount -o remount,{fix} "$CACHE"
run {args}
"""


def _in_namespace(tmp_path: Path, opts: str, fix: str, args: list[str]) -> list[str]:
    """Run the CLI on a real small or read-only tmpfs, in a private user and mount namespace (no root needed)."""
    if not shutil.which("unshare"):
        pytest.skip("unshare (util-linux) is not installed")
    cache_dir = tmp_path / "mnt"
    cache_dir.mkdir()
    script = NAMESPACE_SCRIPT.format(opts=opts, fix=fix, args=" ".join(f"'{a}'" for a in args))
    env = {**os.environ, "CACHE": str(cache_dir), "PY": sys.executable, "SHORTGPT_SERVE_CACHE_DIR": str(cache_dir)}
    proc = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    if proc.returncode == 77 or "Operation not permitted" in proc.stderr[:300]:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {proc.stderr.strip()[:200]}")
    text = proc.stdout + proc.stderr
    parts = text.split("== ")
    return [p for p in parts if p]


def _error_lines(section: str) -> list[str]:
    return [line for line in section.splitlines() if line.startswith("Error: ")]


def test_disk_full_real_tmpfs(tiny_llama: Path, calibration: Path, tmp_path: Path) -> None:
    # Room for the profile and the hash memo but not for the checkpoint's weights.
    args = prune_args(tiny_llama, calibration)
    size = (tiny_llama / "model.safetensors").stat().st_size
    first, left, verify, fixed = _in_namespace(tmp_path, f"size={size // 2}", "size=64m", args)
    assert "EXIT=1" in first, first
    [line] = _error_lines(first)
    assert "is full (No space left on device)" in line and "--cache-dir" in line, first
    assert "Traceback" not in first
    assert left.strip() == "leftovers", left  # nothing half-written
    assert "EXIT=0" in verify and "DAMAGED" not in verify, verify
    assert "EXIT=0" in fixed and "Profile reused from the cache" in fixed, fixed


def test_read_only_cache_real_mount(tiny_llama: Path, calibration: Path, tmp_path: Path) -> None:
    args = prune_args(tiny_llama, calibration)
    first, left, _verify, fixed = _in_namespace(tmp_path, "ro", "rw", args)
    assert "EXIT=1" in first, first
    [line] = _error_lines(first)
    assert "cannot write to the cache" in line and "Read-only file system" in line, first
    assert "Traceback" not in first
    assert left.strip() == "leftovers", left
    assert "EXIT=0" in fixed, fixed


# --- cache list / clear ----------------------------------------------------------------------------------------


@pytest.fixture
def filled(tiny_llama: Path, calibration: Path, isolated_env: Path) -> Iterator[Path]:
    result = invoke(prune_args(tiny_llama, calibration))
    assert result.exit_code == 0, result.output
    yield checkpoint_of(result)


def test_cache_list(filled: Path, isolated_env: Path) -> None:
    result = invoke(["cache", "list"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"Cache: {isolated_env}"
    assert lines[1].split() == ["KIND", "KEY", "SIZE", "LAST", "USED", "WHAT"]
    kinds = {line.split()[0] for line in lines[3:-1]}
    assert kinds == {"profiles", "checkpoints", "hashes"}
    [row] = [line for line in lines if line.startswith("checkpoints")]
    manifest = json.loads((filled / cache.MANIFEST).read_text())
    assert manifest["key_sha256"][:12] in row
    removed = json.loads((filled / "shortgpt.json").read_text())["removed_layers"]
    assert f"of 6 layers, removed {removed}" in row and filled.name.split("-")[0] in row
    assert lines[-1].endswith("in all.")

    verified = invoke(["cache", "list", "--verify"])
    assert verified.exit_code == 0 and verified.output.count(" ok") >= 2, verified.output
    _flip(filled / "model.safetensors")
    damaged = invoke(["cache", "list", "--verify"])
    assert damaged.exit_code == 1
    assert "DAMAGED: model.safetensors does not match its sha256" in damaged.output
    assert "1 damaged item(s)" in damaged.output


def test_cache_list_empty_and_cache_dir_option(tmp_path: Path) -> None:
    result = invoke(["cache", "list", "--cache-dir", str(tmp_path / "none")])
    assert result.exit_code == 0 and result.output == f"The cache {tmp_path / 'none'} is empty.\n"


def test_cache_clear_by_kind_and_age(filled: Path, isolated_env: Path) -> None:
    assert invoke(["cache", "clear", "--older-than", "1", "--yes"]).output == f"Nothing to clear in {isolated_env}.\n"
    declined = invoke(["cache", "clear", "--kind", "profiles"], input="n\n")
    assert declined.exit_code == 1 and len(entry_folders(isolated_env, "profiles")) == 1
    result = invoke(["cache", "clear", "--kind", "profiles", "--yes"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Removed profiles/") and "Freed " in result.output
    assert entry_folders(isolated_env, "profiles") == [] and filled.is_dir()
    everything = invoke(["cache", "clear", "--yes"])
    assert everything.exit_code == 0 and f"Removed checkpoints/{filled.name}" in everything.output
    assert not filled.exists()
    assert invoke(["cache", "list"]).output == f"The cache {isolated_env} is empty.\n"
    assert bad_days(invoke(["cache", "clear", "--older-than", "-2"]))


def bad_days(result: Result) -> bool:
    return result.exit_code == 2 and "--older-than must be a number of days >= 0" in error_line(result)


def test_cache_clear_keeps_entries_a_launcher_holds(filled: Path, isolated_env: Path) -> None:
    with cache.in_use(isolated_env, "checkpoints", filled.name):  # as `run` holds the checkpoint it serves
        result = invoke(["cache", "clear", "--yes"])
    assert result.exit_code == 1
    assert f"Kept checkpoints/{filled.name}: in use by a running shortgpt-serve" in result.output
    assert "Removed profiles/" in result.output
    assert cache.check(filled, None) is None  # untouched
    lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert lines == ["Error: 1 item(s) in use by a running shortgpt-serve were kept; stop it and clear again."]
    # Being written counts as held too.
    with cache.lock(isolated_env, "checkpoints", filled.name):
        held = invoke(["cache", "clear", "--kind", "checkpoints", "--yes"])
    assert held.exit_code == 1 and "being written or checked by a running shortgpt-serve" in held.output
    assert invoke(["cache", "clear", "--yes"]).exit_code == 0 and not filled.exists()


def test_json_api(isolated_env: Path) -> None:
    key = {"model": "abc", "workload": {"concurrency": [1, 16]}}
    assert cache.load_json(isolated_env, "benchmarks", key) is None
    assert list(isolated_env.iterdir()) == []  # a miss leaves nothing behind
    path = cache.store_json(isolated_env, "benchmarks", key, {"levels": {"1": 2.5}}, describe="bench")
    assert cache.load_json(isolated_env, "benchmarks", key) == {"levels": {"1": 2.5}}
    assert cache.load_json(isolated_env, "benchmarks", {**key, "model": "abd"}) is None
    _flip(path / cache.DATA)
    assert cache.load_json(isolated_env, "benchmarks", key) is None and not path.exists()
    calls = []
    data, reused = cache.cached_json(isolated_env, "benchmarks", key, lambda: calls.append(1) or {"v": 1})
    again, reused_again = cache.cached_json(isolated_env, "benchmarks", key, lambda: calls.append(1) or {"v": 2})
    assert (data, reused, again, reused_again, len(calls)) == ({"v": 1}, False, {"v": 1}, True, 1)
    entry = next(e for e in cache.entries(isolated_env) if e.kind == "benchmarks")
    assert entry.key == cache.digest(cache.full_key("benchmarks", key))[:12]
    assert entry.what == "-" and entry.size > 0
