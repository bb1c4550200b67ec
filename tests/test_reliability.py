"""Bad input is refused before any compute, naming the key and the fix; runs are deterministic.

Configuration refusals are checked where they are made, without a store: `plan(cfg)` (everything
about the config), `check_io(cfg)` (the store and folders a tracked run writes to) and `build_data`
(the files the data keys point at). One end-to-end test checks that `run(cfg)` of a refused
configuration leaves no run behind.
"""
from __future__ import annotations

import math
import typing
from dataclasses import fields, is_dataclass

import numpy as np
import pytest
import torch
from conftest import TINY, history, runs_in, tiny_cfg
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from ablate import config as schema
from ablate.cli import check_overrides
from ablate.config import compose
from ablate.data import build_data, write_shard
from ablate.experiment import run
from ablate.validate import ConfigError, check_io, plan


def refusal(overrides: list[str], check=plan) -> str:
    """The message of the ConfigError `check` raises for the composed `overrides`."""
    with pytest.raises(ConfigError) as err:
        check(compose(overrides))
    return str(err.value)


def data_refusal(overrides: list[str]) -> str:
    cfg = compose(overrides)
    plan(cfg)  # the configuration itself is fine: the files are not
    with pytest.raises((ValueError, OSError)) as err:
        build_data(cfg.data, context=cfg.model.context, batch_size=cfg.train.batch_size, seed=cfg.seed)
    return str(err.value)


def assert_words(message: str, words: list[str]) -> None:
    for word in words:
        assert word in message, message


# ---- reported cases: each once ran (or failed late) and is now refused by plan() with the key named

REPORTED = [
    (["train.beta1=1.5"], "train.beta1=1.5 must be >= 0 and < 1"),
    (["train.lr=nan"], "train.lr=nan must be a finite number > 0"),
    (["model.init_std=-1"], "model.init_std=-1.0 must be > 0"),
    (["model.context=1"], "model.context=1 must be >= 2"),
    (["pos=rope", "pos.rope_theta=0"], "pos.rope_theta=0.0 must be > 0"),
    (["pos=rope", "pos.rope_theta=-1"], "pos.rope_theta=-1.0 must be > 0"),
    (["norm.eps=-1"], "norm.eps=-1.0 must be > 0"),
    (["seed=-1"], "seed=-1 must be >= 0"),
    (["mlp.expansion=0"], "mlp.expansion=0.0 must be > 0"),
]


@pytest.mark.parametrize("overrides,line", REPORTED, ids=[" ".join(o) for o, _ in REPORTED])
def test_reported_silent_or_late_failures_are_refused_by_plan(overrides, line):
    assert refusal(overrides).splitlines()[1:] == [f"  - {line}"]


@pytest.mark.parametrize("attention", ["mha", "mqa"])
def test_a_kv_head_count_for_an_option_without_one_is_refused(attention):
    overrides = [f"attention={attention}", "attention.n_kv_heads=3"]
    with pytest.raises(ConfigCompositionException, match="n_kv_heads"):
        compose(overrides)
    (problem,) = check_overrides(overrides)
    assert problem.startswith(f"attention.n_kv_heads is not a setting of attention={attention}")
    assert "use attention=gqa attention.n_kv_heads=3" in problem


# ---- other configurations that cannot run: (overrides, words of the message: the key and the fix)

PLAN = [
    (["model.n_heads=3"], ["model.d_model=128 is not a multiple of model.n_heads=3"]),
    (["attention=gqa", "attention.n_kv_heads=3"], ["attention.n_kv_heads=3 must divide model.n_heads=4",
                                                   "try attention.n_kv_heads=1"]),
    (["pos=learned", "pos.max_positions=64"], ["pos.max_positions=64", "model.context=256", "raise pos.max_positions"]),
    (["pos=rope", "model.d_model=12", "model.n_heads=4"], ["pos=rope needs an even head dim", "change model.d_model"]),
    (["backend=xformers"], ["backend=xformers", "need CUDA", "Backends that can: eager, sdpa"]),
    (["backend=flex"], ["backend=flex", "backward on CPU", "sdpa"]),
    (["backend=cudnn"], ["backend=cudnn", "CUDA devices only", "sdpa"]),
    (["device=cuda"], ["device=cuda but no CUDA GPU", "device=cpu"]),
    (["device=tpu"], ["device='tpu' is unknown", "auto, cpu, cuda"]),
    (["precision=bf16"], ["precision=bf16", "fp32 on CPU"]),
    (["precision=fp8"], ["precision='fp8' is unknown", "auto, bf16, fp32"]),
    (["train.parallel=zero"], ["train.parallel='zero' is unknown", "ddp, fsdp"]),
]


ACCEPTED_ON_CUDA = ("backend=xformers", "backend=flex", "backend=cudnn", "device=cuda", "precision=bf16")


@pytest.mark.parametrize("overrides,words", [
    pytest.param(o, w, id=" ".join(o), marks=[pytest.mark.skipif(torch.cuda.is_available(), reason="runs on CUDA")]
                 if o[0] in ACCEPTED_ON_CUDA else []) for o, w in PLAN])
