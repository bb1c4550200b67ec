"""`python run.py`: refusals print the reason and exit with status 2, no traceback; real errors keep theirs.

Most refusals run `run.py` inside the test process (its `__main__`, as `python run.py` would, with
sys.argv set); a few run it as a real process: the exit status and the output of the interpreter itself.
"""
import re
import subprocess
import sys

import pytest
from conftest import TINY, runs_in

from ablate.cli import check_overrides
from ablate.config import project_root

ROOT = project_root()
QUIET = ("tracking=none",)


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
    (["experiment=attention_grid"], ["+experiment=attention_grid"]),
    (["attention=[gqa"], ["attention=[gqa", "override_grammar"]),
    (["attention=mha", "attention.n_kv_heads=2"], ["attention.n_kv_heads is not a setting of attention=mha"]),
    (["train.steps=ten"], ["train.steps", "ten", "Integer"]),
    (["model.n_heads=3"], ["model.d_model=32 is not a multiple of model.n_heads=3"]),
]


@pytest.mark.parametrize("args,words", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_a_refused_configuration_prints_only_the_reason(args, words, run_main):
    code, out = run_main(*TINY, *QUIET, *args)
    assert code == 2, out
    for word in words:
        assert word in out, out
    assert "Traceback" not in out and "HYDRA_FULL_ERROR" not in out, out


# (what the file holds: None for no file, the message's words); the data is read after plan() and check_io()
UNUSABLE_DATA = [
    (None, ["data.txt' (from data.paths) does not exist"]),
    ("Où est le café?\n".encode("latin-1") * 20, ["data.txt' is not valid utf-8: byte 1", "data.encoding=latin-1"]),
    (bytes(range(256)) * 8, ["data.txt' is not valid utf-8: byte 128", "data.paths (narrow data.glob)"]),
]


@pytest.mark.parametrize("content,words", UNUSABLE_DATA, ids=["missing", "latin-1", "binary"])
def test_data_that_cannot_be_used_is_refused_with_only_the_reason(content, words, run_main, tmp_path, store):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    code, out = run_main(*TINY, "data=text", f"data.paths=[{path}]", f"tracking.uri={store}",
                         f"paths.output_dir={tmp_path}/out")
    assert code == 2, out
    assert "the data cannot be used:" in out and "Traceback" not in out, out
    for word in words:
        assert word in out, out
    assert runs_in(store)[1] == [], "a refused run leaves no run in the store"


def test_a_checkpoint_that_cannot_be_resumed_is_refused_with_only_the_reason(run_main, tmp_path, store):
    """A resume that must not happen (here a last.pt without the format marker) is a refusal: the
    reason and the file, exit status 2, no traceback, no run opened in the store."""
    import torch
    from conftest import tiny_cfg

    from ablate.train import checkpoint

    args = [f"tracking.uri={store}", f"paths.output_dir={tmp_path}/out", "train.checkpoint_every=2"]
    folder = checkpoint.checkpoint_dir(tiny_cfg(*args))
    folder.mkdir(parents=True)
    torch.save({"step": 3}, folder / "last.pt")
    code, out = run_main(*TINY, *args)
    assert code == 2, out
    assert str(folder / "last.pt") in out and "not an ablate checkpoint" in out and "Traceback" not in out, out
    assert runs_in(store)[1] == [], "a refused run leaves no run in the store"


def test_a_refused_process_exits_2_without_a_traceback(tmp_path):
    code, out = run_py("-m", "attention=gqa,linear", f"hydra.sweep.dir={tmp_path}/sweep")
    assert code == 2, out
    assert "unknown option 'linear' for config group 'attention'" in out
    assert "Traceback" not in out and "HYDRA_FULL_ERROR" not in out, out


def test_a_real_error_keeps_its_traceback(run_main):
    from ablate.train.loop import NonFiniteLoss

    with pytest.raises(NonFiniteLoss):  # raised out of run.py: the interpreter prints it, exit status 1
        run_main(*TINY, *QUIET, "train.lr=1e30")


def test_a_sweep_prints_each_refused_job_and_exits_2(run_main, tmp_path):
    code, out = run_main("-m", *TINY, *QUIET, "model.n_heads=3,5", f"hydra.sweep.dir={tmp_path}/sweep")
    assert code == 2, out
    assert re.search(r"job 0 \([^)]*model\.n_heads=3[^)]*\) refused: .*\n.*not a multiple of model\.n_heads=3", out), out
    assert re.search(r"job 1 \([^)]*model\.n_heads=5[^)]*\) refused: .*\n.*not a multiple of model\.n_heads=5", out), out
    assert "Traceback" not in out, out


def test_a_sweep_whose_store_is_refused_starts_no_job(tmp_path):
    (tmp_path / "notes.db").write_text("not a store\n")
    code, out = run_py("-m", *TINY, "attention=mha,gqa", f"tracking.uri=sqlite:///{tmp_path}/notes.db",
                       f"hydra.sweep.dir={tmp_path}/sweep")
    assert code == 2, out
    assert "not a SQLite database" in out and "Traceback" not in out, out
    assert "#0 :" not in out and not (tmp_path / "sweep" / "parent_run_id").exists()


@pytest.fixture(scope="module")
def help_text():
    code, out = run_py("--help")
    assert code == 0, out
    return out


def test_help_lists_the_groups_their_options_examples_and_keys(help_text):
    from ablate.cli import groups

    for group, options in groups().items():
        assert f"{group}: {', '.join(options)}" in help_text
    assert "attention: gqa, mha, mqa" in help_text and "pos: alibi, learned, nope, rope, sinusoidal" in help_text
    examples = [line for line in help_text.splitlines() if line.strip().startswith("python run.py ")]
    assert len(examples) == 3, examples
    assert "rope_theta" in help_text and "checkpoint_every" in help_text  # the keys


def test_help_lists_the_keys_of_every_option(help_text):
    for key in ("attention.n_kv_heads", "pos.max_positions", "data.paths", "data.eot_id", "train.lr"):
        assert key in help_text, key


def _commands(text: str) -> list[list[str]]:
    """The `python run.py ...` commands of a text, as argument lists (comments and flags dropped)."""
    found = []
    for line in text.splitlines():
        match = re.search(r"python run\.py ([^#`]*)", line)
        if match:
            found.append([a for a in match.group(1).split() if not a.startswith("-") and a != "\\"])
    return found


@pytest.mark.parametrize("source", ["help", "README.md"])
def test_every_documented_command_is_accepted(source, help_text):
    text = help_text if source == "help" else (ROOT / "README.md").read_text()
    # placeholders (<ip>) and the usage line's [group=option ...] are not commands
    commands = [c for c in _commands(text) if not any("<" in a or a.startswith("[") for a in c)]
    assert len(commands) >= 3
    for args in commands:
        assert check_overrides(args) == [], args


def test_valid_overrides_pass_the_check():
    assert check_overrides([
        "attention=gqa,mha", "pos=alibi", "+experiment=attention_grid", "hydra/launcher=gpus",
        "hydra.sweep.dir=x", "model.n_heads=4", "data=text", "data.paths=[a,b]", "data.paths.0=a",
        "device_pool=[0,1]", "seed=range(3)", "~tracking", "attention=glob(*)", "cluster.setup=[a]",
        "train.lr=1e-3,3e-3", "tracking.uri=sqlite:///x.db",
    ]) == []
    assert check_overrides(["attention=gqa", "attention.n_kv_heads=2"]) == []


def test_an_option_accepts_the_keys_it_inherits():
    assert check_overrides(["train=smoke", "train.lr=1e-3", "train.checkpoint_every=5"]) == []


def test_check_names_every_unknown_override():
    problems = check_overrides(["atention=gqa", "model=tiny,gpt5", "model.n_layres=2", "zzzz=1"])
    assert len(problems) == 4, problems
    assert "did you mean 'attention'?" in problems[0]
    assert "unknown option 'gpt5'" in problems[1]
    assert "did you mean model.n_layers?" in problems[2]
    assert "unknown key zzzz" in problems[3] and "--help" in problems[3]
