"""What an ablation needs to answer its question: length extrapolation, equal sizes and budgets,
validation noise, the best checkpoint, regularisation and samples."""
import math

import numpy as np
import pytest
import torch
from conftest import runs_in, tiny_cfg

from ablate.config import compose
from ablate.experiment import ConfigError, build_run, run
from ablate.models import LanguageModel, count_params
from ablate.train.evaluate import standard_error


def _run(store, name, *overrides):
    run(tiny_cfg("train.steps=8", f"tracking.uri={store}", f"tracking.run_name={name}", "eval.samples=1",
                 "eval.sample_tokens=8", *overrides))
    client, runs = runs_in(store)
    (r,) = [r for r in runs if r.info.run_name == name]
    return client, r


@pytest.mark.slow
def test_extrapolation_is_measured_where_a_scheme_can_place_the_positions(store):
    client, rope = _run(store, "rope", "pos=rope", "eval.context_multiples=[1,2,4]")
    assert {"val/loss", "val/loss_2x", "val/loss_4x", "val/loss_se", "val/loss_best"} <= set(rope.data.metrics)
    assert all(math.isfinite(rope.data.metrics[k]) for k in ("val/loss_2x", "val/loss_4x"))
    assert "samples.txt" in {a.path for a in client.list_artifacts(rope.info.run_id)}
    # what the validation covered: data.max_val_batches=2 (4 rows of 64) evaluates a part of the held-out split
    m = rope.data.metrics
    assert m["data/val_docs"] >= 1 and 0 < m["data/val_tokens_evaluated"] <= 2 * 4 * 64 < m["data/val_tokens"]
    _, learned = _run(store, "learned", "pos=learned", "eval.context_multiples=[1,2,4]")
    assert "val/loss_2x" not in learned.data.metrics and "val/loss" in learned.data.metrics
    assert "not applicable at 2x, 4x" in learned.data.tags["ablate.extrapolation"]


def test_every_context_multiple_evaluates_the_same_documents():
    built = build_run(tiny_cfg("tracking=none", "eval.context_multiples=[1,2,4]"))
    tokens = {m: sum(b.tokens.numel() - b.n_pad for b in built.data.val_batches(m)) for m in (1, 2, 4)}
    assert tokens[1] == tokens[2] == tokens[4]
    assert all(b.tokens.shape[1] == 4 * 64 for b in built.data.val_batches(4))
    first = [b.tokens[b.targets != -100][:50] for b in (built.data.val_batches(m)[0] for m in (1, 4))]
    assert torch.equal(first[0], first[1])  # the same documents, in the same order
    built.trainer.batches.close()


@pytest.mark.parametrize("attention", ["gqa", "mqa"])
@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_matched_parameters_are_within_one_percent_of_mha(attention, mlp):
    def n_params(*overrides):
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            return count_params(LanguageModel(compose(["model=small", f"mlp={mlp}", *overrides]), 257))

    mha = n_params("attention=mha")
    unmatched = n_params(f"attention={attention}")
    matched = n_params(f"attention={attention}", "model.match_params=true")
    assert abs(unmatched - mha) / mha > 0.05  # the gap matching has to close
    assert abs(matched - mha) / mha < 0.01


def test_a_flop_budget_sets_the_steps_and_is_spent_equally():
    steps = {}
    for attention in ("mha", "mqa"):
        built = build_run(tiny_cfg("tracking=none", "train.flops=2e10", f"attention={attention}"))
        per_step = built.flops.flops(4 * 64, 4 * 64 * 32)  # roughly: the FLOP model at ~32 keys a query
        steps[attention] = built.trainer.t.steps
        assert abs(steps[attention] * per_step - 2e10) / 2e10 < 0.5
        built.trainer.batches.close()
    assert steps["mqa"] > steps["mha"]  # fewer FLOPs a step: more steps for the same budget


def test_a_flop_budget_below_one_step_is_refused_naming_a_step_s_flops():
    with pytest.raises(ConfigError, match=r"train\.flops=1000000\.0 is less than one training step \([0-9.e+]+ FLOPs"):
        build_run(tiny_cfg("tracking=none", "train.flops=1e6"))


def test_standard_error_of_the_token_weighted_mean():
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 50, size=200).astype(float)
    nats = counts * (2 + rng.normal(0, 0.5, size=200))
    ratio = nats.sum() / counts.sum()
    # the delta-method variance of a ratio of sample means, written out
    residual = nats - ratio * counts
    expected = math.sqrt((residual**2).sum() / (len(counts) - 1) * len(counts)) / counts.sum()
    assert standard_error(nats, counts) == pytest.approx(expected)
    assert math.isnan(standard_error(nats[:1], counts[:1]))
    # more documents of the same spread: a smaller error
    assert standard_error(np.tile(nats, 4), np.tile(counts, 4)) < standard_error(nats, counts) / 1.9


def test_dropout_is_off_by_default_and_acts_in_training_only():
    torch.manual_seed(0)
    plain = LanguageModel(tiny_cfg(), 257)
    assert not any(isinstance(m, torch.nn.Dropout) for m in plain.modules())
    model = LanguageModel(tiny_cfg("model.dropout=0.5"), 257)
    tokens = torch.randint(0, 257, (2, 16))
    model.train()
    assert not torch.equal(model(tokens), model(tokens))
    model.eval()
    assert torch.equal(model(tokens), model(tokens))
