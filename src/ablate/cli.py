"""`python run.py`: a refused configuration prints its reasons and exits with status 2, without a traceback.

Refusals are ablate's `ConfigError`, Hydra's composition and override-syntax errors, and command-line
overrides that name an unknown config group, option or key (checked here before Hydra composes, with the
close matches). Real errors keep their tracebacks. In a multirun each job's refusal or traceback is printed
when it happens, under the job's number and overrides; the exit status is that of the first failing job.
"""
from __future__ import annotations

import difflib
import os
import sys
import traceback
from functools import lru_cache
from typing import Any, Callable

REFUSED = 2  # exit status of a refused configuration
HEADING = "the configuration cannot run:\n  - "
REPORTED = "ablate_reported"  # set on a job's exception once it has been printed
GRAMMAR = "the override syntax: https://hydra.cc/docs/advanced/override_grammar/basic"


def main(hydra_main: Callable[[], Any]) -> None:
    """Run `run.py`'s @hydra.main function, reporting refusals as messages."""
    from hydra.errors import CompactHydraException

    problems = check_overrides(_command_line_overrides(sys.argv[1:]))
    if problems:
        _refuse(HEADING + "\n  - ".join(problems))
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing; what is shown is decided here
    try:
        hydra_main()
    except CompactHydraException as err:  # composition, override syntax, a missing config
        _refuse(HEADING + _hydra_message(err))
    except Exception as err:  # noqa: BLE001 - the rest keeps its traceback
        from ablate.validate import ConfigError

        refused = isinstance(err, ConfigError)
        if getattr(err, REPORTED, False):  # a multirun job, printed when it failed
            _say(f"a job of the sweep {'was refused' if refused else 'failed'} (see above)")
            sys.exit(REFUSED if refused else 1)
        if refused:
            _refuse(str(err))
        raise


def run_job(cfg: Any) -> float:
    """The body of `run.py`'s task: run(cfg); a refusal is printed, not raised with a traceback."""
    from ablate.experiment import run
    from ablate.validate import ConfigError

    try:
        return run(cfg)
    except ConfigError as err:
        job = _multirun_job()
        if job is None:
            _refuse(str(err))
        _say(f"job {job} refused: {err}")
        setattr(err, REPORTED, True)
        raise
    except Exception as err:
        job = _multirun_job()
        if job is not None:  # Hydra would show only the first failed job, at the end of the sweep
            _say(f"job {job} failed:\n" + "".join(traceback.format_exception(err)).rstrip())
            setattr(err, REPORTED, True)
        raise


def check_overrides(overrides: list[str]) -> list[str]:
    """Problems of command-line overrides: bad syntax, or an unknown group, option or key of conf/."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser, problems, parsed = OverridesParser.create(), [], []
    for line in overrides:
        try:
            (override,) = parser.parse_overrides([line])
        except OverrideParseException as err:
            problems.append(f"{line}: {str(err).splitlines()[0]} ({GRAMMAR})")
            continue
        key = override.key_or_group
        if override.is_delete() or override.package is not None or key.startswith("hydra"):
            continue
        parsed.append(override)
        problem = _check_group(override) if key in groups() else _check_key(key)
        if problem:
            problems.append(problem)
    return problems or _unused_keys(parsed)


@lru_cache(maxsize=1)
def groups() -> dict[str, tuple[str, ...]]:
    """The config groups of conf/ (and experiments/ as `experiment`) with their options."""
    from ablate.config import config_dir, experiments_dir

    found = {d.name: tuple(sorted(p.stem for p in d.glob("*.yaml")))
             for d in sorted(config_dir().iterdir()) if d.is_dir() and d.name not in ("hydra", "__pycache__")}
    found["experiment"] = tuple(sorted(p.stem for p in experiments_dir().glob("*.yaml")))
    return found


@lru_cache(maxsize=None)
def option_keys(group: str, option: str) -> tuple[str, ...]:
    """The keys an option of a group sets: those its YAML lists, and those of the options of the same
    group it extends through its defaults list (train=smoke extends train=default)."""
    from omegaconf import OmegaConf

    from ablate.config import config_dir

    node = OmegaConf.load(config_dir() / group / f"{option}.yaml")
    inherited = [k for parent in node.get("defaults", []) if isinstance(parent, str) and parent in groups()[group]
                 for k in option_keys(group, parent)]
    return tuple(dict.fromkeys([*inherited, *(k for k in node if k != "defaults")]))


@lru_cache(maxsize=1)
def keys() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Every key of the config (dotted), from the run's own keys and every group option's, and those
    holding a list or a dict."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    from ablate.config import config_dir

    found, containers = [], []

    def walk(prefix: str, node: Any) -> None:
        for name in node:
            key, child = f"{prefix}{name}", node._get_node(name)
            found.append(key)
            if isinstance(child, DictConfig):
                walk(f"{key}.", child)
            elif isinstance(child, ListConfig):
                containers.append(key)

    top = OmegaConf.load(config_dir() / "config.yaml")
    walk("", OmegaConf.masked_copy(top, [k for k in top if k not in ("defaults", "hydra")]))
    for group, options in groups().items():
        if group != "experiment":
            for option in options:
                walk(f"{group}.", OmegaConf.load(config_dir() / group / f"{option}.yaml"))
    return tuple(dict.fromkeys(k for k in found if not k.endswith(".defaults"))), tuple(dict.fromkeys(containers))


def _selected(overrides: list[Any]) -> dict[str, list[str]]:
    """The options each group runs with: from the overrides, else config.yaml's defaults."""
    from omegaconf import OmegaConf

    from ablate.config import config_dir

    chosen: dict[str, list[str]] = {}
    for entry in OmegaConf.load(config_dir() / "config.yaml").defaults:
        if isinstance(entry, dict) or hasattr(entry, "items"):
            for group, option in entry.items():
                if group in groups():
                    chosen[group] = [str(option)]
    for override in overrides:
        if override.key_or_group in groups() and not override.is_delete():
            chosen[override.key_or_group] = _values(override)
    return chosen


