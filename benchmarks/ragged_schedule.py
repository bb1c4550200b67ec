"""How cuDNN's ragged attention should be handed a batch: document order, length bucket S, one call or two.

    python benchmarks/ragged_schedule.py [--trials 6]

On batches of 8 rows x 4096 tokens of web-like documents (log-normal lengths, mean 650 tokens, cut
at row ends as the packer cuts them; seeded, so every run sees the same batches), GPT-2 small's
attention shape (12 heads x 64, bf16), it times one layer's forward and backward through
`ablate.kernels.cudnn_graphs` (the graphs the cudnn backend runs) for each way of presenting the
same documents:

    order:  buffer order, longest first, shortest first (the offsets say where each document is)
    S:      the longest rounded up to a power of two, to a multiple of 512, of 256, of 128
    split:  two calls, documents up to 1024 tokens under S = 1024 and the rest under their own S

and prints each one's time and its largest relative difference from the first (the same attention,
up to accumulation order). Then it lists the forward and backward graphs' execution plans, each
timed, to show which one cuDNN's heuristic picks. `ablate.kernels.ragged.prepare_ragged` uses what
this measured (longest first; S a power of two up to 512, multiples of 512 beyond).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from ablate.bench.toolkit import document_lengths, rows_of
from ablate.kernels import cudnn_graphs as cg
from ablate.kernels.ragged import RaggedLayout, doc_bucket
from ablate.kernels.spec import AttentionSpec

ROWS, T, MEAN_DOC = 8, 4096, 650


def layout_of(spec: AttentionSpec, lens: np.ndarray, starts: np.ndarray, order: np.ndarray, S: int,
              device: torch.device) -> RaggedLayout:
    """The documents `order` (indices into lens/starts, which are in buffer order), in that order,
    under length bucket S; zero-length documents pad the count to its bucket."""
    pad = doc_bucket(len(order)) - len(order)
    end = int(starts[-1])
    seq = np.concatenate([lens[order], np.zeros(pad, np.int64)])
    first = np.concatenate([starts[order], np.full(pad + 1, end, np.int64)])
    od = cg.offset_dtype()
    q_width, kv_width = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    return RaggedLayout(seq_len=torch.from_numpy(seq).to(torch.int32).to(device),
                        q_off=torch.from_numpy(first * q_width).to(od).to(device),
                        kv_off=torch.from_numpy(first * kv_width).to(od).to(device),
                        host_starts=torch.from_numpy(first), host_seq=torch.tensor([S]))


def shape(spec: AttentionSpec, layout: RaggedLayout, q: torch.Tensor, backward: bool) -> cg.GraphShape:
    return cg.GraphShape(device=q.device.index or 0, docs=layout.seq_len.shape[0], seq=int(layout.host_seq[0]),
                         n_heads=spec.n_heads, n_kv_heads=spec.n_kv_heads, head_dim=spec.head_dim, dtype=q.dtype,
                         causal=True, alibi=False, total=q.shape[0] * q.shape[1] if backward else 0)


def forward_backward(spec, q, k, v, do, layouts):  # noqa: ANN001, ANN201
    """Forward then backward over the documents of `layouts` (one call each), writing one o, dq,
    dk, dv: each call writes only its own documents."""
    o = torch.empty_like(q)
    stats = []
    for lay in layouts:
        s = shape(spec, lay, q, False)
        st = torch.empty(s.docs * s.n_heads * q.shape[1], dtype=torch.float32, device=q.device)
        cg.execute("fwd", s, {"seq_q": lay.seq_len, "seq_kv": lay.seq_len, "q_off": lay.q_off, "kv_off": lay.kv_off,
                              "q": q, "k": k, "v": v, "o": o, "stats": st}, q.device)
        stats.append(st)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    for lay, st in zip(layouts, stats):
        cg.execute("bwd", shape(spec, lay, q, True), {
            "seq_q": lay.seq_len, "seq_kv": lay.seq_len, "q_off": lay.q_off, "kv_off": lay.kv_off, "q": q, "k": k,
            "v": v, "o": o, "dO": do, "stats": st, "dq": dq, "dk": dk, "dv": dv}, q.device)
    return o, dq, dk, dv


def milliseconds(fn, n: int = 20) -> float:  # noqa: ANN001
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / n


def pow2(n: int) -> int:
    return min(T, 1 << max(6, int(np.ceil(np.log2(n)))))


def multiple(n: int, m: int) -> int:
    return min(T, -(-n // m) * m)


def plans(spec: AttentionSpec, q, k, v, do, layout: RaggedLayout) -> None:  # noqa: ANN001
    """Every execution plan of the forward and backward graphs of `layout`, timed."""
    import cudnn

    def finish_all(g, t):  # noqa: ANN001, ANN202
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans(cudnn.build_plan_policy.ALL)
        return cg.Plan(graph=g, t=t, workspace=int(g.get_workspace_size()))

    default_finish, cg._finish = cg._finish, finish_all
    cg._GRAPHS.clear()
    try:
        o, *_ = forward_backward(spec, q, k, v, do, [layout])
        for (kind, s), p in list(cg._GRAPHS.items()):
            n = p.graph.get_execution_plan_count()
            print(f"{kind} graph (docs={s.docs}, S={s.seq}): {n} plan(s), the heuristic's first is the default", flush=True)
            st = torch.empty(s.docs * s.n_heads * q.shape[1], dtype=torch.float32, device=q.device)
            data = {"seq_q": layout.seq_len, "seq_kv": layout.seq_len, "q_off": layout.q_off, "kv_off": layout.kv_off,
                    "q": q, "k": k, "v": v, "o": torch.empty_like(q), "stats": st}
            if kind == "bwd":
                data.update({"o": o, "dO": do, "dq": torch.empty_like(q), "dk": torch.empty_like(k),
                             "dv": torch.empty_like(v)})
                forward_backward(spec, q, k, v, do, [layout])  # stats for this layout
            pack = {p.t[role]: t.data_ptr() for role, t in data.items()}
            for i in range(n):
                ws = torch.empty(max(1, int(p.graph.get_workspace_size_plan_at_index(i))), dtype=torch.uint8,
                                 device=q.device)
                ms = milliseconds(lambda: p.graph.execute_plan_at_index(pack, ws, i, handle=cg._handle(q.device)))
                print(f"  plan {i}: {ms:.3f} ms  {p.graph.get_plan_name_at_index(i)}", flush=True)
    finally:
        cg._finish = default_finish
        cg._GRAPHS.clear()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/ragged_schedule.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=6, help="batches (each its own documents)")
    args = parser.parse_args(argv)
    if cg.why_unavailable():
        parser.error(f"cuDNN's ragged attention is unavailable here: {cg.why_unavailable()}")
    device = torch.device("cuda")
    spec = AttentionSpec(n_heads=12, n_kv_heads=12, head_dim=64, causal=True)
    rng = np.random.default_rng(1)
    print(f"cuDNN ragged attention on {torch.cuda.get_device_name()}: {ROWS} x {T} tokens of web-like documents, "
          f"12 heads x 64, bf16; ms per layer, forward + backward", flush=True)
    totals: dict[str, list[float]] = {}
    for trial in range(args.trials):
        lens = np.array([n for row in rows_of(document_lengths(rng, ROWS * T, MEAN_DOC, sigma=1.0, low=2), ROWS, T)
                         for n in row], np.int64)
        starts = np.concatenate([[0], np.cumsum(lens)])
        q = torch.randn(ROWS, T, 12, 64, device=device, dtype=torch.bfloat16)
        k, v, do = torch.randn_like(q), torch.randn_like(q), torch.randn_like(q)
        buffer, longest = np.arange(len(lens)), np.argsort(-lens, kind="stable")
        shortest, top = np.argsort(lens, kind="stable"), int(lens.max())
        short, long_ = buffer[lens <= 1024], buffer[lens > 1024]
        variants = {
            "buffer order, S pow2": [(buffer, pow2(top))],
            "buffer order, S 512s": [(buffer, multiple(top, 512))],
            "buffer order, S 256s": [(buffer, multiple(top, 256))],
            "buffer order, S 128s": [(buffer, multiple(top, 128))],
            "longest first, S pow2": [(longest, pow2(top))],
            "longest first, S 512s": [(longest, multiple(top, 512))],
            "longest first, S 128s": [(longest, multiple(top, 128))],
            "shortest first, S pow2": [(shortest, pow2(top))],
        }
        if len(long_) and len(short):
            variants["two calls at 1024, S pow2"] = [(short, 1024), (long_, pow2(top))]
        reference = None
        print(f"batch {trial}: {len(lens)} documents, the longest {top} tokens", flush=True)
        for name, calls in variants.items():
            layouts = [layout_of(spec, lens, starts, order, S, device) for order, S in calls]
            out = forward_backward(spec, q, k, v, do, layouts)
            reference = reference or out
            diff = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(out, reference))
            ms = milliseconds(lambda: forward_backward(spec, q, k, v, do, layouts))
            totals.setdefault(name, []).append(ms)
            print(f"  {ms:6.3f} ms  {name} (S {', '.join(str(S) for _, S in calls)}; differs by {diff:.0e})", flush=True)
    print("mean over batches:")
    for name, times in totals.items():
        print(f"  {sum(times) / len(times):6.3f} ms  {name} ({len(times)} batches)")
    plans(spec, q, k, v, do, layout_of(spec, lens, starts, buffer, pow2(top), device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
