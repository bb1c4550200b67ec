"""What the tour shows and keeps: titled blocks on stdout, checks with tolerances, and one MLflow run.

Every figure a section reports is logged as `tour/<section>/<name>`; plots go to the run as
`tour/<section>.png`, and the printed text as `tour.txt`. A check passes when its value is at most
its limit (tolerances are multiplied by `tolerance_scale`); any failed check, or a section that
raises, makes the tour's exit status 1.
"""
from __future__ import annotations

import math
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from ablate.bench.toolkit import Comparison
from ablate.tracking.mlflow import Tracker


@dataclass
class Check:
    section: str
    name: str
    value: float
    limit: float
    passed: bool


@dataclass
class Tour:
    device: torch.device
    quick: bool
    tracker: Tracker = field(default_factory=Tracker)
    tolerance_scale: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)  # section options from the command line
    echo: Callable[[str], None] = print
    key: str = "setup"  # the running section
    checks: list[Check] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    shared: dict[str, Any] = field(default_factory=dict)  # built once, used by several sections

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the tour's kernels run in: bfloat16 on a GPU, float32 on CPU."""
        return torch.bfloat16 if self.cuda else torch.float32

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    # -- output -------------------------------------------------------------------------------
    def say(self, text: str = "") -> None:
        self.lines.append(text)
        self.echo(text)

    @contextmanager
    def section(self, number: int, key: str, title: str) -> Iterator[None]:
        """A titled block; an exception inside it is shown, counted as a failure, and the tour
        goes on with the next section."""
        self.key = key
        self.say(f"\n[{number}] {key}: {title}")
        start = time.perf_counter()
        try:
            yield
        except Exception as err:  # noqa: BLE001 - one broken section must not hide the others
            traceback.print_exc()
            self.checks.append(Check(key, "error", math.nan, 0.0, False))
            self.say(f"  error: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}")
        finally:
            if self.cuda:
                torch.cuda.empty_cache()
            self.metric("seconds", time.perf_counter() - start)
            self.say(f"  ({time.perf_counter() - start:.1f} s)")

    # -- records ------------------------------------------------------------------------------
    def metric(self, name: str, value: float, step: int = 0) -> None:
        self.tracker.log_metrics({f"tour/{self.key}/{name}": float(value)}, step)

    def tag(self, key: str, value: str) -> None:
        self.tracker.set_tags({key: str(value)[:5000]})

    def param(self, key: str, value: Any) -> None:
        self.tracker.log_params({f"{self.key}.{key}": str(value)[:6000]})

    def figure(self, fig: Any) -> None:
        """Log a matplotlib Figure to the run as tour/<section>.png (no-op without tracking)."""
        client = getattr(self.tracker, "client", None)
        if client is None:
            return
        path = f"tour/{self.key}.png"
        client.log_figure(self.tracker.run_id, fig, path, save_kwargs={"dpi": 110, "bbox_inches": "tight"})

    def check(self, name: str, value: float, limit: float, scaled: bool = True,
              shown: str | None = None, text: str | None = None) -> bool:
        """Record `value <= limit` (limit times tolerance_scale if `scaled`), log it, print a line."""
        limit = limit * self.tolerance_scale if scaled else limit
        value = float(value)
        passed = math.isfinite(value) and value <= limit
        self.checks.append(Check(self.key, name, value, limit, passed))
        self.metric(name, value)
        measured = text or f"{value:.3g}"
        self.say(f"  {shown or name:<34} {measured}  (limit {limit:.3g})  {'ok' if passed else 'FAIL'}")
        return passed

    def compared(self, label: str, c: Comparison, shown: str) -> bool:
        """A kernel against the reference (`ablate.bench.toolkit.compare_to_reference`): one check
        for the output, one for the worst of its q/k/v gradients, each within the toolkit's tolerance."""
        ok = self.check(f"{label}_out", c.errors["out"], c.tol, shown=shown, text=f"rel {c.errors['out']:.2e}")
        grads = [c.errors[g] for g in ("dq", "dk", "dv") if g in c.errors]
        if grads:
            ok &= self.check(f"{label}_grad", max(grads), c.tol, shown=f"{shown} dq,dk,dv",
                             text=f"rel {max(grads):.2e}")
        return ok

    def summary(self) -> int:
        """Print the verdict; the exit status: 0 if every check passed, else 1."""
        failed = self.failures
        self.key = "summary"
        self.say(f"\n{len(self.checks)} check{'s' * (len(self.checks) != 1)}, {len(failed)} failed"
                 + (": " + ", ".join(f"{c.section}/{c.name}" for c in failed) if failed else ""))
        self.metric("checks", len(self.checks))
        self.metric("failed", len(failed))
        return 1 if failed else 0
