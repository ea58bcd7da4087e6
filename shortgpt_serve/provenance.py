"""The provenance record written beside a shortened checkpoint (``shortgpt.json``), typed.

What was done to which model: the source and its hash, Block Influence per layer, the layers removed and kept, the
calibration text, the budgets and the choice, the quality measured, and the sha256 of every file in the folder.
:func:`build_provenance` is the one place a record is made; :meth:`Provenance.from_json` reads any record written
so far (keys missing from older or hand-made records read as None). A primitive: it imports no stage.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shortgpt_serve.version import __version__

if TYPE_CHECKING:
    from shortgpt_serve.config import Config
    from shortgpt_serve.models.source import ModelSource
    from shortgpt_serve.profile import LayerProfile
    from shortgpt_serve.selection import Selection

TOOL = "shortgpt-serve"


def _known(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of ``data`` that are fields of ``cls``: records from newer versions may carry more."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass(frozen=True, kw_only=True)
class SourceRecord:
    """The full model the checkpoint was cut from."""

    name: str
    origin: str
    sha256: str
    model_type: str | None = None
    architectures: tuple[str, ...] | None = None
    num_layers: int

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SourceRecord:
        arch = data.get("architectures")
        return cls(**{**_known(cls, data), "architectures": None if arch is None else tuple(arch)})

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["architectures"] = None if self.architectures is None else list(self.architectures)
        return out


@dataclass(frozen=True, kw_only=True)
class CalibrationRecord:
    """The calibration text BI was measured on; every field None in a record written without profiling."""

    source: str | None = None
    sha256: str | None = None
    num_tokens: int | None = None
    num_sequences: int | None = None
    seq_len: int | None = None
    heldout_fraction: float | None = None
    seed: int | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CalibrationRecord:
        return cls(**_known(cls, data))

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True, kw_only=True)
class SelectionRecord:
    """The budgets asked for and what the chosen depth met."""

    criterion: str
    budget: float
    cost_ratio: float
    cost_context_tokens: int
    params_full: int
    params_short: int
    min_quality: float | None = None
    latency_met: bool | None = None
    quality_met: bool | None = None
    reason: str = ""

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SelectionRecord:
        return cls(**_known(cls, data))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class TaskRecord:
    """One benchmark task's result; ``score`` is the task's primary ``metric``."""

    acc: float | None = None
    acc_norm: float | None = None
    metric: str
    score: float
    chance: float | None = None
    n: int | None = None
    retained: float | None = None


# Keys of a quality record written only when known (the full model's record has no standard error).
OPTIONAL_QUALITY_KEYS = (
    "retained",
    "retained_se",
    "retained_ci",
    "raw_ratio",
    "no_signal",
    "kl",
    "kl_se",
    "agreement",
    "agreement_se",
    "lambada",
    "lambada_se",
    "lambada_n",
    "plain",
    "gain_ci",
)


@dataclass(frozen=True, kw_only=True)
class QualityRecord:
    """A model's measured quality: per task, perplexity on held-out text, and what it retains of the full model."""

    tasks: dict[str, TaskRecord] = field(default_factory=dict)
    perplexity: float | None = None
    retained: float | None = None
    retained_se: float | None = None
    raw_ratio: float | None = None
    no_signal: tuple[str, ...] | None = None
    retained_ci: tuple[float, float] | None = None
    """95% paired bootstrap interval of ``retained``."""
    kl: float | None = None
    """Mean KL(full || this model) per held-out token, nats."""
    kl_se: float | None = None
    agreement: float | None = None
    """Share of held-out tokens where this model's top next token is the full model's."""
    agreement_se: float | None = None
    lambada: float | None = None
    """LAMBADA last-word greedy accuracy on held-out passages."""
    lambada_se: float | None = None
    lambada_n: int | None = None
    plain: QualityRecord | None = None
    """For a healed model: the same removal without healing, measured beside it."""
    gain_ci: tuple[float, float] | None = None
    """For a healed model: 95% paired bootstrap interval of its retained minus ``plain``'s (0 inside: noise)."""

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> QualityRecord:
        known = _known(cls, data)
        known["tasks"] = {t: TaskRecord(**_known(TaskRecord, v)) for t, v in (data.get("tasks") or {}).items()}
        if known.get("no_signal") is not None:
            known["no_signal"] = tuple(known["no_signal"])
        for key in ("retained_ci", "gain_ci"):
            if known.get(key) is not None:
                lo, hi = known[key]
                known[key] = (float(lo), float(hi))
        if known.get("plain") is not None:
            known["plain"] = QualityRecord.from_json(known["plain"])
        return cls(**known)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.no_signal is not None:
            out["no_signal"] = list(self.no_signal)
        if self.retained_ci is not None:
            out["retained_ci"] = list(self.retained_ci)
        if self.gain_ci is not None:
            out["gain_ci"] = list(self.gain_ci)
        if self.plain is not None:
            out["plain"] = self.plain.to_json()
        return {k: v for k, v in out.items() if v is not None or k not in OPTIONAL_QUALITY_KEYS}