def _unused_keys(overrides: list[Any]) -> list[str]:
    """Settings of a group option that the chosen option does not have (refused, not ignored)."""
    chosen, problems = _selected(overrides), []
    for override in overrides:
        group, _, field = override.key_or_group.partition(".")
        if not field or group not in groups() or group == "experiment" or "." in field:
            continue
        for option in chosen.get(group, []):
            if option in groups()[group] and field not in option_keys(group, option):
                users = [o for o in groups()[group] if field in option_keys(group, o)]
                fix = f"use {group}={users[0]} {override.input_line}" if users else "remove it"
                problems.append(f"{group}.{field} is not a setting of {group}={option}"
                                + (f" (only of {group}={', '.join(users)})" if users else "") + f"; {fix}")
    return problems


def _check_group(override: Any) -> str | None:
    group, options = override.key_or_group, groups()[override.key_or_group]
    if group == "experiment" and not override.is_add():
        return f"an experiment is added to the defaults: write +{override.input_line}"
    for option in _values(override):
        if option not in options and option != "null":
            close = difflib.get_close_matches(option, options, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            return (f"unknown option '{option}' for config group '{group}'; {hint}"
                    f"choose one of: {', '.join(options)}")
    return None


def _check_key(key: str) -> str | None:
    known, containers = keys()
    if key in known or any(key.startswith(f"{c}.") for c in containers):
        return None
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(key, [*groups(), *known], n=1)
    close = close or [k for k in known if k.rsplit(".", 1)[-1] == leaf][:1]
    if close and close[0] in groups() and "." not in key:
        return (f"unknown config group '{key}'; did you mean '{close[0]}'? "
                f"({close[0]} options: {', '.join(groups()[close[0]])})")
    if close:
        return f"unknown key {key}; did you mean {close[0]}?"
    return f"unknown key {key}; `python run.py --help` lists the config groups and keys"


def _values(override: Any) -> list[str]:
    """The options an override selects (none for a glob, which Hydra matches against the options)."""
    from hydra.core.override_parser.types import ValueType

    if override.value_type == ValueType.GLOB_CHOICE_SWEEP:
        return []
    if override.is_sweep_override():
        return list(override.sweep_string_iterator())
    return [override.get_value_element_as_str()]


def _command_line_overrides(argv: list[str]) -> list[str]:
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(argv)
    return [] if args.help or args.hydra_help else list(args.overrides)


def _hydra_message(err: BaseException) -> str:
    """Hydra's message with the first line of its cause, without OmegaConf's key dump."""
    cause = err.__cause__
    detail = str(cause).strip().splitlines()[0] if cause is not None and str(cause).strip() else ""
    return str(err).strip() + (f": {detail}" if detail and detail not in str(err) else "")


def _multirun_job() -> str | None:
    """'<num> (<overrides>)' inside a multirun job, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    job = HydraConfig.get().job
    return f"{job.num} ({' '.join(HydraConfig.get().overrides.task)})"


def _say(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank would print it
        print(message, file=sys.stderr, flush=True)


def _refuse(message: str) -> None:
    _say(message)
    raise SystemExit(REFUSED)
