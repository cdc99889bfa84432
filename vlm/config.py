"""One typed config tree, validated once at start-up.

YAML files in configs/ are loaded, `--set a.b=c` overrides applied, then the whole tree is
validated by pydantic. Unknown keys and bad values are `ConfigError`s whose message names
the key path and what is allowed. Each component receives only its own slice. Which keys
a resume may change lives in vlm.config_changes."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from data_pipeline.config import FilterConfig, IngestConfig, ScoreConfig
from data_pipeline.shards.reader import ReaderConfig
from vlm.data.config import AugmentConfig, ColourAugmentConfig, CropConfig
from vlm.models.config import ModelConfig
from vlm.models.presets import list_presets, preset_dict
from vlm.objectives.configs import AnyObjectiveConfig, ClipInfoNCEConfig


# Keys of data: that older versions wrote and no run reads any more (the demo's corpus, now
# in the `demo:` section): a saved config holding them still loads.
LEGACY_DATA_KEYS: tuple[str, ...] = ("corpus",)
# Top-level sections of a config file that belong to a program above vlm and that RunConfig
# leaves to it: `demo:` (the synthetic corpus of `vlm demo`, validated by demo.config).
OTHER_SECTIONS: tuple[str, ...] = ("demo",)


def drop_legacy_keys(tree: dict) -> dict:
    """A saved config tree without the keys LEGACY_DATA_KEYS names."""
    data = tree.get("data")
    if not isinstance(data, dict) or not any(k in data for k in LEGACY_DATA_KEYS):
        return tree
    return {**tree, "data": {k: v for k, v in data.items() if k not in LEGACY_DATA_KEYS}}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TokenizerConfig(Strict):
    # "bpe": a byte-level BPE trained on the run's captions (vocab_size, min_frequency);
    # "clip": CLIP's 49,408-token BPE with OpenCLIP's exact ids (from open_clip_torch's
    # vocabulary file; the two keys below do not apply), for CLIP weights and context 77
    kind: Literal["bpe", "clip"] = "bpe"
    vocab_size: int = Field(1000, ge=64)
    min_frequency: int = Field(2, ge=1)


class OptimConfig(Strict):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    warmup_steps: int = Field(30, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0)


class TrainConfig(Strict):
    # a number, or [min, max]: an elastic run starts at whatever size it gets within the
    # range, shrinks when a node is lost and grows back (global_batch_size then required)
    num_workers: int | tuple[int, int] = 2
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False  # ZeRO 1-3: optimizer states and step in CPU memory
    micro_batch_size: int = Field(64, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    # the samples of one optimizer step over all workers; when set, grad_accum_steps is
    # derived from it (it must be a multiple of micro_batch_size × workers)
    global_batch_size: int | None = Field(None, ge=1)
    # batch-coupled objectives (InfoNCE, SigLIP, UniCL) over the whole global batch with
    # the activations of one micro-batch (vlm/train/gradcache.py)
    grad_cache: bool = False
    steps: int = Field(500, ge=1)
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(3, ge=0)  # newest complete ones kept; 0 keeps all
    checkpoint_dir: str = "{run_dir}/checkpoints"  # local path or s3://bucket/prefix
    seed: int = 0
    threads_per_worker: int = Field(1, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # after SIGTERM/SIGINT, how long the workers have to save and end before they are killed
    stop_grace_s: float = Field(60.0, gt=0)
    # `vlm train`: restarts of the worker group after a worker dies (-1: unlimited)
    max_failures: int = Field(3, ge=-1)
    # elastic runs (num_workers [min, max]): how often Ray Train looks for resources to grow
    # back; how long a group start waits for resources before it fails and a smaller size is
    # tried (after a node dies, until Ray marks it dead: RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S)
    resize_check_s: float = Field(60.0, gt=0)
    worker_start_timeout_s: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("train.offload_optimizer needs train.zero_stage 1, 2 or 3")
        low, high = self.worker_range()
        if not 1 <= low <= high:
            shown = self.num_workers if isinstance(self.num_workers, int) else list(self.num_workers)
            raise ValueError(f"train.num_workers {shown}: a number of workers ≥ 1, "
                             "or [min, max] with 1 ≤ min ≤ max")
        if low < high and self.global_batch_size is None:
            raise ValueError(f"train.num_workers {list(self.num_workers)} is a range: set train.global_batch_size, "
                             "which every size in it keeps (gradient accumulation is recomputed at each size)")
        return self

    def worker_range(self) -> tuple[int, int]:
        """(min, max) workers; a fixed size n is (n, n)."""
        n = self.num_workers
        return (n, n) if isinstance(n, int) else (n[0], n[1])

    @property
    def elastic(self) -> bool:
        low, high = self.worker_range()
        return low < high

    def accum_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each worker."""
        if self.global_batch_size is None:
            return self.grad_accum_steps
        per_pass = self.micro_batch_size * world_size
        if self.global_batch_size % per_pass:
            raise ConfigError(f"train.global_batch_size {self.global_batch_size} is not a multiple of "
                              f"train.micro_batch_size × workers = {self.micro_batch_size} × {world_size}")
        return self.global_batch_size // per_pass


