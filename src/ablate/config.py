"""Typed configuration: one schema per config group option, registered in Hydra's ConfigStore.

Values live in the YAML files of `conf/` (every default is visible there); the dataclasses here
give their types and allowed ranges. An option's schema holds only the keys that option uses, so
a key set for an option that does not use it (`attention=mha attention.n_kv_heads=2`) is refused
when the config is composed, as is an unknown key or a wrong type. Numeric ranges are declared
next to each field (`num(ge=1)`) and checked by `range_problems` before any data is read.

The config groups ship inside the package (`ablate.conf`, `ablate.experiments`; in a checkout
they are the top-level `conf/` and `experiments/` folders), so `compose()` works from an
installed wheel as well as from a checkout.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf


def num(gt: float | None = None, ge: float | None = None, lt: float | None = None, le: float | None = None) -> Any:
    """A numeric field (or a list of numbers, each checked) whose value from YAML must lie in the given range."""
    return field(default=MISSING, metadata={"range": (gt, ge, lt, le)})


def describe_range(gt, ge, lt, le) -> str:  # noqa: ANN001
    low = f"> {gt}" if gt is not None else f">= {ge}" if ge is not None else ""
    high = f"< {lt}" if lt is not None else f"<= {le}" if le is not None else ""
    return " and ".join(p for p in (low, high) if p) or "finite"


# ---- model components


@dataclass
class AttentionConfig:
    """mha (a key/value head per query head) and mqa (one shared key/value head)."""

    name: str = MISSING
    window: Optional[int] = num(ge=1)  # local attention span in tokens; null = the whole document


@dataclass
class GQAConfig(AttentionConfig):
    n_kv_heads: int = num(ge=1)  # key/value heads; must divide model.n_heads


@dataclass
class PosConfig:
    name: str = MISSING


@dataclass
class RopeConfig(PosConfig):
    rope_theta: float = num(gt=0)


@dataclass
class LearnedPosConfig(PosConfig):
    max_positions: Optional[int] = num(ge=1)  # table size; null = model.context


@dataclass
class MLPConfig:
    name: str = MISSING
    expansion: float = num(gt=0)  # hidden width of the plain MLP, in model widths; GLUs keep its parameter count
    multiple_of: int = num(ge=1)


@dataclass
class NormConfig:
    name: str = MISSING
    eps: float = num(gt=0)


@dataclass
class ModelConfig:
    name: str = MISSING
    n_layers: int = num(ge=1)
    n_heads: int = num(ge=1)
    d_model: int = num(ge=1)
    context: int = num(ge=2)  # a row of one token has no target
    init_std: float = num(gt=0)
    tie_embeddings: bool = MISSING
    dropout: float = num(ge=0, lt=1)  # on the embeddings and on each residual branch (attention and MLP outputs)
    match_params: bool = MISSING  # GQA/MQA: widen the MLP to make up for the smaller K/V projections (MHA's count)


# ---- data


@dataclass
class DataConfig:
    """The Shakespeare plays (one document per scene)."""

    name: str = MISSING
    val_per_mille: int = num(ge=1, le=999)  # share of documents held out for validation, per thousand
    max_val_batches: Optional[int] = num(ge=1)  # null: every validation document


@dataclass
class TextDataConfig(DataConfig):
    paths: list[str] = MISSING  # files or folders
    glob: str = MISSING  # files taken from folders
    doc_separator: Optional[str] = MISSING  # split files into documents on this string
    encoding: str = MISSING  # the files' encoding; the byte tokenizer sees the text as UTF-8
    errors: str = MISSING  # a byte that does not decode: strict (refuse) | replace | ignore | backslashreplace


@dataclass
class TokensDataConfig(DataConfig):
    path: Optional[str] = MISSING  # folder of *train*.bin / *val*.bin shards
    eot_id: int = num(ge=0)  # the end-of-text id between documents
    vocab_size: Optional[int] = num(ge=1)  # the tokenizer's vocabulary size; null: the largest id + 1


# ---- the run


@dataclass
class BackendConfig:
    name: str = MISSING


@dataclass
class TrainConfig:
    name: str = MISSING
    steps: int = num(ge=1)
    batch_size: int = num(ge=1)
    lr: float = num(gt=0)
    min_lr_ratio: float = num(ge=0, le=1)
    warmup_steps: int = num(ge=0)
    weight_decay: float = num(ge=0)
    beta1: float = num(ge=0, lt=1)
    beta2: float = num(ge=0, lt=1)
    grad_clip: float = num(ge=0)  # 0: no clipping
    eval_every: int = num(ge=1)
    log_every: int = num(ge=1)
    checkpoint_every: int = num(ge=0)  # 0: no checkpoints
    flops: Optional[float] = num(gt=0)  # a training FLOP budget: sets train.steps (null: train.steps as given)
    resume: bool = MISSING  # continue from this configuration's checkpoint; false: a new run (the old one is kept)
    compile: Optional[bool] = MISSING  # null: on for CUDA runs, off on CPU
    progress: bool = MISSING
    parallel: str = MISSING  # under torchrun: ddp (replicated model) | fsdp (sharded, FSDP2)


@dataclass
class EvalConfig:
    context_multiples: list[int] = num(ge=1)  # each item
    samples: int = num(ge=0)  # continuations of held-out prompts written to samples.txt at the end
    sample_tokens: int = num(ge=1)


@dataclass
class TrackingConfig:
    name: str = MISSING


@dataclass
class MlflowTrackingConfig(TrackingConfig):
    uri: Optional[str] = MISSING  # null: $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db
    experiment: str = MISSING
    run_name: Optional[str] = MISSING


@dataclass
class ClusterConfig:
    """Slurm resources of each sweep job (hydra/launcher=slurm); `setup` lines run before the job."""

    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    nodes: int = num(ge=1)
    gpus_per_node: int = num(ge=1)  # one task per GPU: a job of several GPUs trains data-parallel
    cpus_per_gpu: int = num(ge=1)
    mem_gb: Optional[int] = num(ge=1)  # per node; null: the partition's default
    timeout_min: int = num(ge=1)
    requeues: int = num(ge=0)  # resubmissions after hitting timeout_min; resumes when train.checkpoint_every > 0
    max_parallel_jobs: int = num(ge=1)
    setup: list[str] = field(default_factory=list)  # e.g. ["source .venv/bin/activate"]


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    output_dir: str = MISSING


@dataclass
class Config:
    attention: Any = MISSING
    pos: Any = MISSING
    mlp: MLPConfig = MISSING
    norm: NormConfig = MISSING
    model: ModelConfig = MISSING
    data: Any = MISSING
    backend: BackendConfig = MISSING
    train: TrainConfig = MISSING
    eval: EvalConfig = MISSING
    tracking: Any = MISSING
    paths: PathsConfig = MISSING
    cluster: ClusterConfig = MISSING
    device_pool: list[int] = MISSING  # GPUs a sweep's jobs share, one job per GPU (a GPU listed k times: k jobs)
    seed: int = num(ge=0)
    device: str = MISSING  # auto | cpu | cuda
    precision: str = MISSING  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    deterministic: bool = MISSING  # bit-identical CPU runs (CUDA attention backwards are not deterministic)


# the schema of each group option (the option's YAML names it first in its defaults list)
OPTION_SCHEMAS = {
    "attention": {"schema": AttentionConfig, "schema_gqa": GQAConfig},
    "pos": {"schema": PosConfig, "schema_rope": RopeConfig, "schema_learned": LearnedPosConfig},
    "data": {"schema": DataConfig, "schema_text": TextDataConfig, "schema_tokens": TokensDataConfig},
    "tracking": {"schema": TrackingConfig, "schema_mlflow": MlflowTrackingConfig},
}


def out_of_range(metadata: Any, key: str, value: Any) -> str | None:
    """'key=value must be <range>' when a numeric value (or an item of a list of them) breaks the range its
    field declares, else None."""
    if isinstance(value, (list, tuple, ListConfig)):
        for i, item in enumerate(value):
            problem = out_of_range(metadata, f"{key}[{i}]", item)
            if problem:
                return problem
        return None
    if "range" not in metadata or not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    gt, ge, lt, le = metadata["range"]
    allowed = describe_range(gt, ge, lt, le)
    if not math.isfinite(value):
        return f"{key}={value} must be a finite number {allowed}"
    if (gt is not None and value <= gt) or (ge is not None and value < ge) or \
            (lt is not None and value >= lt) or (le is not None and value > le):
        return f"{key}={value} must be {allowed}"
    return None


def check_field(schema: type, name: str, value: Any, key: str) -> None:
    """Raise ValueError if `value` breaks the range `schema.name` declares (for callers without a composed config)."""
    problem = out_of_range(next(f.metadata for f in fields(schema) if f.name == name), key, value)
    if problem:
        raise ValueError(problem)


def range_problems(cfg: DictConfig) -> list[str]:
    """Every numeric value outside the range its schema declares (or not finite), as
    'key=value must be <range>'."""
    problems: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
        if schema is None or not is_dataclass(schema):
            return
        for f in fields(schema):
            value = node.get(f.name)
            key = f"{prefix}{f.name}"
            if isinstance(value, DictConfig):
                walk(value, key + ".")
            else:
                problem = out_of_range(f.metadata, key, value)
                if problem:
                    problems.append(problem)

    walk(cfg, "")
    return problems


def visible_gpus() -> list[int]:
    """The CUDA indices this process sees (none on a CPU host): the default `device_pool`."""
    import torch

    return list(range(torch.cuda.device_count()))


def keys_help() -> str:
    """Every key of the config, with the options that have it (`python run.py --help`)."""
    from ablate.cli import groups, option_keys

    lines = []
    for group, options in groups().items():
        if group == "experiment":
            continue
        owners: dict[str, list[str]] = {}
        for option in options:
            for key in option_keys(group, option):
                if key != "name":
                    owners.setdefault(key, []).append(option)
        for key, have in owners.items():
            lines.append(f"{group}.{key}" + ("" if len(have) == len(options) else f"  ({group}={', '.join(have)})"))
    return "\n".join(lines)


def groups_help() -> str:
    """`group: option, option` lines for `python run.py --help` (the YAML options, not the schemas)."""
    from ablate.cli import groups

    return "\n".join(f"{group}: {', '.join(options)}" for group, options in groups().items())


RESOLVERS = {
    "ablate.groups": groups_help,
    "ablate.keys": keys_help,
    "ablate.visible_gpus": visible_gpus,
    "ablate.jobs_for": lambda pool: max(1, len(pool)),  # one sweep job at a time per GPU of the pool
}


def register_resolvers() -> None:
    for name, resolver in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


register_resolvers()  # at import: a launcher's worker process composes the config without run.py


def _shipped(package: str, folder: str) -> Path:
    """A folder shipped as the package `ablate.<folder>`: in a checkout, the top-level `<folder>/`
    (also when only `src/` is on the path); in an installed wheel, the package's own."""
    checkout = Path(__file__).resolve().parents[2] / folder
    if (checkout / "__init__.py").is_file():
        return checkout
    return Path(str(resources.files(package)))


