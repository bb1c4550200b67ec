"""Bad input is refused before any compute and leaves no run behind; runs are deterministic."""
import numpy as np
import pytest
from hydra.errors import ConfigCompositionException
from mlflow.tracking import MlflowClient

from ablate.config import compose
from ablate.data import write_shard
from ablate.experiment import run


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
    return root


# (overrides, words the message must contain: the key, and part of the fix or reason)
BAD = [
    (["model.n_layers=0"], ["model.n_layers", "> 0"]),
    (["model.n_heads=0"], ["model.n_heads", "> 0"]),
    (["model.d_model=-8"], ["model.d_model", "> 0"]),
    (["model.context=0"], ["model.context", "> 0"]),
    (["train.steps=0"], ["train.steps", "> 0"]),
    (["train.batch_size=0"], ["train.batch_size", "> 0"]),
    (["train.lr=0"], ["train.lr", "> 0"]),
    (["train.lr=-1e-3"], ["train.lr", "> 0"]),
    (["train.warmup_steps=-1"], ["train.warmup_steps", ">= 0"]),
    (["train.log_every=0"], ["train.log_every", "> 0"]),
    (["train.eval_every=0"], ["train.eval_every", "> 0"]),
    (["train.checkpoint_every=-5"], ["train.checkpoint_every", ">= 0"]),
    (["train.grad_clip=-1"], ["train.grad_clip", ">= 0"]),
    (["train.min_lr_ratio=2"], ["train.min_lr_ratio", "[0, 1]"]),
    (["data.val_per_mille=0"], ["data.val_per_mille", "1..999"]),
    (["data.max_val_batches=0"], ["data.max_val_batches", "> 0"]),
    (["attention.window=0"], ["attention.window", ">= 1"]),
    (["model.n_heads=3"], ["model.d_model", "model.n_heads"]),
    (["attention=gqa", "attention.n_kv_heads=3"], ["attention.n_kv_heads", "divide"]),
    (["attention=gqa", "attention.n_kv_heads=0"], ["attention.n_kv_heads", "try attention.n_kv_heads"]),
    (["pos=learned", "pos.max_positions=64"], ["pos.max_positions", "model.context"]),
    (["pos=rope", "model.d_model=12", "model.n_heads=4"], ["rope", "even head dim"]),
    (["backend=xformers"], ["backend=xformers", "CUDA", "sdpa"]),
    (["backend=flex"], ["backend=flex", "backward", "sdpa"]),
    (["backend=cudnn"], ["backend=cudnn", "sdpa"]),
    (["device=cuda"], ["device=cuda", "device=cpu"]),
    (["device=tpu"], ["device='tpu'", "auto, cpu or cuda"]),
    (["precision=bf16"], ["precision=bf16", "fp32"]),
    (["precision=fp8"], ["precision='fp8'", "bf16"]),
    (["tracking.uri=http://127.0.0.1:9"], ["tracking.uri", "unreachable", "tracking=none"]),
    (["tracking.uri=ftp://example/store"], ["tracking.uri", "unknown scheme"]),
    (["tracking.uri=sqlite:////proc/ablate/mlflow.db"], ["tracking.uri"]),
    (["data=text"], ["data.paths"]),
    (["data=text", "data.paths=[/no/such/corpus]"], ["/no/such/corpus", "data.paths"]),
    (["data=text", "data.paths=[{files}/empty]"], ["empty"]),
    (["data=tokens"], ["data.path"]),
    (["data=tokens", "data.path=/no/such/shards"], ["/no/such/shards"]),
    (["data=tokens", "data.path={files}/bad_header"], ["x_train.bin", "header"]),
    (["data=tokens", "data.path={files}/overflow", "data.eot_id=5", "data.vocab_size=512"], ["900", "vocab"]),
]
COMPOSE_TIME = [
    (["attention=linear"], ["attention", "linear"]),
    (["model.n_layres=2"], ["n_layres"]),
    (["train.steps=ten"], ["steps", "ten"]),
    (["model=gpt5"], ["model", "gpt5"]),
]


def _message(err: BaseException) -> str:
    parts = []
    while err is not None:
        parts.append(str(err))
        err = err.__cause__ or err.__context__
    return "\n".join(parts)


@pytest.mark.parametrize("overrides,words", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_input_is_refused_before_any_run_starts(overrides, words, files, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = [o.replace("{files}", str(files)) for o in overrides]
    cfg = compose([f"tracking.uri={uri}", f"paths.output_dir={tmp_path}", *overrides])
    with pytest.raises((ValueError, FileNotFoundError, OSError)) as err:
        run(cfg)
    message = _message(err.value)
    for word in words:
        assert word in message, message
    if "tracking.uri" not in " ".join(overrides):
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("ablate")
        assert exp is None or not client.search_runs([exp.experiment_id]), "a run was left behind"


@pytest.mark.parametrize("overrides,words", COMPOSE_TIME, ids=[" ".join(o) for o, _ in COMPOSE_TIME])
def test_malformed_config_is_refused_when_composed(overrides, words):
    with pytest.raises(ConfigCompositionException) as err:
        compose(overrides)
    message = _message(err.value)
    for word in words:
        assert word in message, message


def test_refusals_are_many():
    assert len(BAD) + len(COMPOSE_TIME) >= 30


def test_same_seed_gives_bit_identical_loss_curves(tmp_path):
    def curve(name):
        uri = f"sqlite:///{tmp_path}/{name}.db"
        cfg = compose(["train=smoke", "model.n_layers=1", "model.d_model=64", f"tracking.uri={uri}",
                       "pos=alibi", "attention=gqa"])
        run(cfg)
        client = MlflowClient(uri)
        (r,) = client.search_runs([client.get_experiment_by_name("ablate").experiment_id])
        return [(m.step, m.value) for m in sorted(client.get_metric_history(r.info.run_id, "train/loss"),
                                                  key=lambda m: m.step)]

    first, second = curve("a"), curve("b")
    assert len(first) == 12
    assert first == second


@pytest.mark.parametrize("backend,head_dim,words", [("cudnn", 12, "multiple of 8"), ("cudnn", 192, "<= 128"),
                                                    ("xformers", 20, "multiple of 8")])
def test_head_dim_a_backend_cannot_serve_is_refused_with_the_reason(backend, head_dim, words):
    """On a GPU machine this is the message run() gives (before compute) for such a model.d_model/n_heads."""
    import torch

    from ablate.kernels import Cell, get_backend

    cell = Cell("cuda", packed=True, head_dim=head_dim, dtype=torch.bfloat16)
    reason = get_backend(backend).refuse(cell)
    assert reason is not None and words in reason