class MetricsConfig(Strict):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9400, ge=0, le=65535)  # rank r serves on port + r; 0 picks free ports


class EvalConfig(Strict):
    """Evaluation (vlm/eval/runner.py): `vlm eval`, and every `every_steps` during training."""
    label_template: str = "{label}"  # class label from shard metadata
    # zero-shot class names and prompts (README, "Class names and templates"): label value ->
    # class name, and templates with a {c} slot ({} still accepted). Empty: `vlm eval
    # --classnames/--templates`, else classnames.txt / zeroshot_classification_templates.txt
    # beside the data, else the label with underscores as spaces / the built-in templates.
    class_names: dict[str, str] = Field(default_factory=dict)
    prompt_templates: list[str] = Field(default_factory=list)
    recall_at: list[int] = Field(default_factory=lambda: [1, 5, 10], min_length=1)
    batch_size: int = Field(256, ge=1)
    # empty = every task the data supports (labels, captions, masks)
    tasks: list[Literal["zeroshot", "retrieval", "linear-probe", "dense"]] = Field(default_factory=list)
    every_steps: int = Field(0, ge=0)  # periodic evaluation during training; 0 = off
    # linear probe: features, the inverse-regularisation sweep, the cap on training samples
    probe_features: Literal["embed", "pooled"] = "embed"
    probe_c_grid: list[float] = Field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0],
                                      min_length=1)
    probe_max_train: int = Field(2000, ge=2)
    # zero-shot dense prediction: MaskCLIP value features or plain patch tokens; the background class
    dense_features: Literal["maskclip", "tokens"] = "maskclip"
    background_prompts: list[str] = Field(default_factory=lambda: [
        "a photo of a plain background.", "a plain background.", "an empty background.",
    ], min_length=1)
    # video tasks: the bounds on decoding one clip (vlm/eval/video_data.py's VideoLimits); a
    # clip over any of them is skipped and named
    video_max_bytes: int = Field(512 << 20, gt=0)
    video_max_pixels: int = Field(4096 * 4096, gt=0, description="one frame's width x height")
    video_max_frames: int = Field(10_000, gt=0)
    video_max_seconds: float = Field(60.0, gt=0, description="wall clock to count and decode one clip")

    @field_validator("class_names", mode="before")
    @classmethod
    def _label_keys_as_text(cls, value):
        # YAML reads `{3: three}` with an int key; a label value is always text
        return {str(k): v for k, v in value.items()} if isinstance(value, dict) else value

    @field_validator("prompt_templates")
    @classmethod
    def _templates_have_slot(cls, value: list[str]) -> list[str]:
        for i, template in enumerate(value):
            if "{c}" not in template and "{}" not in template:
                raise ValueError(f"template {i} {template!r} has no {{c}} slot for the class name")
        return value


