"""`python run.py`: refusals print the reason and exit with status 2, no traceback; real errors keep theirs."""
import subprocess
import sys

import pytest

from ablate.cli import check_overrides
from ablate.config import project_root

ROOT = project_root()
TINY = ["tracking=none", "train=smoke", "model.n_layers=1", "model.d_model=32", "data.max_val_batches=1",
        "train.progress=false"]


def run_py(*args, timeout=120):
    proc = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


# (arguments, what the message must say)
REFUSED = [
    (["atention=gqa"], ["unknown config group 'atention'; did you mean 'attention'?", "gqa, mha, mqa"]),
    (["+atention=gqa"], ["unknown config group 'atention'; did you mean 'attention'?"]),
    (["model.n_head=4"], ["unknown key model.n_head; did you mean model.n_heads?"]),
    (["n_layers=1"], ["unknown key n_layers; did you mean model.n_layers?"]),
    (["model=gpt5"], ["unknown option 'gpt5' for config group 'model'", "gpt2_124m, small, tiny"]),
    (["-m", "attention=gqa,linear"], ["unknown option 'linear' for config group 'attention'"]),
    (["experiment=attention_x_pos"], ["+experiment=attention_x_pos"]),
    (["train.steps=ten"], ["train.steps", "ten", "Integer"]),
    (["attention=[gqa"], ["attention=[gqa", "override_grammar"]),
    (["model.n_heads=3"], ["model.d_model=32 is not a multiple of model.n_heads=3"]),
    (["tracking=mlflow", "tracking.uri=sqlite:///{tmp}"], ["tracking.uri", "is a folder", "{tmp}/mlflow.db"]),
]


@pytest.mark.parametrize("args,words", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_a_refused_configuration_prints_only_the_reason(args, words, tmp_path):
    flags = [a for a in args if a.startswith("-")]  # Hydra's flags come before the overrides
    overrides = [a.format(tmp=tmp_path) for a in args if not a.startswith("-")]
    code, out = run_py(*flags, *TINY, *overrides, f"hydra.sweep.dir={tmp_path}/sweep",
                       f"hydra.run.dir={tmp_path}/run")
    assert code == 2, out
    for word in words:
        assert word.format(tmp=tmp_path) in out, out
    assert "Traceback" not in out and "HYDRA_FULL_ERROR" not in out, out


def test_a_sweep_prints_each_refused_job_and_exits_2(tmp_path):
    code, out = run_py("-m", "model.n_heads=3,5", *TINY, f"hydra.sweep.dir={tmp_path}/sweep")
    assert code == 2, out
    assert "job 0 (model.n_heads=3" in out and "model.n_heads=3" in out
    assert "job 1 (model.n_heads=5" in out and "model.n_heads=5" in out
    assert "Traceback" not in out, out


def test_a_sweep_whose_store_is_refused_starts_no_job(tmp_path):
    (tmp_path / "notes.db").write_text("not a store\n")
    code, out = run_py("-m", "attention=mha,gqa", *TINY, "tracking=mlflow",
                       f"tracking.uri=sqlite:///{tmp_path}/notes.db", f"hydra.sweep.dir={tmp_path}/sweep")
    assert code == 2, out
    assert "not a SQLite database" in out and "Traceback" not in out, out
    assert "#0 :" not in out and not (tmp_path / "sweep" / "parent_run_id").exists()


def test_help_lists_the_groups_their_options_and_examples():
    code, out = run_py("--help")
    assert code == 0, out
    assert "attention: gqa, mha, mqa" in out and "pos: alibi, learned, nope, rope, sinusoidal" in out
    assert "experiment: attention_x_pos" in out
    examples = [line for line in out.splitlines() if line.strip().startswith("python run.py ")]
    assert len(examples) == 3, examples
    assert "n_kv_heads" in out  # the keys


@pytest.mark.slow
def test_a_real_error_keeps_its_traceback(tmp_path):
    code, out = run_py("train.lr=1e30", *TINY, f"hydra.run.dir={tmp_path}/run")
    assert code == 1, out
    assert "Traceback" in out and "NonFiniteLoss" in out, out


@pytest.mark.slow
def test_a_sweep_prints_a_failing_jobs_traceback_and_runs_the_others(tmp_path):
    code, out = run_py("-m", "train.lr=1e30,3e-3", *TINY, f"hydra.sweep.dir={tmp_path}/sweep")
    assert code == 1, out
    assert "job 0 (train.lr=1e+30" in out and "Traceback" in out and "NonFiniteLoss" in out, out
    assert "ablate run (not tracked)" in out  # the second job ran


def test_valid_overrides_pass_the_check():
    assert check_overrides([
        "attention=gqa,mha", "pos=alibi", "+experiment=attention_x_pos", "hydra/launcher=gpus",
        "hydra.sweep.dir=x", "model.n_heads=4", "data.paths=[a,b]", "data.paths.0=a", "device_pool=[0,1]",
        "seed=range(3)", "~tracking", "attention=glob(*)", "cluster.setup=[a]", "train.lr=1e-3,3e-3",
        "attention.n_kv_heads=2", "tracking.uri=sqlite:///x.db",
    ]) == []


def test_check_names_every_unknown_override():
    problems = check_overrides(["atention=gqa", "model=tiny,gpt5", "model.n_layres=2", "zzzz=1"])
    assert len(problems) == 4, problems
    assert "did you mean 'attention'?" in problems[0]
    assert "unknown option 'gpt5'" in problems[1]
    assert "did you mean model.n_layers?" in problems[2]
    assert "unknown key zzzz" in problems[3] and "--help" in problems[3]
