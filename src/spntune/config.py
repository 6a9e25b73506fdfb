"""Typed trial configuration: defaults here, overridden by YAML, then by ``--set key=value``.

A trial config is a nested dict (``{"refiner": {"kind": "cspn"}}``) or a flat one with dotted
keys (``{"refiner.kind": "cspn"}``, what a search produces); both validate into ``TrialConfig``.
Unknown keys and bad values raise ``ConfigError`` listing every offending key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from spntune.errors import ConfigError
from spntune.names import ARCHITECTURES, DATASET_NAMES, check_encoder, check_model_kwargs, parse_loss_spec

__all__ = [
    "REFINER_CONFIGS",
    "SEARCH_SMOKE_OVERRIDES",
    "SMOKE_OVERRIDES",
    "CSPNConfig",
    "ConfigError",
    "DataConfig",
    "DySPNConfig",
    "ModelConfig",
    "NoRefinerConfig",
    "OptimConfig",
    "RefinerConfig",
    "TrackingConfig",
    "TrainConfig",
    "TrialConfig",
    "check_data_root",
    "describe_pipeline",
    "flatten",
    "layer_config",
    "load_yaml",
    "parse_set_args",
    "parse_yaml",
    "read_yaml",
    "unflatten",
]


#: ``data.num_workers``' ceiling: loader processes of one trial (``auto`` takes the trial's CPUs).
MAX_LOADER_WORKERS = 64


class _Strict(BaseModel):
    # allow_inf_nan=False: every float setting must be a finite number (YAML's .inf / .nan are refused)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def check_data_root(data: DataConfig) -> None:
    """A ``data.root`` that is given is a folder: refused at once (listing the dataset imports torch)."""
    if data.root and not Path(data.root).is_dir():
        raise ConfigError(f"data.root {data.root!r} is not a directory (set it with --set data.root=PATH)")


class DataConfig(_Strict):
    """Which dataset, where, at what size."""

    name: str = "synthetic"
    root: str | None = None
    image_size: tuple[int, int] = (128, 128)  # (height, width); multiples of 32 for smp encoders
    train_split: str | None = None  # None: the dataset's default (pets trainval, voc/folder train)
    val_split: str | None = None  # None: pets test, voc/folder val
    target: str = "binary"  # pets only: binary | binary_ignore_border | trimap
    train_size: int = Field(256, ge=1)  # synthetic only
    val_size: int = Field(64, ge=1)  # synthetic only
    limit_train: int | None = Field(None, ge=1)  # first N samples, for quick runs
    limit_val: int | None = Field(None, ge=1)
    augment: bool = True
    # DataLoader worker processes; "auto": from the CPUs the trial may use (trainables.loader_workers)
    num_workers: int | Literal["auto"] = "auto"
    # Decode and resize each file image once into a memory-mapped uint8 cache in cache_dir
    # (data/cache.py); a search sets the folder to <storage>/data_cache, None (spntune train's
    # default) means no cache. Synthetic data is generated, never cached.
    cache: bool = True
    cache_dir: str | None = None

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        if v not in DATASET_NAMES:
            raise ValueError(f"unknown dataset {v!r}; valid: {list(DATASET_NAMES)}")
        return v

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers(cls, v: Any) -> Any:
        # at most 64: each worker is a process holding a copy of the dataset's state (1000 hung the machine)
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_LOADER_WORKERS):
            return v
        raise ValueError(f"must be an integer in 0..{MAX_LOADER_WORKERS} or auto, got {v!r}")

    @field_validator("image_size", mode="before")
    @classmethod
    def _square(cls, v: Any) -> Any:
        return (v, v) if isinstance(v, int) else v

    @field_validator("image_size")
    @classmethod
    def _multiple_of_32(cls, v: tuple[int, int]) -> tuple[int, int]:
        if any(s < 32 or s % 32 for s in v):
            raise ValueError(
                f"height and width must be positive multiples of 32 (smp encoders downsample 32x), got {v}"
            )
        return v

    @model_validator(mode="after")
    def _root_needed(self) -> DataConfig:
        if self.name != "synthetic" and not self.root:
            raise ValueError(f"dataset {self.name!r} needs data.root (the folder holding it)")
        return self


class ModelConfig(_Strict):
    """The coarse network."""

    arch: str = "unet"
    encoder: str = "resnet18"
    encoder_weights: str | None = None  # "imagenet" needs internet or a pre-populated HF cache
    kwargs: dict[str, Any] = Field(default_factory=dict)  # passed to the architecture

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        if v not in ARCHITECTURES:
            raise ValueError(f"unknown coarse architecture {v!r}; valid: {list(ARCHITECTURES)}")
        return v

    @field_validator("encoder")
    @classmethod
    def _known_encoder(cls, v: str) -> str:
        return check_encoder(v)

    @field_validator("encoder_weights", mode="before")
    @classmethod
    def _null_words(cls, v: Any) -> Any:
        return None if isinstance(v, str) and v.lower() in ("null", "none", "") else v

    @model_validator(mode="after")
    def _known_kwargs(self) -> ModelConfig:
        check_model_kwargs(self.arch, self.encoder, self.kwargs)
        return self


class NoRefinerConfig(_Strict):
    """``kind: none``: the refined prediction is the coarse prediction."""

    kind: Literal["none"] = "none"


class _PropagationConfig(_Strict):
    """What every propagation refiner takes."""

    kernel_size: int = Field(3, ge=3, le=11)
    iterations: int = Field(6, ge=1, le=32)
    channels: int = Field(32, ge=4, le=512)  # affinity-network bottleneck
    propagate: Literal["probs", "logits"] = "probs"
    # Where the affinities come from: a small CNN over [image, probs] (light), a U-Net over the same
    # (unet, the original report's design; its last decoder width is `channels`), or the coarse
    # network's own decoder features plus probs (shared, the papers' design).
    affinity_net: Literal["light", "unet", "shared"] = "light"
    affinity_encoder: str = "resnet18"  # unet: its encoder; weights follow model.encoder_weights
    # Recompute each step (its weights and propagation) in backward: saved memory for T steps is
    # then T x [B, C, H, W] plus the guidance, instead of every step's k*k-1 weight maps (DySPN).
    checkpoint_steps: bool = False

    @field_validator("affinity_encoder")
    @classmethod
    def _known_encoder(cls, v: str) -> str:
        return check_encoder(v)

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"kernel size must be odd (3, 5, 7, 9 or 11), got {v}")
        return v


class CSPNConfig(_PropagationConfig):
    """``kind: cspn`` (Cheng et al. 2018)."""

    kind: Literal["cspn"] = "cspn"
    centre: Literal["h0", "ht"] = "h0"  # centre weight on h^0 (official "8sum") or on h^t
    affinity_norm: Literal["abs_sum", "clamped"] = "abs_sum"


class DySPNConfig(_PropagationConfig):
    """``kind: dyspn`` (Lin et al. 2022): (k-1)/2 rings with per-step attention."""

    kind: Literal["dyspn"] = "dyspn"


#: Refiner settings by ``refiner.kind``, the names of ``models.REFINERS``: a new refiner is one
#: module there plus one config model here. A refiner's settings (without ``kind``) are the keyword
#: arguments of its module.
REFINER_CONFIGS: dict[str, type[_Strict]] = {"none": NoRefinerConfig, "cspn": CSPNConfig, "dyspn": DySPNConfig}
DEFAULT_REFINER = "cspn"

RefinerConfig = Annotated[NoRefinerConfig | CSPNConfig | DySPNConfig, Field(discriminator="kind")]


class OptimConfig(_Strict):
    name: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0, le=10)
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd only
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float | None = Field(5.0, gt=0)  # max global grad norm; None = off

    @field_validator("grad_clip", mode="before")
    @classmethod
    def _clip_off_is_null(cls, v: Any) -> Any:
        if isinstance(v, float) and v == float("inf"):
            raise ValueError("must be a finite number > 0; null turns clipping off, got inf")
        return v


class TrainConfig(_Strict):
    stage: Literal["joint", "two_stage"] = "joint"
    epochs: int = Field(5, ge=1)  # joint
    coarse_epochs: int = Field(3, ge=1)  # two_stage: train coarse ...
    refine_epochs: int = Field(2, ge=1)  # ... then freeze it and train the refiner
    coarse_loss_weight: float = Field(0.5, ge=0)  # joint: total = refined + w * coarse
    loss: str = "ce"
    batch_size: int = Field(8, ge=1)
    seed: int = Field(0, ge=0, lt=2**32)  # numpy's and torch's generators take 0 <= seed < 2**32
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True  # cuda only: float16 autocast with a gradient scaler
    # bfloat16 autocast on a CPU with native bf16 instructions (AVX512-BF16 or AMX; elsewhere float32, with
    # a warning): the coarse network's convolutions in bf16, the refiner (affinity network and propagation)
    # and the losses in float32. CamVid epochs measured 1.35-1.40x faster on the 2-core EPYC VM (README,
    # "CPU bfloat16"); off by default, as its numbers are not float32's.
    cpu_bf16: bool = False
    # Convolutions on NHWC memory (torch.channels_last): "auto" turns it on for CPU trials, where oneDNN's
    # NHWC convolutions measured 14-16 % faster per training step on the 2-core EPYC VM; on CUDA it stays
    # off until measured there. true / false force it.
    channels_last: Literal["auto", True, False] = "auto"
    viz_samples: int = Field(4, ge=0)  # validation images drawn into panels
    # host memory a trial may allocate (Linux RLIMIT_DATA); at most 2**30 GiB, which keeps it a C long
    memory_limit_gb: float | None = Field(None, gt=0, le=2**30)
    # After the last epoch, score the best epoch's weights on the validation images at their original
    # sizes (final_* metrics: what published results report); costs one pass over the validation set.
    final_eval: bool = True
    # Two-stage: trials whose coarse phase is the same (data, image size, coarse model, loss, optimiser,
    # batch size, coarse epochs, seed, device type) train it once and reuse it from coarse_cache_dir
    # (coarse_cache.py). A search sets the folder to <storage>/coarse_cache; None (spntune train's
    # default) keeps no cache.
    coarse_cache: bool = True
    coarse_cache_dir: str | None = None

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        parse_loss_spec(v)
        return v

    def uses_autocast(self, device_type: str, cpu_bf16_native: bool) -> bool:
        """Whether a trial on ``device_type`` runs under autocast: float16 on CUDA (``amp``), bfloat16 on a
        CPU whose bf16 is native (``cpu_bf16``)."""
        if device_type == "cuda":
            return self.amp
        return device_type == "cpu" and self.cpu_bf16 and cpu_bf16_native

    def uses_channels_last(self, device_type: str) -> bool:
        """Whether a trial on ``device_type`` runs its convolutions on channels-last memory."""
        return device_type == "cpu" if self.channels_last == "auto" else bool(self.channels_last)


class TrackingConfig(_Strict):
    """MLflow: set ``uri`` to log this trial as a run (the search sets all of these)."""

    uri: str | None = None  # travels to Ray workers inside the config: they do not inherit env vars
    experiment: str = "spntune"
    parent_run_id: str | None = None
    search_name: str | None = None
    run_name: str | None = None
    viz: bool = True  # mask panels, per-step strips and Grad-CAM at each new best epoch
    gradcam: bool = True


class TrialConfig(_Strict):
    """Everything one trial needs. ``TrialConfig.from_dict`` is the entry point."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    refiner: RefinerConfig = Field(default_factory=CSPNConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    output_dir: str | None = None  # where `spntune train` writes config, checkpoint, panels

    @field_validator("refiner", mode="before")
    @classmethod
    def _refiner_kind(cls, v: Any) -> Any:
        """``kind`` picks the refiner's settings model; it defaults to cspn and must be a known name."""
        if not isinstance(v, dict):
            return v
        kind = v.get("kind", DEFAULT_REFINER)
        if kind not in REFINER_CONFIGS:
            raise ValueError(f"refiner.kind: unknown refiner {kind!r}; valid: {sorted(REFINER_CONFIGS)}")
        return {**v, "kind": kind}

    @model_validator(mode="after")
    def _combinations(self) -> TrialConfig:
        pooled = {"deeplabv3", "deeplabv3plus", "pspnet"}
        if self.model.arch in pooled and self.train.batch_size < 2:
            raise ValueError(
                f"train.batch_size must be >= 2 for model.arch={self.model.arch!r}: its pooling "
                "branch applies BatchNorm to one value per channel"
            )
        return self

    @property
    def total_epochs(self) -> int:
        """Epochs this trial runs; two-stage without a refiner is only its coarse phase."""
        t = self.train
        if t.stage == "joint":
            return t.epochs
        return t.coarse_epochs + (t.refine_epochs if self.refiner.kind != "none" else 0)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> TrialConfig:
        """Validate a nested or dotted-flat dict; raise ``ConfigError`` naming every bad key."""
        try:
            return cls.model_validate(unflatten(config))
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc)) from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        if loc[:1] == ["refiner"] and len(loc) > 1 and loc[1] in REFINER_CONFIGS:
            kind = loc.pop(1)  # the union's tag: report refiner.<key>, say which kind it belongs to
            if err["type"] == "extra_forbidden":
                fields = sorted(set(REFINER_CONFIGS[kind].model_fields) - {"kind"})
                takes = f"its settings: {', '.join(fields)}" if fields else "it takes no settings"
                lines.append(f"  {'.'.join(loc)}: not a setting of refiner.kind={kind} ({takes})")
                continue
        msg = err["msg"].removeprefix("Value error, ")
        key = ".".join(loc) or "<config>"
        if msg.startswith(f"{key}.") and ": " in msg:  # a section validator that names the key itself
            key, msg = msg.split(": ", 1)
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        got = (
            f" (got {err['input']!r})"
            if err["type"] != "extra_forbidden"
            and not isinstance(err.get("input"), dict)
            and "got " not in msg
            and repr(err.get("input")) not in msg
            else ""
        )
        lines.append(f"  {key}: {msg}{got}")
    return "invalid trial config:\n" + "\n".join(lines)


