from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from ablate.report import format_table, group, sweep_runs
from ablate.report.__main__ import main


def make_sweep(uri):
    client = MlflowClient(uri)
    exp = client.create_experiment("grid")
    parent = client.create_run(exp, tags={"ablate.sweep": "attention=mha,gqa seed=0,1,2"}).info.run_id
    losses = {("mha", 0): 2.0, ("mha", 1): 2.2, ("mha", 2): 2.1, ("gqa", 0): 1.9, ("gqa", 1): 1.95, ("gqa", 2): 1.85}
    for (attention, seed), loss in losses.items():
        run = client.create_run(exp, tags={"mlflow.parentRunId": parent}).info.run_id
        client.log_batch(run, metrics=[Metric("val/loss", loss, 0, 10)],
                         params=[Param("attention.name", attention), Param("seed", str(seed)),
                                 Param("pos.name", "rope")], tags=[RunTag("x", "y")])
        client.set_terminated(run, "FINISHED")
    client.set_terminated(parent, "FINISHED")
    return client


def test_report_folds_seeds_and_sorts_by_metric(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/m.db"
    client = make_sweep(uri)
    runs = sweep_runs(client, "grid", "latest")
    columns, rows = group(runs, ("val/loss",))
    assert columns == ["attention.name"]  # seed folded, constant pos.name dropped
    by = {row.key[0][1]: row for row in rows}
    assert abs(by["gqa"].mean("val/loss") - 1.9) < 1e-9 and len(by["mha"].values["val/loss"]) == 3
    assert by["mha"].ci95("val/loss") > 0
    table = format_table(columns, rows, metrics=("val/loss",))
    assert table.splitlines()[2].startswith("gqa")  # best first
    assert main(["--tracking-uri", uri, "--experiment", "grid"]) == 0
    out = capsys.readouterr().out
    assert "attention" in out and "±" in out
