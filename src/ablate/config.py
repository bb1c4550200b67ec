"""Typed configuration: one dataclass per config group, registered in Hydra's ConfigStore.

An unknown key or a wrong type fails when Hydra composes the config, naming the key. Checks that need
more than one key (divisibility, registered names, sizes) live in `ablate.validate`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf


@dataclass
class AttentionConfig:
    name: str = "mha"
    n_kv_heads: Optional[int] = None  # key/value heads; None = one per query head
    window: Optional[int] = None  # local attention span in tokens; None = the whole document


@dataclass
class PosConfig:
    name: str = "rope"
    rope_theta: float = 10000.0
    max_positions: Optional[int] = None  # learned: table size; None = model.context


@dataclass
class MLPConfig:
    name: str = "swiglu"
    expansion: float = 4.0  # hidden width of the plain MLP, in model widths; GLUs keep its parameter count
    multiple_of: int = 8


@dataclass
class NormConfig:
    name: str = "rmsnorm"
    eps: float = 1e-5


@dataclass
class ModelConfig:
    name: str = "tiny"
    n_layers: int = 2
    n_heads: int = 4
    d_model: int = 128
    context: int = 256
    init_std: float = 0.02
    tie_embeddings: bool = True


@dataclass
class DataConfig:
    name: str = "shakespeare"
    paths: list[str] = field(default_factory=list)  # text: files or folders
    glob: str = "*.txt"  # text: files taken from folders
    doc_separator: Optional[str] = None  # text: split files into documents on this string
    path: Optional[str] = None  # tokens: folder of *train*.bin / *val*.bin shards
    eot_id: int = 50256  # tokens: the end-of-text id between documents
    vocab_size: Optional[int] = None  # tokens: the tokenizer's vocabulary size
    val_per_mille: int = 50  # share of documents held out for validation, per thousand
    max_val_batches: int = 8


@dataclass
class BackendConfig:
    name: str = "auto"


@dataclass
class TrainConfig:
    name: str = "default"
    steps: int = 300
    batch_size: int = 8
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    log_every: int = 10
    checkpoint_every: int = 0  # 0: no checkpoints
    resume: bool = True  # continue from this configuration's checkpoint; false: a new run (the old one is kept)
    compile: bool = False
    progress: bool = True
    parallel: str = "ddp"  # under torchrun: ddp (replicated model) | fsdp (sharded, FSDP2); one process: unused


@dataclass
class TrackingConfig:
    name: str = "mlflow"
    uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<root>/outputs/mlflow.db
    experiment: str = "ablate"
    run_name: Optional[str] = None


@dataclass
class ClusterConfig:
    """Slurm resources of each sweep job (hydra/launcher=slurm); `setup` lines run before the job."""

    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    nodes: int = 1
    gpus_per_node: int = 1  # one task per GPU: a job of several GPUs trains data-parallel
    cpus_per_gpu: int = 8
    mem_gb: Optional[int] = None  # per node; None: the partition's default
    timeout_min: int = 240
    requeues: int = 0  # resubmissions after hitting timeout_min; resumes when train.checkpoint_every > 0
    max_parallel_jobs: int = 64
    setup: list[str] = field(default_factory=list)  # e.g. ["source .venv/bin/activate"]


@dataclass
class PathsConfig:
    root_dir: str = "."
    output_dir: str = "outputs"


@dataclass
class Config:
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    pos: PosConfig = field(default_factory=PosConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    device_pool: list[int] = field(default_factory=list)  # GPUs a sweep's jobs share, one job per GPU
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    deterministic: bool = True  # bit-identical CPU runs (CUDA attention backwards are not deterministic)


def visible_gpus() -> list[int]:
    """The CUDA indices this process sees (none on a CPU host): the default `device_pool`."""
    import torch

    return list(range(torch.cuda.device_count()))


RESOLVERS = {
    "ablate.visible_gpus": visible_gpus,
    "ablate.jobs_for": lambda pool: max(1, len(pool)),  # one sweep job at a time per GPU of the pool
}


def register_resolvers() -> None:
    for name, resolver in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


register_resolvers()  # at import: a launcher's worker process composes the config without run.py


def register_configs(experiments_dir: Path | None = None) -> None:
    """Register the schema, and the named ablations of `experiments/` as the `experiment` group."""
    cs = ConfigStore.instance()
    cs.store(name="ablate_schema", node=Config)
    if experiments_dir is not None and experiments_dir.is_dir():
        for path in sorted(experiments_dir.glob("*.yaml")):
            node: Any = OmegaConf.load(path)
            cs.store(group="experiment", name=path.stem, node=node, package="_global_")


def project_root() -> Path:
    """The checkout holding conf/ and experiments/ ($ABLATE_ROOT, else the tree this package sits in)."""
    env = os.environ.get("ABLATE_ROOT")
    return Path(env).resolve() if env else Path(__file__).resolve().parents[2]


def compose(overrides: list[str] | tuple[str, ...] = (), return_hydra_config: bool = False) -> DictConfig:
    """The config `python run.py <overrides>` would run, for tests, notebooks and tools (with `hydra`,
    the launcher's settings among them, if `return_hydra_config`)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    root = project_root()
    os.environ.setdefault("ABLATE_ROOT", str(root))
    register_configs(root / "experiments")
    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)