def describe_pipeline(config: dict[str, Any]) -> str:
    """One-line summary of a flat (dotted) trial config or of a run's MLflow params."""
    kind = config.get("refiner.kind", "cspn")
    refiner = (
        kind
        if kind == "none"
        else f"{kind} k{config.get('refiner.kernel_size', '?')} T{config.get('refiner.iterations', '?')}"
    )
    lr = config.get("optim.lr")
    lr_text = f" lr {lr:.1e}" if isinstance(lr, float) else ""
    return f"{config.get('model.arch', 'unet')}/{config.get('model.encoder', 'resnet18')} + {refiner}, {config.get('train.loss', 'ce')}{lr_text}"


def unflatten(config: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1, "a": {"c": 2}}`` -> ``{"a": {"b": 1, "c": 2}}``."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and key in ("data", "model", "refiner", "optim", "train", "tracking"):
            value = unflatten(value)
        parts = str(key).split(".")
        node = out
        for part in parts[:-1]:
            existing = node.setdefault(part, {})
            if not isinstance(existing, dict):
                raise ConfigError(f"invalid trial config:\n  {key}: {part!r} is a value, not a section")
            node = existing
        leaf = parts[-1]
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf] = {**node[leaf], **value}
        else:
            node[leaf] = value
    return out


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Inverse of ``unflatten``: nested dict -> dotted keys (``model.kwargs`` stays a dict)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "kwargs":
            out |= flatten(value, f"{name}.")
        else:
            out[name] = value
    return out