@dataclass(frozen=True, kw_only=True)
class HealingRecord:
    """How the kept layers were healed: the method, its settings, its data and its cost."""

    method: str = "none"
    ridge: float | None = None
    objective: str | None = None
    """linear: what the least squares weighs (heal.objective)."""
    calibration_tokens: int | None = None
    """Tokens of the calibration text (the profiled part, disjoint from every evaluation) the maps were fitted on."""
    seconds: float | None = None
    runs: tuple[dict[str, Any], ...] = ()
    """Per run of removed layers: the kept layer its map is folded into, and the fit's relative error without and
    with the map."""
    unhealed_runs: tuple[tuple[int, ...], ...] = ()
    steps: int | None = None
    """distill: optimizer steps, sequences per step, learning rate, seed and tokens trained on."""
    batch_size: int | None = None
    lr: float | None = None
    seed: int | None = None
    tokens: int | None = None
    kl_first: float | None = None
    """distill: mean training KL (nats/token, in-sample) of the first and the last steps."""
    kl_last: float | None = None
    rank: int | None = None
    """distill: 0 where the kept layers themselves were trained, else the rank of the adapters merged into them."""
    linear_start: dict[str, Any] | None = None
    """distill: the linear healing it started from."""

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> HealingRecord:
        known = _known(cls, data)
        known["runs"] = tuple(dict(r) for r in known.get("runs") or ())
        known["unhealed_runs"] = tuple(tuple(int(i) for i in r) for r in known.get("unhealed_runs") or ())
        return cls(**known)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["runs"] = [dict(r) for r in self.runs]
        out["unhealed_runs"] = [list(r) for r in self.unhealed_runs]
        optional = (
            *("objective", "steps", "batch_size", "lr", "seed", "tokens"),
            *("kl_first", "kl_last", "rank", "linear_start"),
        )
        return {k: v for k, v in out.items() if v is not None or k not in optional}


@dataclass(frozen=True, kw_only=True)
class QualitySection:
    full: QualityRecord
    shortened: QualityRecord | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> QualitySection:
        short = data.get("shortened")
        return cls(
            full=QualityRecord.from_json(data["full"]),
            shortened=None if short is None else QualityRecord.from_json(short),
        )

    def to_json(self) -> dict[str, Any]:
        return {"full": self.full.to_json(), "shortened": None if self.shortened is None else self.shortened.to_json()}


