"""Model components: parameter budgets, packed-document isolation for every positional scheme."""
import pytest
import torch

from ablate.config import compose
from ablate.kernels import BACKENDS
from ablate.kernels.base import Backend
from ablate.kernels.ragged import prepare_ragged, ragged_attention
from ablate.models import LanguageModel, count_params

POS = ["alibi", "rope", "learned", "sinusoidal", "nope"]


def build(overrides, backend="eager", vocab=64):
    cfg = compose(["model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.context=64", *overrides])
    return LanguageModel(cfg, vocab, BACKENDS.get(backend)())


def test_gqa_and_mqa_shrink_only_the_kv_projection():
    d, n, h = 32, 4, 8
    mha, gqa, mqa = (build([f"attention={a}", "attention.n_kv_heads=2"] if a == "gqa" else [f"attention={a}"])
                     for a in ("mha", "gqa", "mqa"))
    assert mha.blocks[0].attn.qkv.weight.shape == ((n + 2 * n) * h, d)
    assert gqa.blocks[0].attn.qkv.weight.shape == ((n + 2 * 2) * h, d)
    assert mqa.blocks[0].attn.qkv.weight.shape == ((n + 2 * 1) * h, d)
    layers, kv_weights_per_head = 2, 2 * h * d  # a K and a V projection per kv head, per layer
    assert count_params(mha) - count_params(gqa) == layers * (n - 2) * kv_weights_per_head
    assert count_params(mha) - count_params(mqa) == layers * (n - 1) * kv_weights_per_head


def test_glu_mlps_match_the_gelu_mlp_within_one_percent():
    from omegaconf import OmegaConf

    from ablate.models import MLPS

    configs = {name: compose([f"mlp={name}"]) for name in ("gelu", "relu2", "swiglu", "geglu")}

    def n(name, d_model):
        cfg = configs[name].copy()
        OmegaConf.update(cfg, "model.d_model", d_model)
        return sum(p.numel() for p in MLPS.build(name, cfg).parameters())

    sizes = []
    for d_model in (128, 256, 384, 512, 768, 1024):  # widths rounded to mlp.multiple_of differently
        gelu = n("gelu", d_model)
        sizes.append(gelu)
        for glu in ("swiglu", "geglu"):
            assert abs(n(glu, d_model) - gelu) / gelu < 0.01, (glu, d_model)
        assert n("relu2", d_model) == gelu
    assert sizes == sorted(set(sizes))  # every width was built


def test_learned_positions_refuse_a_longer_context():
    cfg = compose(["pos=learned", "pos.max_positions=32", "model.context=64"])
    (problem,) = LanguageModel.check(cfg)
    assert "pos.max_positions" in problem and "model.context" in problem


@pytest.mark.parametrize("attention,kv", [("mha", 4), ("gqa", 2), ("mqa", 1)])
def test_the_attention_spec_is_derived_once_and_sent_by_every_layer(attention, kv):
    model = build([f"attention={attention}", "pos=alibi", "attention.window=8"])
    assert model.spec == LanguageModel.spec_for(model_cfg := compose(
        ["model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.context=64", f"attention={attention}",
         "pos=alibi", "attention.window=8"]))
    assert (model.spec.n_kv_heads, model.spec.alibi, model.spec.window) == (kv, True, 8)
    assert all(block.attn.spec is model.spec or block.attn.spec == model.spec for block in model.blocks)
    assert model_cfg.attention.name == attention


def test_tokens_alone_are_enough():
    model = build(["pos=rope"])
    tokens = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(model(tokens), model(tokens, torch.arange(16).expand(2, 16)))
    # doc_lens alone: positions restart at each document
    packed = model(tokens, doc_lens=((10, 6), (16,)))
    torch.testing.assert_close(packed[0, 10:], model(tokens[:1, 10:])[0])


