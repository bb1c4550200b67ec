"""Names a reader can scan: runs named after what varies, sweeps after their axes, commands that reproduce.

    run_name(["attention=gqa", "pos=alibi", "seed=0", "train=smoke"], axes=["attention", "pos", "seed"])
        -> "gqa-alibi-s0"                                  # a sweep's job: the values of the swept keys
    run_name(["train=smoke", "train.lr=0.001"])  -> "smoke-lr0.001"    # a single run: its overrides
    sweep_name("sweep", ["attention", "pos"])    -> "sweep: attention x pos"
    command(["attention=gqa", "tracking.uri=sqlite:///a b.db"]) -> "python run.py attention=gqa 'tracking.uri=...'"

A config group's choice stands for itself (`gqa`), the seed is `s<n>`, any other key is its last part and
its value (`lr0.001`, `n_layers2`, `precision=bf16`). Where the run is stored or launched (tracking, paths,
hydra, cluster, device_pool) never names it.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

MAX_NAME = 40
ABBREVIATIONS = {"seed": "s"}
NOT_NAMING = ("tracking.", "paths.", "hydra.", "cluster.", "hydra/")
NOT_NAMING_KEYS = ("tracking", "paths", "hydra", "cluster", "device_pool")
AXES_FILE = "sweep_axes"  # in the sweep dir, beside parent_run_id: the swept keys, one a line
NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def parse(overrides: list[str]) -> list[Any]:
    """Hydra's parsed overrides (key_or_group, value, is_sweep_override, ...), in order."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(overrides))


def _names(key: str) -> bool:
    return key not in NOT_NAMING_KEYS and not key.startswith(NOT_NAMING)


def _is_group(key: str) -> bool:
    from ablate.cli import groups

    return key in groups()


def axis_label(key: str) -> str:
    """How a swept key is called in a sweep's name: a group as itself, a dotted key by its last part."""
    return key if _is_group(key) else key.rsplit(".", 1)[-1]


def token(key: str, value: str) -> str:
    """One key=value as a piece of a run name: `gqa`, `s0`, `lr0.001`, `precision=bf16`."""
    if _is_group(key):
        return Path(value).name  # a group choice; a nested option (model=sub/big) by its last part
    if key in ABBREVIATIONS:
        return f"{ABBREVIATIONS[key]}{value}"
    leaf = key.rsplit(".", 1)[-1]
    return f"{leaf}{value}" if NUMBER.fullmatch(value) else f"{leaf}={value}"


def shorten(name: str, limit: int = MAX_NAME) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def run_name(overrides: list[str], axes: list[str] | None = None) -> str:
    """A short name from the values of the swept keys (`axes`), else from every override that names the run;
    'defaults' when there is none."""
    parsed = [o for o in parse(overrides) if not o.is_delete() and not o.is_sweep_override()]
    values = {o.key_or_group: o.get_value_element_as_str() for o in parsed}
    if axes:
        pieces = [token(key, values[key]) for key in axes if key in values]
    else:
        pieces = [token(o.key_or_group, o.get_value_element_as_str()) for o in parsed if _names(o.key_or_group)]
    return shorten("-".join(pieces)) if pieces else "defaults"


def sweep_axes(overrides: list[str], sweeper_params: dict[str, str] | None = None) -> list[str]:
    """The keys a multirun sweeps: those with several values, from the sweeper's params (an experiment's
    `hydra.sweeper.params`) and then the command line."""
    lines = [f"{k}={v}" for k, v in (sweeper_params or {}).items()] + list(overrides)
    axes = [o.key_or_group for o in parse(lines) if o.is_sweep_override()]
    return list(dict.fromkeys(axes))


def sweep_values(overrides: list[str], sweeper_params: dict[str, str] | None = None) -> dict[str, str]:
    """Each key a multirun sets, with its value as written (the comma list of a swept key)."""
    lines = [f"{k}={v}" for k, v in (sweeper_params or {}).items()] + list(overrides)
    return {o.key_or_group: o.input_line.split("=", 1)[1] for o in parse(lines) if not o.is_delete()}


def sweep_name(label: str, axes: list[str]) -> str:
    """`<experiment>: attention x pos`; `<experiment>: one run` when nothing is swept."""
    return f"{label}: {' x '.join(axis_label(k) for k in axes) if axes else 'one run'}"


def command(overrides: list[str], world_size: int = 1, multirun: bool = False) -> str:
    """The shell command that runs these overrides again."""
    head = f"torchrun --nproc_per_node={world_size} run.py" if world_size > 1 else "python run.py"
    return " ".join([head, *(["-m"] if multirun else []), *map(shlex.quote, overrides)])


def write_axes(sweep_dir: Path, axes: list[str]) -> None:
    (sweep_dir / AXES_FILE).write_text("".join(f"{k}\n" for k in axes))


def job_overrides() -> list[str] | None:
    """This Hydra job's own overrides (a sweep's job: its values, not the sweep's lists); None outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None


def job_axes() -> list[str] | None:
    """The swept keys of the multirun this job belongs to (written by the sweep's parent run), else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    path = Path(HydraConfig.get().sweep.dir) / AXES_FILE
    return path.read_text().split() if path.exists() else None


def job_run_name() -> str:
    """This job's run name: from its swept values in a multirun, else from its overrides."""
    return run_name(job_overrides() or [], job_axes())


def job_command(world_size: int = 1) -> str | None:
    """The command that reproduces this job; None outside Hydra (a run started from Python)."""
    overrides = job_overrides()
    return None if overrides is None else command(overrides, world_size)
