"""The seed tour: the evidence for memory-efficient attention, from the project's own code.

`python -m ablate.tour [--quick] [--tracking-uri URI] [--device auto|cpu|cuda] [--max-len N]` runs,
in order: (1) correctness: the eager reference against the textbook softmax(QK^T/sqrt(d))V, then
xformers and the auto-picked backend against the reference; (2) time and memory against sequence
length, with the length where vanilla runs out of memory; (3) causal masks; (4) packed
variable-length documents; (5) grouped-query attention and the KV cache it saves; (6) ALiBi; (7) a
small model trained on packed Shakespeare, built by `ablate.experiment.build_run`. Kernels are
checked and timed with `ablate.bench.toolkit` (its tolerances, its timer). Each section prints a
titled block and logs its figures and plots to one MLflow run (experiment "tour"). Without CUDA,
the xformers kernels are skipped with one line per section and the rest runs. The exit status is 1
if any check fails its tolerance.
"""
from ablate.tour.cli import main

__all__ = ["main"]