@dataclass(frozen=True, kw_only=True)
class Provenance:
    """What ``shortgpt.json`` holds. JSON keys are the field names, in this order."""

    tool: str = TOOL
    tool_version: str
    created: str
    """UTC time the checkpoint was written, ISO 8601."""
    served_model_name: str | None = None
    source: SourceRecord
    removed_layers: tuple[int, ...]
    """Original indices of the removed decoder layers, ascending."""
    kept_layers: tuple[int, ...]
    calibration: CalibrationRecord = field(default_factory=CalibrationRecord)
    block_influence: tuple[float, ...] | None = None
    selection: SelectionRecord | None = None
    quality: QualitySection | None = None
    healing: HealingRecord = field(default_factory=HealingRecord)
    files: dict[str, str] = field(default_factory=dict)
    """File name -> sha256 of every file of the checkpoint folder but shortgpt.json itself."""

    @property
    def num_kept(self) -> int:
        return self.source.num_layers - len(self.removed_layers)

    @property
    def shortened_quality(self) -> QualityRecord | None:
        """The served model's quality: the shortened record, or the full model's when nothing was removed."""
        if self.quality is None:
            return None
        if self.quality.shortened is not None:
            return self.quality.shortened
        return None if self.removed_layers else self.quality.full

    def checkpoint_sha256(self) -> str:
        """Content hash of the checkpoint: a digest of the sha256 of each of its files."""
        return hashlib.sha256(json.dumps(self.files, sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Provenance:
        """Read a record; raises KeyError, TypeError or ValueError when it is not one."""
        known = _known(cls, data)
        bi, sel, quality = data.get("block_influence"), data.get("selection"), data.get("quality")
        return cls(
            **{
                **known,
                "source": SourceRecord.from_json(data["source"]),
                "removed_layers": tuple(int(i) for i in data["removed_layers"]),
                "kept_layers": tuple(int(i) for i in data.get("kept_layers") or ()),
                "calibration": CalibrationRecord.from_json(data.get("calibration") or {}),
                "block_influence": None if bi is None else tuple(float(b) for b in bi),
                "selection": SelectionRecord.from_json(sel) if sel else None,
                "quality": QualitySection.from_json(quality) if quality else None,
                "healing": HealingRecord.from_json(data.get("healing") or {}),
                "files": dict(data.get("files") or {}),
            }
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "tool": self.tool,
            "tool_version": self.tool_version,
            "created": self.created,
            "served_model_name": self.served_model_name,
            "source": self.source.to_json(),
            "removed_layers": list(self.removed_layers),
            "kept_layers": list(self.kept_layers),
            "calibration": self.calibration.to_json(),
            "block_influence": None if self.block_influence is None else list(self.block_influence),
            "selection": None if self.selection is None else self.selection.to_json(),
            "quality": None if self.quality is None else self.quality.to_json(),
            "healing": self.healing.to_json(),
            "files": dict(self.files),
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2) + "\n"


def _quality(record: QualityRecord | Mapping[str, Any]) -> QualityRecord:
    return record if isinstance(record, QualityRecord) else QualityRecord.from_json(record)


def build_provenance(
    source: ModelSource,
    removed: list[int],
    *,
    served_model_name: str | None = None,
    profile: LayerProfile | None = None,
    selection: Selection | None = None,
    config: Config | None = None,
    full: QualityRecord | Mapping[str, Any] | None = None,
    healing: Mapping[str, Any] | None = None,
) -> Provenance:
    """The record of cutting ``removed`` out of ``source``: with the profile, the selection and the settings that
    chose them when given, the full model's quality (``full``; the shortened one is the selection's) and the
    healing's record (``healing``, as :meth:`LinearHealing.record` gives it; none: plain removal). The
    files' hashes are added by ``write_checkpoint`` once they are written."""
    gone = sorted(removed)
    calibration = CalibrationRecord()
    if profile is not None:
        calibration = CalibrationRecord(
            source=profile.calibration_source,
            sha256=profile.calibration_sha256,
            num_tokens=profile.num_tokens,
            num_sequences=profile.num_sequences,
            seq_len=profile.seq_len,
            heldout_fraction=None if config is None else config.calibration.heldout_fraction,
            seed=None if config is None else config.calibration.seed,
        )
    sel = None
    if selection is not None:
        sel = SelectionRecord(
            criterion=selection.criterion,
            budget=selection.budget,
            cost_ratio=selection.cost_ratio,
            cost_context_tokens=0 if config is None else config.selection.cost_context_tokens,
            params_full=selection.params_full,
            params_short=selection.params_short,
            min_quality=selection.min_quality,
            latency_met=selection.latency_met,
            quality_met=selection.quality_met,
            reason=selection.reason,
        )
    arch = source.config.get("architectures")
    quality = None
    if full is not None:
        short = None if selection is None or selection.quality is None else _quality(selection.quality)
        quality = QualitySection(full=_quality(full), shortened=short)
    return Provenance(
        tool_version=__version__,
        created=dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        served_model_name=served_model_name,
        source=SourceRecord(
            name=source.name,
            origin=source.origin,
            sha256=source.sha256,
            model_type=source.config.get("model_type"),
            architectures=None if arch is None else tuple(arch),
            num_layers=source.num_layers,
        ),
        removed_layers=tuple(gone),
        kept_layers=tuple(i for i in range(source.num_layers) if i not in set(gone)),
        calibration=calibration,
        block_influence=None if profile is None else tuple(profile.bi),
        selection=sel,
        quality=quality,
        healing=HealingRecord.from_json(healing or {}),
    )