class DataConfig(Strict):
    ingest: IngestConfig = IngestConfig()
    score: ScoreConfig = ScoreConfig()  # `vlm data score`
    filter: FilterConfig = FilterConfig()  # `vlm data filter`
    reader: ReaderConfig = ReaderConfig()
    label_field: str | None = "label"  # sample metadata field holding the class (UniCL); None = no labels
    augment: AugmentConfig = AugmentConfig()  # the two views of image–image objectives
    colour_augment: ColourAugmentConfig = ColourAugmentConfig()  # caption-consistent greyscale (training)
    train_crop: CropConfig = CropConfig()  # training images; evaluation resizes and centre-crops
    # data worker processes per training rank that decode, crop and tokenise (0: in the training
    # process); None: this worker's CPUs (shared among the node's workers) minus one
    loader_workers: int | None = Field(None, ge=0)
    prefetch_batches: int = Field(2, ge=1)  # batches each data worker keeps ready
    train_shards: str = "{run_dir}/shards/train"
    eval_shards: str = "{run_dir}/shards/heldout"
    # Training skips and counts a bad sample (no image, undecodable, over the pixel budget
    # data.ingest.max_pixels, no or an undecodable caption); more than this share of bad ones
    # among a rank's last bad_sample_window samples read ends the run, naming the shards.
    max_bad_sample_ratio: float = Field(0.5, gt=0, le=1)
    bad_sample_window: int = Field(1000, ge=1)
    # each rank logs every step's samples to {run_dir}/sample_ids/ (an exactly-once audit: vlm.train.sample_ids)
    log_sample_ids: bool = False

    @model_validator(mode="before")
    @classmethod
    def _drop_legacy(cls, value):
        # configs saved before the demo's corpus moved to the file's `demo:` section (run
        # directories, checkpoints) hold data.corpus: dropped, as no run reads it
        return {k: v for k, v in value.items() if k not in LEGACY_DATA_KEYS} if isinstance(value, dict) else value


