"""Hostile and careless commands through `python run.py`, end to end: is each one refused cleanly?

    python benchmarks/refusals.py [--jobs 2] [--only SUBSTRING]

Every probe is a real command on CPU (`train=smoke`, a tiny model) against a fresh sqlite store that
already holds one finished run. A probe passes when the command exits with status 2, prints no Python
traceback, names the offending key or file in its message, and leaves the store as it found it (no new
run, the finished run untouched). The table prints each probe's outcome and time; the last line is the
count. Exit status 1 when any probe fails.
"""
from __future__ import annotations

import argparse
import os
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ablate.data import write_shard

ROOT = Path(__file__).resolve().parents[1]
TINY = ["train=smoke", "model.n_layers=1", "model.d_model=64", "device=cpu"]


@dataclass
class Probe:
    name: str
    overrides: list[str]
    words: list[str]  # each must appear in the refusal
    permissions: bool = False  # about file permissions, which root does not obey


def probes(tmp: Path) -> list[Probe]:
    """The cases, with the files they point at made in `tmp`."""
    (tmp / "latin1.txt").write_bytes("Où est le café? Très bien, garçon.\n".encode("latin-1") * 50)
    (tmp / "binary.txt").write_bytes(bytes(range(256)) * 40)
    (tmp / "a_folder").mkdir()
    (tmp / "readonly.db").write_bytes((tmp / "mlflow.db").read_bytes())
    (tmp / "readonly.db").chmod(stat.S_IRUSR)
    (tmp / "locked").mkdir()
    (tmp / "locked").chmod(stat.S_IRUSR | stat.S_IXUSR)
    (tmp / "shards").mkdir()
    write_shard(tmp / "shards" / "train_000.bin", np.arange(5000) % 50256)
    write_shard(tmp / "shards" / "val_000.bin", np.zeros(0, dtype=np.int64))  # a validation shard with no tokens
    text = ["data=text", f"data.paths=[{tmp}/latin1.txt]"]
    return [
        Probe("optimizer beta above 1", ["train.beta1=1.5"], ["train.beta1", "< 1"]),
        Probe("NaN learning rate", ["train.lr=nan"], ["train.lr", "finite"]),
        Probe("negative init std", ["model.init_std=-1"], ["model.init_std", "> 0"]),
        Probe("context of one token", ["model.context=1"], ["model.context", ">= 2"]),
        Probe("RoPE theta 0", ["pos=rope", "pos.rope_theta=0"], ["pos.rope_theta", "> 0"]),
        Probe("RoPE theta < 0", ["pos=rope", "pos.rope_theta=-1"], ["pos.rope_theta", "> 0"]),
        Probe("negative norm eps", ["norm.eps=-1"], ["norm.eps", "> 0"]),
        Probe("negative seed", ["seed=-1"], ["seed", ">= 0"]),
        Probe("MLP of width 0", ["mlp.expansion=0"], ["mlp.expansion", "> 0"]),
        Probe("zero batch", ["train.batch_size=0"], ["train.batch_size"]),
        Probe("no steps", ["train.steps=0"], ["train.steps"]),
        Probe("validation share 1000 per mille", ["data.val_per_mille=1000"], ["data.val_per_mille"]),
        Probe("context multiple 0", ["eval.context_multiples=[0]"], ["eval.context_multiples"]),
        Probe("K/V heads set on MHA", ["attention=mha", "attention.n_kv_heads=2"],
              ["attention.n_kv_heads", "attention=gqa"]),
        Probe("K/V heads set on MQA", ["attention=mqa", "attention.n_kv_heads=4"],
              ["attention.n_kv_heads", "attention=gqa"]),
        Probe("K/V heads not dividing heads", ["attention=gqa", "attention.n_kv_heads=3"], ["n_kv_heads"]),
        Probe("width not divisible by heads", ["model.d_model=66"], ["model.d_model", "n_heads"]),
        Probe("RoPE on an odd head dim", ["pos=rope", "model.d_model=36", "model.n_heads=4"], ["pos=rope", "even"]),
        Probe("learned positions shorter than context", ["pos=learned", "pos.max_positions=8"],
              ["pos.max_positions", "model.context"]),
        Probe("cuDNN on a CPU", ["backend=cudnn"], ["backend=cudnn", "CUDA"]),
        Probe("xformers on a CPU", ["backend=xformers"], ["backend=xformers"]),
        Probe("CUDA device on a machine without one", ["device=cuda"], ["device=cuda"]),
        Probe("mistyped group", ["atention=gqa"], ["atention", "attention"]),
        Probe("mistyped key", ["model.n_head=4"], ["model.n_head", "model.n_heads"]),
        Probe("unknown option", ["attention=gqb"], ["attention", "gqa"]),
        Probe("tracking store is a folder", [f"tracking.uri=sqlite:///{tmp}/a_folder"], ["a_folder", "folder"]),
        Probe("file: store URI", [f"tracking.uri=file://{tmp}/mlruns"], ["tracking.uri", "sqlite:///"]),
        Probe("plain folder store", [f"tracking.uri={tmp}/mlruns"], ["tracking.uri", "sqlite:///"]),
        Probe("read-only store file", [f"tracking.uri=sqlite:///{tmp}/readonly.db"], ["readonly.db", "read-only"],
              permissions=True),
        Probe("store in an unwritable folder", [f"tracking.uri=sqlite:///{tmp}/locked/mlflow.db"],
              ["locked", "writable"], permissions=True),
        Probe("unwritable output folder", [f"paths.output_dir={tmp}/locked/out"], ["locked", "writable"],
              permissions=True),
        Probe("missing text file", ["data=text", f"data.paths=[{tmp}/missing.txt]"], ["missing.txt"]),
        Probe("Latin-1 text", text, ["latin1.txt", "utf-8", "data.encoding"]),
        Probe("binary file", ["data=text", f"data.paths=[{tmp}/binary.txt]"], ["binary.txt", "utf-8"]),
        Probe("empty validation shard", ["data=tokens", f"data.path={tmp}/shards"],
              ["val_000.bin", "data.val_per_mille"]),
        Probe("unknown text encoding", [*text, "data.encoding=klingon"], ["data.encoding", "klingon"]),
        Probe("unknown decoding error handler", [*text, "data.errors=shout"], ["data.errors", "shout"]),
        Probe("text corpus without files", ["data=text"], ["data.paths"]),
        Probe("missing shard folder", ["data=tokens", f"data.path={tmp}/no_shards"], ["no_shards", "data.path"]),
        Probe("sqlite URI with two slashes", ["tracking.uri=sqlite://mlflow.db"], ["tracking.uri", "three slashes"]),
        Probe("unknown store scheme", ["tracking.uri=ftp://host/mlflow"], ["tracking.uri", "ftp"]),
        Probe("unreachable tracking server", ["tracking.uri=http://127.0.0.1:9"], ["tracking.uri", "127.0.0.1:9"]),
        Probe("FLOP budget below one step", ["train.flops=1"], ["train.flops"]),
        Probe("negative attention window", ["attention.window=-1"], ["attention.window"]),
        Probe("learned positions, none", ["pos=learned", "pos.max_positions=0"], ["pos.max_positions"]),
        Probe("evaluation every 0 steps", ["train.eval_every=0"], ["train.eval_every"]),
        Probe("dropout of 1", ["model.dropout=1"], ["model.dropout"]),
        Probe("unknown precision", ["precision=fp8"], ["precision"]),
        Probe("malformed override", ["train.lr=="], ["train.lr"]),
    ]