def test_a_configuration_that_cannot_run_is_refused_by_plan(overrides, words):
    assert_words(refusal(overrides), words)


def test_plan_lists_every_problem_at_once():
    message = refusal(["model.n_layers=0", "train.lr=-1", "seed=-3"])
    assert message.splitlines()[1:] == ["  - model.n_layers=0 must be >= 1", "  - train.lr=-1.0 must be > 0",
                                        "  - seed=-3 must be >= 0"]


IO = [
    (["tracking.uri=http://127.0.0.1:9"], ["tracking.uri", "unreachable", "tracking=none"]),
    (["tracking.uri=ftp://example/store"], ["tracking.uri", "unknown scheme 'ftp'", "sqlite:///"]),
    (["tracking.uri=sqlite:////proc/ablate/mlflow.db"], ["tracking.uri", "/proc/ablate", "writable folder"]),
]


@pytest.mark.parametrize("overrides,words", IO, ids=[" ".join(o) for o, _ in IO])
def test_a_store_that_cannot_be_written_is_refused_by_check_io(overrides, words):
    assert_words(refusal(overrides, check_io), words)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    (root / "empty").mkdir()
    bad = root / "bad_header"
    bad.mkdir()
    (bad / "x_train.bin").write_bytes(b"\x00" * 2048)
    big = root / "overflow"
    big.mkdir()
    write_shard(big / "x_train.bin", np.array([1, 2, 900, 3, 5, 4], dtype=np.uint16))
    write_shard(big / "x_val.bin", np.array([1, 2, 3, 5, 4], dtype=np.uint16))
    no_val = root / "empty_val"
    no_val.mkdir()
    ids = np.random.default_rng(0).integers(0, 100, size=2000).astype(np.uint16)
    ids[::50] = 100  # documents of 49 tokens, each ended by eot_id=100
    write_shard(no_val / "x_train.bin", ids)
    write_shard(no_val / "x_val.bin", np.zeros(0, dtype=np.uint16))
    return root


DATA = [
    (["data=text"], ["data.paths"]),
    (["data=text", "data.paths=[/no/such/corpus]"], ["/no/such/corpus", "data.paths"]),
    (["data=text", "data.paths=[{files}/empty]"], ["empty"]),
    (["data=tokens"], ["data.path"]),
    (["data=tokens", "data.path=/no/such/shards"], ["/no/such/shards", "data.path"]),
    (["data=tokens", "data.path={files}/bad_header"], ["x_train.bin", "header"]),
    (["data=tokens", "data.path={files}/overflow", "data.eot_id=5", "data.vocab_size=512"], ["900", "vocab"]),
]


@pytest.mark.parametrize("overrides,words", DATA, ids=[" ".join(o) for o, _ in DATA])
def test_data_that_cannot_be_read_is_refused_naming_the_file_and_key(overrides, words, files):
    assert_words(data_refusal([o.replace("{files}", str(files)) for o in overrides]), words)


def test_an_empty_validation_shard_is_refused_naming_it_and_the_fix(files):
    message = data_refusal(["data=tokens", f"data.path={files}/empty_val", "data.eot_id=100", "data.vocab_size=128"])
    assert "x_val.bin" in message and "data.val_per_mille" in message, message


@pytest.mark.parametrize("multiples", ["[0]", "[1,-2]"])
def test_a_context_multiple_below_one_is_refused_by_plan(multiples):
    assert "eval.context_multiples" in refusal([f"eval.context_multiples={multiples}"])