def yaml_error(path: str | Path, exc: yaml.YAMLError) -> str:
    """``FILE:LINE:COLUMN: what is wrong`` (1-based, as editors count) for a YAML syntax error."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = " ".join(p for p in (getattr(exc, "context", None), getattr(exc, "problem", None)) if p) or str(exc)
    return f"{where}: not valid YAML: {problem}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last silently:
    a second ``data:`` section would replace the first without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges may repeat keys on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                seen = key in first_line
            except TypeError:  # an unhashable key: the base constructor says so
                continue
            if seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"found the key {key!r} twice (first on line {first_line[key] + 1}); give each key once",
                    key_node.start_mark,
                )  # fmt: skip
            first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys (raises ``yaml.YAMLError``)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: safe


def read_yaml(path: str | Path, what: str) -> Any:
    """Parse the YAML file ``what`` (e.g. "config file") at ``path``.

    Raises:
        ConfigError: naming the file: missing, unreadable, not UTF-8 text, bad YAML (with line and column),
            or a key given twice in one mapping.
    """
    if not str(path).strip():  # Path("") is ".", the current folder
        raise ConfigError(f"{what}: empty path (an unset variable?)")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        utf16 = "; it looks like UTF-16" if exc.object[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        byte = exc.object[exc.start]
        raise ConfigError(
            f"{what} {path} is not UTF-8 text (byte {byte:#04x} at offset {exc.start}{utf16}): save it as UTF-8 YAML"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        return parse_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {yaml_error(path, exc)}") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A trial config file (``spntune train --config``) as a dict; ``ConfigError`` naming the file."""
    data = read_yaml(path, "config file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def parse_set_args(items: list[str]) -> dict[str, Any]:
    """``["refiner.kind=dyspn", "train.epochs=3"]`` -> dotted dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value (e.g. refiner.kind=cspn), got {item!r}")
        try:
            out[key] = parse_yaml(value)
        except yaml.YAMLError as exc:
            problem = " ".join(p for p in (getattr(exc, "context", None), getattr(exc, "problem", None)) if p)
            raise ConfigError(
                f"--set {item!r}: the value is not valid YAML ({problem or exc}); quote a string that holds "
                "YAML punctuation, e.g. --set 'data.root=\"[my] data\"'"
            ) from None
    return out


#: Overrides that shrink any trial to seconds on a CPU (applied after --config, before --set).
SMOKE_OVERRIDES: dict[str, Any] = {
    "data.image_size": [64, 64],
    "data.train_size": 16,
    "data.val_size": 8,
    "data.limit_train": 16,
    "data.limit_val": 8,
    "train.epochs": 1,
    "train.coarse_epochs": 1,
    "train.refine_epochs": 1,
    "train.batch_size": 4,
    "train.viz_samples": 2,
}

#: Overrides for `search --smoke-test`: every trial shrinks to seconds (any space, any data).
SEARCH_SMOKE_OVERRIDES: dict[str, Any] = {
    **SMOKE_OVERRIDES,
    "train.epochs": 2,  # two epochs, so ASHA has a rung to act on
    "train.viz_samples": 0,  # picture-free to stay fast; `--space smoke` without --smoke-test draws them
    "model.encoder": "resnet18",
}


def layer_config(config_file: str | Path | None, sets: list[str], smoke: bool) -> dict[str, Any]:
    """Layer YAML file < smoke overrides < ``--set`` into one nested dict (not yet validated).

    A ``--set refiner.kind=...`` that changes the file's refiner kind starts the refiner section
    afresh (the file's settings belong to the other refiner; ``none`` takes none at all), keeping only
    the refiner keys set alongside it: ``--config camvid.yaml --set refiner.kind=none`` just works.
    """
    if config_file is not None and not str(config_file).strip():
        raise ConfigError("--config: empty path (an unset variable?); leave --config out to train the defaults")
    merged = flatten(unflatten(dict(load_yaml(config_file)))) if config_file is not None else {}
    if smoke:
        merged |= SMOKE_OVERRIDES
    sets_flat = flatten(unflatten(parse_set_args(sets)))
    if "refiner.kind" in sets_flat and sets_flat["refiner.kind"] != merged.get("refiner.kind", DEFAULT_REFINER):
        merged = {k: v for k, v in merged.items() if not k.startswith("refiner.")}
    return unflatten({**merged, **sets_flat})