class RunConfig(Strict):
    name: str = "run"
    run_dir: str = "runs/run"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    objectives: list[AnyObjectiveConfig] = Field(default_factory=lambda: [ClipInfoNCEConfig()], min_length=1)
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    metrics: MetricsConfig = MetricsConfig()
    eval: EvalConfig = EvalConfig()
    # the memory-heavy losses (contrastive, captioning, token heads): auto = Triton kernels on
    # CUDA, the same tiled algorithm in plain torch elsewhere; naive = the full logits
    # matrices (the reference); see vlm/kernels and docs/kernels.md
    kernels: Literal["auto", "triton", "torch", "naive"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _imported_weights_use_clip_tokenizer(cls, value):
        # OpenCLIP's and Hugging Face's CLIP weights were trained on CLIP's token ids, so a run
        # starting from them (model.init_from) tokenizes with CLIP's unless told otherwise
        model = value.get("model") if isinstance(value, dict) else None
        source = str((model.get("init_from") if isinstance(model, dict) else None) or "").split(":", 1)[0]
        tokenizer = value.get("tokenizer") if isinstance(value, dict) else None
        if source in ("openclip", "hf") and not (isinstance(tokenizer, dict) and "kind" in tokenizer):
            value = {**value, "tokenizer": {**(tokenizer or {}), "kind": "clip"}}
        return value

    @model_validator(mode="after")
    def _check_cross_fields(self) -> "RunConfig":
        if any(o.name == "unicl" for o in self.objectives) and not self.data.label_field:
            raise ValueError("objective unicl needs labels: set data.label_field to the metadata field holding them")
        names = {o.name for o in self.objectives}
        for name in sorted(names & {"itm", "mcm"}):
            if self.model.fusion is None:
                raise ValueError(f"objective {name} needs the multimodal encoder: set model.fusion "
                                 "(e.g. model.fusion={type: concat}; see configs/blip.yaml)")
        if "itg" in names and self.model.decoder is None:
            raise ValueError("objective itg needs the caption decoder: set model.decoder (see configs/coca.yaml)")
        if any(o.name == "itm" and o.exclude_same_label for o in self.objectives) and not self.data.label_field:
            raise ValueError("objective itm with exclude_same_label needs labels: set data.label_field")
        return self

    def path(self, template: str) -> str:
        return template.format(run_dir=self.run_dir)


class ConfigError(ValueError):
    """A config problem; the message names the key path and what is allowed."""


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (through list[...], Union, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out = []
    for arg in getattr(annotation, "__args__", ()) or ():
        out.extend(_models_in(arg))
    return list(dict.fromkeys(out))  # Annotated exposes its type twice


def _walk(model: type[BaseModel], loc: tuple) -> tuple[list[str], list[type[BaseModel]] | None]:
    """Follows an error location through the tree. Returns the path as the user wrote it
    (discriminated unions add their tag to pydantic's location, e.g. objectives.0.siglip;
    it is dropped here) and the models that can hold the last key (None if unknown)."""
    candidates: list[type[BaseModel]] | None = [model]
    shown: list[str] = []
    for i, part in enumerate(loc):
        if isinstance(part, int) or candidates is None:
            shown.append(str(part))
            continue
        by_tag = [c for c in candidates if getattr(c.model_fields.get("name"), "default", None) == part]
        if by_tag and len(candidates) > 1:
            candidates = by_tag
            continue
        shown.append(str(part))
        if i == len(loc) - 1:
            break
        field = next((c.model_fields[part] for c in candidates if part in c.model_fields), None)
        candidates = _models_in(field.annotation) if field is not None else None
        candidates = candidates or None
    return shown, candidates


def format_validation_error(err: ValidationError, root: type[BaseModel] = RunConfig) -> str:
    lines = []
    for e in err.errors():
        shown, holders = _walk(root, tuple(e["loc"]))
        path = ".".join(shown) or "(root)"
        if e["type"] == "extra_forbidden":
            allowed = sorted(holders[0].model_fields) if holders and len(holders) == 1 else None
            hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
            lines.append(f"  {path}: unknown key{hint}")
        else:
            lines.append(f"  {path}: {e['msg']} (got {e.get('input')!r})")
    return "invalid config:\n" + "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: empty component in key path {key!r}")
    return parts, yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    for item in overrides:
        parts, value = parse_override(item)
        node = tree
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[:i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return tree


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _expand_model_preset(tree: dict) -> dict:
    """`model: {preset: ViT-B-16, ...}` starts from the registered preset; keys written
    beside it override the preset's."""
    model = tree.get("model")
    if not isinstance(model, dict) or not model.get("preset"):
        return tree
    name = model["preset"]
    if name not in list_presets():
        raise ConfigError(f"invalid config:\n  model.preset: unknown preset {name!r}; "
                          f"registered: {', '.join(list_presets())}")
    return {**tree, "model": _deep_merge(preset_dict(name), model)}


def read_config_tree(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> dict:
    """YAML file (or an empty tree when None) + overrides, model presets expanded, not validated."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
    tree = apply_overrides(tree, list(overrides))
    return _expand_model_preset(tree)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> RunConfig:
    """YAML file (or the embedded defaults when None) + overrides -> validated RunConfig;
    the OTHER_SECTIONS of the file are left to their programs."""
    tree = read_config_tree(path, overrides)
    tree = {k: v for k, v in tree.items() if k not in OTHER_SECTIONS}
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def upgrade_saved_tree(tree: dict) -> dict:
    """A config tree saved by an older version, as this version reads it: a model saved
    before model.vision.image_mean/image_std existed was trained on x / 127.5 - 1, i.e.
    mean = std = 0.5 (not CLIP's statistics, today's default)."""
    model = tree.get("model")
    vision = model.get("vision") if isinstance(model, dict) else None
    if not isinstance(vision, dict) or "image_mean" in vision or "image_std" in vision:
        return tree
    vision = {**vision, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    return {**tree, "model": {**model, "vision": vision}}


def config_from_dict(tree: dict) -> RunConfig:
    """A saved config tree (a checkpoint's, a run directory's) -> RunConfig."""
    return RunConfig.model_validate(upgrade_saved_tree(tree))
