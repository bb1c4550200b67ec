"""Which backend serves which cell: the capability table, the auto preference order, selection.

`select_backend(cell, "auto")` walks `preference(cell)` and returns the first backend that serves
the cell; a forced backend that cannot serve it raises `KernelRefused`, naming the cell, the
reason, and the backends that would.
"""
from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch

from ablate.kernels.base import BACKENDS, Backend
from ablate.kernels.spec import Cell


class KernelRefused(ValueError):
    """A requested attention backend cannot serve the run's cell."""


_instances: dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    """The (one) instance of a registered backend; unknown names raise, listing the known ones."""
    if name not in BACKENDS:
        known = ", ".join(["auto", *BACKENDS.names()])
        raise ValueError(f"unknown attention backend '{name}'; choose one of: {known}")
    if name not in _instances:
        _instances[name] = BACKENDS.get(name)()
    return _instances[name]


# Auto preference: the fastest backend that serves a cell, from `python -m ablate.bench.kernels` on
# an H200 (figures in benchmarks/RESULTS.md). cudnn (ragged SDPA) leads packed rows and ALiBi, flex
# follows (it reads GQA's K heads directly, where xformers' backward copies K/V to N heads); SDPA
# (cuDNN's dense kernel inside torch) leads dense causal and dense GQA; flex leads windows, which
# cudnn refuses. On CPU, SDPA's fused flash kernel comes before the eager reference; flex is
# forward-only there. Where cudnn is unavailable (no package, pre-Hopper GPU) the next one serves.
CPU_ORDER = ["sdpa", "eager", "flex"]
DENSE_ORDER = ["sdpa", "cudnn", "xformers", "flex"]
ALIBI_ORDER = ["cudnn", "flex", "sdpa", "xformers"]
SPARSE_ORDER = ["cudnn", "flex", "xformers", "sdpa"]


def preference(cell: Cell) -> list[str]:
    """Every registered backend, best first for `cell` (whether or not it can serve the cell)."""
    if cell.device != "cuda":
        order = CPU_ORDER
    elif cell.alibi:
        order = ALIBI_ORDER
    elif cell.packed or cell.window:
        order = SPARSE_ORDER
    else:
        order = DENSE_ORDER
    known = [name for name in [*order, "eager"] if name in BACKENDS]
    known = list(dict.fromkeys(known))
    at = known.index("eager") if "eager" in known else len(known)
    others = [name for name in BACKENDS.names() if name not in known]
    return known[:at] + others + known[at:]


def device_missing(cell: Cell) -> str | None:
    if cell.device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device here"
    return None


def servers(cell: Cell) -> list[str]:
    """Names of the backends that can serve `cell` here, alphabetically."""
    return [name for name in BACKENDS.names() if get_backend(name).why_not(cell) is None]


def select_backend(cell: Cell, requested: str = "auto") -> Backend:
    """The backend that will serve `cell`: the first in `preference(cell)` that can ("auto"), or
    the one requested by name, which must be able to (else `KernelRefused`)."""
    missing = device_missing(cell)
    if missing:
        raise KernelRefused(f"cannot run {cell.describe()}: {missing}")
    if requested == "auto":
        for name in preference(cell):
            if get_backend(name).why_not(cell) is None:
                return get_backend(name)
        reasons = "; ".join(f"{n}: {get_backend(n).why_not(cell)}" for n in preference(cell))
        raise KernelRefused(f"no backend can serve {cell.describe()} ({reasons})")
    backend = get_backend(requested)
    reason = backend.why_not(cell)
    if reason is None:
        return backend
    able = servers(cell)
    hint = f"Backends that can: {', '.join(able)} (or backend=auto)." if able else "No backend can."
    raise KernelRefused(f"backend={requested} cannot serve {cell.describe()}: {reason}. {hint}")


def standard_cells(device: str, dtype: torch.dtype, head_dim: int,
                   backward: bool = True) -> dict[str, Cell]:
    """The cells the benchmark and the table report on, by name."""
    base = Cell(device=device, causal=True, backward=backward, head_dim=head_dim, dtype=dtype)
    return {
        "dense_causal": base,
        "packed_causal": replace(base, packed=True),
        "alibi_causal": replace(base, alibi=True),
        "alibi_packed": replace(base, alibi=True, packed=True),
        "gqa": replace(base, gqa=True),
        "window": replace(base, window=True),
    }


class Verdict(NamedTuple):
    status: str  # "yes" (fwd+bwd), "fwd" (forward only) or "no"
    reason: str | None  # why backward (for "fwd") or everything (for "no") is refused
    caveat: str | None


FEATURES = {
    "causal": {},
    "packed": {"packed": True},
    "alibi": {"alibi": True},
    "packed+alibi": {"packed": True, "alibi": True},
    "gqa": {"gqa": True},
    "window": {"window": True},
    "compiled": {"packed": True, "compiled": True},
}
DEFAULT_DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}


def verdict(backend: Backend, cell: Cell) -> Verdict:
    fwd = backend.refuse(replace(cell, backward=False))
    bwd = backend.refuse(replace(cell, backward=True))
    if fwd is not None:
        return Verdict("no", fwd, None)
    if bwd is not None:
        return Verdict("fwd", bwd, backend.caveat(replace(cell, backward=False)))
    return Verdict("yes", None, backend.caveat(replace(cell, backward=True)))


def capability_table(devices: tuple[str, ...] = ("cpu", "cuda"), head_dim: int = 64) -> list[dict]:
    """One row per (backend, device): {"backend", "device", "dtype", <feature>: Verdict}.

    Verdicts are static (what the backend supports), not whether it can run on this machine: see
    `Backend.unavailable` for that.
    """
    rows = []
    for name in BACKENDS.names():
        backend = get_backend(name)
        for device in devices:
            base = Cell(device=device, head_dim=head_dim, dtype=DEFAULT_DTYPES[device])
            dtype = str(base.dtype).replace("torch.", "")
            row = {"backend": name, "device": device, "dtype": dtype}
            for feature, flags in FEATURES.items():
                row[feature] = verdict(backend, replace(base, **flags))
            rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """The table as text: yes = fwd+bwd, fwd = forward only, no; [n] points to a footnote."""
    notes: list[str] = []

    def cell_text(v: Verdict) -> str:
        text = v.status
        for note in (v.reason, v.caveat):
            if note:
                if note not in notes:
                    notes.append(note)
                text += f"[{notes.index(note) + 1}]"
        return text

    header = ["backend", "device", *FEATURES]
    body = [[r["backend"], f'{r["device"]} {r["dtype"]}', *(cell_text(r[f]) for f in FEATURES)]
            for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(col.ljust(w) for col, w in zip(line, widths)).rstrip()
             for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("yes = forward and backward, fwd = forward only, no = refused; [n]: note n")
    lines += [f"[{i}] {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(lines)
