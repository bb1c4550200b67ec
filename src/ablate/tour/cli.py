"""`python -m ablate.tour`: the seed tour, run on this machine, into one MLflow run."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch

from ablate.tour import memory, sections, training
from ablate.tour.report import Tour

SECTIONS: list[tuple[str, Callable[[Tour], None]]] = [
    ("correctness", sections.correctness),
    ("scaling", memory.scaling),
    ("causal", sections.causal),
    ("packed", sections.packed),
    ("gqa", sections.gqa),
    ("alibi", sections.alibi),
    ("training", training.training),
]


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ablate.tour", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes and short training")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store (default: the project's, as for run.py)")
    parser.add_argument("--max-len", type=int, default=None,
                        help="longest sequence length of the scaling section")
    parser.add_argument("--mem-cap-gib", type=float, default=None,
                        help="cap CUDA memory during the scaling section (moves vanilla's OOM point)")
    parser.add_argument("--only", default=None,
                        help="comma-separated sections to run (names or numbers 1-7); default all")
    parser.add_argument("--tolerance-scale", type=float, default=1.0,
                        help="multiply every numeric tolerance (0 makes any nonzero error fail)")
    return parser.parse_args(argv)


def chosen(only: str | None) -> list[int]:
    """Indices into SECTIONS, in tour order."""
    if not only:
        return list(range(len(SECTIONS)))
    names = [name for name, _ in SECTIONS]
    picked = set()
    for item in (part.strip() for part in only.split(",") if part.strip()):
        if item.isdigit() and 1 <= int(item) <= len(SECTIONS):
            picked.add(int(item) - 1)
        elif item in names:
            picked.add(names.index(item))
        else:
            raise SystemExit(f"--only: unknown section '{item}'; choose from {', '.join(names)} or 1-7")
    return sorted(picked)


def open_run(uri: str | None, device: torch.device, quick: bool):  # noqa: ANN201 - an MlflowTracker
    from ablate.config import compose, project_root
    from ablate.tracking.mlflow import MlflowTracker, git_commit, resolve_uri

    uri = uri or resolve_uri(compose())
    tags = {"tour.device": device.type, "tour.quick": str(quick)}
    commit = git_commit(str(project_root()))
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return MlflowTracker(uri, "tour", f"tour-{device.type}{'-quick' if quick else ''}", tags)


def describe_machine(device: torch.device) -> str:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    try:
        from importlib.metadata import version

        xformers = version("xformers")
    except Exception:  # noqa: BLE001 - any failure means: not installed
        xformers = "not installed"
    return f"{where}; torch {torch.__version__}, xformers {xformers}"


def main(argv: list[str] | None = None) -> int:
    """Run the tour; 0 if every check passed, 1 if any failed, 2 if it could not start."""
    args = parse(argv)
    picked = chosen(args.only)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible; use --device cpu or auto", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          args.device if args.device != "auto" else "cpu")
    tracker = open_run(args.tracking_uri, device, args.quick)
    tour = Tour(device, args.quick, tracker, args.tolerance_scale,
                options={"max_len": args.max_len, "mem_cap_gib": args.mem_cap_gib})
    status = "FAILED"
    try:
        tour.say(f"ablate tour on {describe_machine(device)}; {'quick, ' if args.quick else ''}"
                 f"MLflow run {tracker.run_id} at {tracker.uri} (experiment 'tour')")
        tracker.log_params({"device": device.type, "quick": str(args.quick),
                            "machine": describe_machine(device), "sections": ",".join(
                                SECTIONS[i][0] for i in picked)})
        for i in picked:
            key, run_section = SECTIONS[i]
            with tour.section(i + 1, key, (run_section.__doc__ or "").strip()):
                run_section(tour)
        code = tour.summary()
        failed = [f"{c.section}/{c.name}" for c in tour.failures]
        tour.tag("tour.failed_checks", ", ".join(failed) or "none")
        tracker.log_text("\n".join(tour.lines) + "\n", "tour.txt")
        status = "FINISHED" if code == 0 else "FAILED"
        return code
    finally:
        tracker.finish(status)