def test_a_refused_run_leaves_no_run_in_the_store(store, files, tmp_path):
    """Refusals of the config and of its data both come before the store is touched."""
    base = [*TINY, f"tracking.uri={store}", f"paths.output_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="model.n_layers=0"):
        run(compose([*base, "model.n_layers=0"]))
    with pytest.raises(ValueError, match="900"):
        run(compose([*base, "data=tokens", f"data.path={files}/overflow", "data.eot_id=5", "data.vocab_size=512"]))
    assert runs_in(store)[1] == []


# ---- every numeric key of the schema is range-checked


def _dataclasses() -> dict[str, type]:
    """Every schema dataclass, by the config prefix its keys have ('' for the run's own keys)."""
    found = {"": schema.Config}
    for group, options in schema.OPTION_SCHEMAS.items():
        for name, node in options.items():
            found[f"{group}.<{name}>"] = node
    for prefix, node in list(found.items()):
        for f in fields(node):
            hint = typing.get_type_hints(node)[f.name]
            if is_dataclass(hint):
                found[f"{f.name}."] = hint
    return found


def _numeric(hint) -> type | None:  # noqa: ANN001
    """int or float for a (possibly Optional) int/float annotation; booleans are not numbers here."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) is typing.Union else [hint]
    return args[0] if len(args) == 1 and args[0] in (int, float) else None


# keys with a number that no range can describe, and why (none at present)
FREE: dict[str, str] = {}
# lists of numbers: range_problems checks scalars only
NUMBER_LISTS = {
    "device_pool": "GPU indices; each is checked against the visible GPUs when a job takes one",
    "eval.context_multiples": "not range-checked: see test_a_context_multiple_below_one_is_refused_by_plan",
}


def _schema_fields() -> list[tuple[type, str, type]]:
    """(dataclass, dotted key, int or float) of every numeric field of every schema dataclass."""
    out = []
    for prefix, node in _dataclasses().items():
        key_prefix = prefix.split("<")[0] if "<" in prefix else prefix
        for f in fields(node):
            kind = _numeric(typing.get_type_hints(node)[f.name])
            if kind is not None:
                out.append((node, f"{key_prefix}{f.name}", kind))
    return out


def test_every_numeric_key_declares_a_range():
    missing = [key for node, key, _ in _schema_fields()
               if "range" not in next(f for f in fields(node) if f.name == key.rsplit(".", 1)[-1]).metadata
               and key not in FREE]
    assert not missing, f"numeric keys without num(...) (declare a range, or list them in FREE with the reason): {missing}"
    lists = sorted({f"{prefix.split('<')[0]}{f.name}" for prefix, node in _dataclasses().items() for f in fields(node)
                    if typing.get_origin(typing.get_type_hints(node)[f.name]) is list
                    and typing.get_args(typing.get_type_hints(node)[f.name])[0] in (int, float)})
    assert lists == sorted(NUMBER_LISTS), "a new list of numbers: check its values and list it in NUMBER_LISTS"


def _option_for(node: type) -> list[str]:
    """Overrides that select the group option whose schema is `node` (none for the run's own blocks)."""
    for group, options in schema.OPTION_SCHEMAS.items():
        for name, cls in options.items():
            if cls is node and name != "schema":
                for path in sorted((schema.config_dir() / group).glob("*.yaml")):
                    if OmegaConf.load(path).defaults[0] == name:
                        extra = ["data.path=/shards"] if any(f.name == "path" for f in fields(node)) else []
                        return [f"{group}={path.stem}", *extra]
    return []


def _outside(kind: type, bounds: tuple) -> dict[str, tuple]:
    """A value just below the range and one just above it (where it has those ends), with the words
    the refusal must hold."""
    gt, ge, lt, le = bounds
    step = 1 if kind is int else 0.5
    out = {}
    if gt is not None:
        out["low"] = (kind(gt), f"> {gt}")
    elif ge is not None:
        out["low"] = (kind(ge - step), f">= {ge}")
    if lt is not None:
        out["high"] = (kind(lt), f"< {lt}")
    elif le is not None:
        out["high"] = (kind(le + step), f"<= {le}")
    return out


def _range_cases():
    by_option: dict[tuple[str, tuple[str, ...]], list[tuple[str, object, str]]] = {}
    for node, key, kind in _schema_fields():
        meta = next(f for f in fields(node) if f.name == key.rsplit(".", 1)[-1]).metadata
        if "range" not in meta:
            continue
        for side, (value, words) in _outside(kind, meta["range"]).items():
            by_option.setdefault((side, tuple(_option_for(node))), []).append((key, value, words))
    return [pytest.param(option, keys, id=f"{side}:{' '.join(option) or 'defaults'}")
            for (side, option), keys in sorted(by_option.items())]


@pytest.mark.parametrize("option,keys", _range_cases())
def test_a_value_just_outside_its_range_is_refused_naming_the_key_and_the_range(option, keys):
    """All keys of one option at once: plan() lists every problem, one line each."""
    message = refusal([*option, *(f"{key}={value}" for key, value, _ in keys)])
    lines = message.splitlines()[1:]
    for key, value, words in keys:
        mine = [line for line in lines if line.startswith(f"  - {key}=")]
        assert len(mine) == 1 and words in mine[0] and "must be" in mine[0], (key, value, message)
        assert math.isclose(float(mine[0].split("=", 1)[1].split()[0]), value), mine[0]
    assert len(lines) == len(keys), message


# ---- determinism


def test_same_seed_gives_bit_identical_loss_curves(store):
    cfg = tiny_cfg("pos=alibi", "attention=gqa", "attention.n_kv_heads=2", f"tracking.uri={store}")
    run(cfg)
    run(cfg)
    client, runs = runs_in(store)
    first, second = (history(client, r.info.run_id, "train/loss") for r in runs)
    assert len(first) == cfg.train.steps and first == second
    third = tiny_cfg("pos=alibi", "attention=gqa", "attention.n_kv_heads=2", "seed=1", "tracking=none")
    assert run(third) != runs[0].data.metrics["val/loss"]  # the seed does change the run


@pytest.mark.parametrize("backend,head_dim,words", [("cudnn", 12, "multiple of 8"), ("cudnn", 192, "<= 128"),
                                                    ("xformers", 20, "multiple of 8")])
def test_head_dim_a_backend_cannot_serve_is_refused_with_the_reason(backend, head_dim, words):
    """On a GPU machine this is the message run() gives (before compute) for such a model.d_model/n_heads."""
    import torch

    from ablate.kernels import Cell, get_backend

    cell = Cell("cuda", packed=True, head_dim=head_dim, dtype=torch.bfloat16)
    reason = get_backend(backend).refuse(cell)
    assert reason is not None and words in reason