@pytest.mark.parametrize("pos", POS)
def test_packed_documents_equal_each_document_alone(pos):
    """A row packing several documents gives each the logits and gradients it gets alone."""
    torch.manual_seed(0)
    model = build([f"pos={pos}", "attention=gqa", "attention.n_kv_heads=2"]).double()
    lens = [int(x) for x in torch.randint(1, 20, (4,))]
    lens.append(64 - sum(lens))
    tokens = torch.randint(0, 64, (1, 64))
    positions = torch.cat([torch.arange(n) for n in lens])[None]
    weights = torch.randn(1, 64, 64, dtype=torch.float64)

    packed = model(tokens, positions, (tuple(lens),))
    (packed * weights).sum().backward()
    grads_packed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    start = 0
    for n in lens:
        alone = model(tokens[:, start:start + n], torch.arange(n)[None])
        torch.testing.assert_close(packed[:, start:start + n], alone, rtol=1e-9, atol=1e-9)
        (alone * weights[:, start:start + n]).sum().backward()
        start += n
    for g_packed, p in zip(grads_packed, model.parameters()):
        torch.testing.assert_close(g_packed, p.grad, rtol=1e-8, atol=1e-10)


class PackedReference(Backend):
    """The ragged op (the cuDNN path's wiring, here its float32 reference) as a backend that asks
    for packed q, k and v; it records whether each call got them without a copy."""

    name = "packed-reference"

    def __init__(self, packs: bool = True):
        self.packs = packs
        self.packed: list[bool] = []

    def refuse(self, cell):
        return None

    def prepare(self, spec, doc_lens, n_rows, row_len):
        return prepare_ragged(spec, doc_lens, n_rows, row_len)

    def packs_qkv(self, spec, layout):
        return self.packs

    def attend(self, q, k, v, spec, layout=None):
        self.packed.append(all(t.is_contiguous() for t in (q, k, v)))
        o, _ = ragged_attention(q, k, v, *layout.op_args(), spec.causal, spec.alibi)
        return o


@pytest.mark.parametrize("pos,attention", [("learned", "mha"), ("rope", "gqa"), ("alibi", "mqa")])
def test_a_kernel_that_reads_packed_qkv_gets_them_from_the_same_weights(pos, attention):
    """A backend that reads packed q, k, v gets them from one matmul each (no strided slices to
    copy), with the model's weights unchanged: logits and every gradient equal those of the fused
    projection's slices through the same op (a float32 kernel in a float64 model, on fresh inputs:
    tolerance 1e-6 of the largest value)."""
    torch.manual_seed(1)
    model = build([f"pos={pos}", f"attention={attention}"] + ["attention.n_kv_heads=2"] * (attention == "gqa")).double()
    tokens = torch.randint(0, 64, (2, 64))
    docs = ((20, 30, 14), (64,))
    weights = torch.randn(2, 64, 64, dtype=torch.float64)
    results = []
    for backend in (PackedReference(packs=False), PackedReference()):
        model.backend = backend
        model.zero_grad()
        logits = model(tokens, doc_lens=docs)
        (logits * weights).sum().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    assert backend.packed == [True] * len(model.blocks)
    (want, want_grads), (got, got_grads) = results
    for g, w in zip([got, *got_grads], [want, *want_grads]):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6 * w.abs().max().item())


def test_sinusoids_do_not_swamp_the_token_embeddings():
    """At initialisation the token signal entering the first block is as strong as the sinusoids
    (within 2x in RMS), the balance of Vaswani et al.: unit-amplitude sinusoids would be 35x
    stronger than embeddings of std 0.02, and the model would first have to learn to see its tokens."""
    model = build(["pos=sinusoidal", "model.d_model=384", "model.n_heads=6"], vocab=256)
    tokens = torch.randint(0, 256, (4, 64))
    positions = torch.arange(64).expand(4, 64)
    x = model.embed(tokens)
    with_pos = model.positions.embed(x, positions)
    table = model.positions.embed(torch.zeros_like(x), positions)
    rms = lambda t: t.pow(2).mean().sqrt().item()  # noqa: E731
    token_part = rms(with_pos - table)
    assert 0.5 < token_part / rms(table) < 2, (token_part, rms(table))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_the_loss_and_its_gradient_are_cross_entropy(dtype, reduction):
    """The model's loss against F.cross_entropy in float64 on fresh random logits, forward and
    backward, with padding ids (-inf bias) and ignored targets: within 1e-5 relative for float32
    logits; for bf16 logits, the gradient within bf16 rounding (1% of its largest value)."""
    from ablate.models.loss import cross_entropy

    torch.manual_seed(2)
    N, V = 96, 80
    logits = (3 * torch.randn(N, V)).to(dtype).requires_grad_()
    bias = torch.zeros(V)
    bias[70:] = float("-inf")
    targets = torch.randint(0, 70, (N,))
    targets[::7] = -100
    weights = torch.randn(N) if reduction == "none" else torch.tensor(1.0)
    (cross_entropy(logits, targets, bias, reduction) * weights).sum().backward()
    ours, grad = cross_entropy(logits, targets, bias, reduction).detach(), logits.grad
    ref_logits = logits.detach().double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(ref_logits + bias.double(), targets, ignore_index=-100, reduction=reduction)
    (ref * weights.double()).sum().backward()
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    scale = ref_logits.grad.abs().max().item()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (grad.double() - ref_logits.grad).abs().max().item() <= tol * scale
    assert grad.dtype == dtype and not grad[:, 70:].any()  # padding ids get no gradient