def runs_in(db: Path) -> list[tuple]:
    with closing(sqlite3.connect(db)) as con:
        return sorted(con.execute("SELECT run_uuid, status, end_time FROM runs").fetchall())


def attempt(probe: Probe, tmp: Path) -> tuple[str, float, str]:
    """(outcome, seconds, first line of the message or the problem)."""
    folder = Path(tempfile.mkdtemp(dir=tmp, prefix="probe-"))
    db = folder / "mlflow.db"
    db.write_bytes((tmp / "mlflow.db").read_bytes())
    before = runs_in(db)
    overrides = [f"tracking.uri=sqlite:///{db}", f"paths.output_dir={folder}/out", *TINY, *probe.overrides]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "run.py", *overrides], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    seconds = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip().startswith("-")] or \
        [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    message = lines[0][:110] if lines else ""
    problems = []
    if proc.returncode != 2:
        problems.append(f"exit {proc.returncode}")
    if "Traceback" in out:
        problems.append("traceback")
    missing = [w for w in probe.words if w not in out]
    if missing:
        problems.append(f"message lacks {missing}")
    if runs_in(db) != before:
        problems.append("the store changed")
    return ("refused cleanly" if not problems else "; ".join(problems)), seconds, message


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", default="")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ablate-refusals-") as name:
        tmp = Path(name)
        seed = subprocess.run([sys.executable, "run.py", *TINY, "train.steps=2",
                               f"tracking.uri=sqlite:///{tmp}/mlflow.db",
                               f"paths.output_dir={tmp}/seed-run"], cwd=ROOT, capture_output=True, text=True)
        if seed.returncode != 0:
            print(seed.stderr[-2000:])
            return 1
        cases = [p for p in probes(tmp) if args.only in p.name]
        if os.geteuid() == 0:  # root writes anywhere: tests/test_store.py checks these as an ordinary user
            skipped = [p.name for p in cases if p.permissions]
            cases = [p for p in cases if not p.permissions]
            print(f"as root, not tried (root ignores file permissions): {', '.join(skipped)}")
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda p: attempt(p, tmp), cases))
        for path in tmp.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
    width = max(len(p.name) for p in cases)
    print(f"{'probe':<{width}}  {'seconds':>7}  outcome / message")
    for probe, (outcome, seconds, message) in zip(cases, results):
        detail = f"\n{'':<{width}}           {message}" if message else ""
        print(f"{probe.name:<{width}}  {seconds:7.1f}  {outcome}{detail}")
    clean = sum(outcome == "refused cleanly" for outcome, _, _ in results)
    print(f"\n{clean}/{len(cases)} refused cleanly (exit 2, no traceback, the key or file named, the store unchanged)")
    return 0 if clean == len(cases) else 1


if __name__ == "__main__":
    sys.exit(main())