def config_dir() -> Path:
    """The config groups (`conf/`, installed as `ablate.conf`)."""
    return _shipped("ablate.conf", "conf")


def experiments_dir() -> Path:
    """The named ablations (`experiments/`, installed as `ablate.experiments`)."""
    return _shipped("ablate.experiments", "experiments")


def register_configs() -> None:
    """Register the schemas, and the named ablations of `experiments/` as the `experiment` group."""
    cs = ConfigStore.instance()
    cs.store(name="ablate_schema", node=Config)
    for group, schemas in OPTION_SCHEMAS.items():
        for name, node in schemas.items():
            cs.store(group=group, name=name, node=node)
    folder = experiments_dir()
    for path in sorted(folder.glob("*.yaml")):
        node: Any = OmegaConf.load(path)
        cs.store(group="experiment", name=path.stem, node=node, package="_global_")


def project_root() -> Path:
    """Where runs write by default: $ABLATE_ROOT, else the checkout this package sits in, else the
    current folder (an installed package)."""
    env = os.environ.get("ABLATE_ROOT")
    if env:
        return Path(env).resolve()
    checkout = Path(__file__).resolve().parents[2]
    return checkout if (checkout / "pyproject.toml").is_file() else Path.cwd()


def compose(overrides: list[str] | tuple[str, ...] = (), return_hydra_config: bool = False) -> DictConfig:
    """The config `python run.py <overrides>` would run, for tests, notebooks and tools (with `hydra`,
    the launcher's settings among them, if `return_hydra_config`)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    os.environ.setdefault("ABLATE_ROOT", str(project_root()))
    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)