def test_the_loss_keeps_the_logits_not_float32_log_probabilities_for_the_backward():
    """What the loss saves for its backward: the bf16 logits and a float per token, not a float32
    copy of every logit (which doubles the loss's memory and traffic under bf16)."""
    from ablate.models.loss import cross_entropy

    logits = torch.randn(64, 512).to(torch.bfloat16).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        cross_entropy(logits, torch.randint(0, 512, (64,)), torch.zeros(512), "sum")
    big = [t for t in saved if t.numel() >= logits.numel()]
    assert big and all(t.dtype == torch.bfloat16 for t in big), [(t.dtype, tuple(t.shape)) for t in saved]


def test_rope_looks_up_the_angles_it_would_compute_and_computes_past_its_table():
    """RoPE's table of cos/sin (positions below model.context) holds what the formula gives, and a
    row longer than the table (evaluation at 2x) gets the formula's values, not an index error."""
    from ablate.models.positions import _cos_sin

    model = build(["pos=rope"])  # context 64, head dim 8
    for T in (16, 64, 128):
        pos = torch.arange(T).expand(2, T)
        cos, sin = model.positions.rotation(pos)
        want_cos, want_sin = _cos_sin(pos, model.positions.inv_freq)
        assert cos.shape == (2, T, 1, 4)
        torch.testing.assert_close(cos[:, :, 0], want_cos, rtol=0, atol=1e-6)
        torch.testing.assert_close(sin[:, :, 0], want_sin, rtol=0, atol=1e-6)
    assert model(torch.randint(0, 64, (1, 128))).isfinite().all()


@pytest.mark.parametrize("mlp", ["swiglu", "geglu"])
def test_a_gated_mlp_is_act_of_the_first_half_times_the_second(mlp):
    """The gated MLPs (two matmuls on the halves of one weight) against the formula on that weight,
    in float64 on fresh inputs, forward and backward."""
    torch.manual_seed(3)
    block = build([f"mlp={mlp}"]).double().blocks[0].mlp
    x = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    gate, value = (x @ block.up.weight.T).chunk(2, dim=-1)
    want = (block.act(gate) * value) @ block.down.weight.T
    got = block(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    grads = torch.autograd.grad(got, [x, block.up.weight], g)
    want_grads = torch.autograd.grad(want, [x, block.up.weight], g)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def textbook_angles(T, H, theta):
    """(T, H/2) float64 angles pos * theta^(-2i/H)."""
    return torch.arange(T, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, H, 2, dtype=torch.float64) / H)


def textbook_rope(x_BTMH, theta):
    """RoPE as usually written: x * cos + rotate_half(x) * sin."""
    T, H = x_BTMH.shape[1], x_BTMH.shape[-1]
    angles = textbook_angles(T, H, theta)
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1)[None, :, None].to(x_BTMH.device) for f in (torch.cos, torch.sin))
    return x_BTMH * cos + torch.cat([-x_BTMH[..., H // 2:], x_BTMH[..., : H // 2]], dim=-1) * sin


def rope_input_grad(first, rest, x, g):
    """The gradient at x of sum(g * cat(first, rest)), the two outputs of `rope` (an empty `rest` takes none)."""
    n = first.shape[2]
    outputs, grads = ([first, rest], [g[:, :, :n], g[:, :, n:]]) if rest.numel() else ([first], [g])
    return torch.autograd.grad(outputs, x, grads)[0]


@pytest.mark.parametrize("attention", ["mha", "gqa"])
def test_rope_attention_equals_the_textbook_formula(attention):
    """A RoPE attention layer (q and k projected together, rotated by the `ablate::rope` op) against
    q, k, v from the weight's row blocks, textbook RoPE, and causal softmax attention written out, in
    float64 on fresh inputs, forward and backward (tolerance 1e-6: the angle table is float32)."""
    import math

    torch.manual_seed(5)
    overrides = ["pos=rope", f"attention={attention}"] + ["attention.n_kv_heads=2"] * (attention == "gqa")
    model, theta = build(overrides).double(), compose(overrides).pos.rope_theta
    attn = model.blocks[0].attn
    N, K, H = attn.spec.n_heads, attn.spec.n_kv_heads, attn.spec.head_dim
    x = torch.randn(2, 16, 32, dtype=torch.float64, requires_grad=True)
    got = attn(x, model.positions, model.positions.rotation(torch.arange(16).expand(2, 16)), None)

    wq, wk, wv = attn.qkv.weight.split([N * H, K * H, K * H])
    q, k, v = ((x @ w.T).view(2, 16, -1, H) for w in (wq, wk, wv))
    q, k = textbook_rope(q, theta), textbook_rope(k, theta).repeat_interleave(N // K, dim=2)
    scores = torch.einsum("btnh,bsnh->bnts", q, k) / math.sqrt(H)
    scores = scores.masked_fill(~torch.ones(16, 16, dtype=torch.bool).tril(), float("-inf"))
    o = torch.einsum("bnts,bsnh->btnh", scores.softmax(-1), v.repeat_interleave(N // K, dim=2))
    want = o.reshape(2, 16, N * H) @ attn.out.weight.T
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(want)
    params = [x, attn.qkv.weight, attn.out.weight]
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n_first", [3, 5])
def test_the_rope_op_rotates_splits_and_joins_the_gradient(n_first):
    """`ablate::rope` gives the textbook rotation of each head, split after `n_first` heads (none
    left: an empty second output), and its backward the gradient of that, in one piece; the same
    traced by torch.compile (its fake implementation and autograd), float64 on fresh inputs."""
    from ablate.models.rope_kernel import rope

    torch.manual_seed(6)
    theta = 37.0
    x = torch.randn(2, 9, 5, 6, dtype=torch.float64, requires_grad=True)
    angles = textbook_angles(9, 6, theta)
    cos, sin = angles.cos()[None, :, None].expand(2, 9, 1, 3), angles.sin()[None, :, None].expand(2, 9, 1, 3)
    want = textbook_rope(x, theta)
    g = torch.randn_like(want)
    (want_grad,) = torch.autograd.grad(want, x, g)
    for op in (rope, torch.compile(rope, backend="aot_eager", fullgraph=True)):
        first, rest = op(x, cos, sin, n_first)
        assert first.shape == (2, 9, n_first, 6) and rest.shape == (2, 9, 5 - n_first, 6)
        torch.testing.assert_close(torch.cat([first, rest], dim=2), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rope_input_grad(first, rest, x, g), want_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 100, 16, 12, 64), (2, 37, 5, 5, 96), (1, 64, 3, 1, 128)])
def test_cuda_rope_kernel_equals_the_formula(dtype, shape):
    """The Triton kernel (B, T, heads, n_first, H: odd token counts, a head dim whose half is no power
    of two, no second output) against the textbook formula in float64 on the same inputs, forward
    and backward: within float32 rounding (1e-5), or one bfloat16 rounding of the result (2^-7)."""
    from ablate.models.rope_kernel import rope

    B, T, heads, n_first, H = shape
    torch.manual_seed(7)
    x = torch.randn(B, T, heads, H, device="cuda", dtype=dtype, requires_grad=True)
    theta = 10000.0
    angles = textbook_angles(T, H, theta)
    cos, sin = (f(angles).float().cuda()[None, :, None].expand(B, T, 1, H // 2) for f in (torch.cos, torch.sin))
    first, rest = rope(x, cos, sin, n_first)
    g = torch.randn(B, T, heads, H, device="cuda", dtype=dtype)
    got_grad = rope_input_grad(first, rest, x, g)
    x64 = x.detach().double().requires_grad_()
    want = textbook_rope(x64, theta)
    (want_grad,) = torch.autograd.grad(want, x64, g.double())
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 1e-5}
    torch.testing.assert_close(torch.cat([first, rest], dim=2).double(), want, **tol)
    torch.testing.assert_close(got_grad.double(), want_grad, **tol)
