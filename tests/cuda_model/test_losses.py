"""The fused head + cross-entropy against the plain one (logits, then F.cross_entropy)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cuda_model import losses


@settings(max_examples=8, deadline=None)
@given(
    rows=st.integers(1, 7), chunk=st.integers(1, 40), masked=st.booleans(), seed=st.integers(0, 99)
)
def test_fused_linear_cross_entropy_equals_the_plain_one(rows, chunk, masked, seed):
    generator = torch.Generator().manual_seed(seed)
    B, T, D, V = rows, 5, 8, 11
    h = torch.randn(B, T, D, generator=generator, requires_grad=True)
    w = torch.randn(V, D, generator=generator, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=generator)
    mask = (torch.rand(B, T, generator=generator) < 0.6).float() if masked else None

    plain, n_plain = losses.masked_cross_entropy(h @ w.T, targets, mask)
    grads_plain = torch.autograd.grad(plain * 0.5, (h, w))
    old = losses.CHUNK_ELEMENTS
    losses.CHUNK_ELEMENTS = chunk * V  # `chunk` rows per chunk: many chunks, a ragged last one
    try:
        fused, n_fused = losses.linear_cross_entropy(h, w, targets, mask)
        with torch.no_grad():  # the evaluation path: chunked too, without gradients
            evaluated, n_evaluated = losses.linear_cross_entropy(h, w, targets, mask)
    finally:
        losses.CHUNK_ELEMENTS = old
    grads_fused = torch.autograd.grad(fused * 0.5, (h, w))
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(evaluated, plain.detach(), atol=1e-5, rtol=1e-6)
    assert n_evaluated.item() == n_plain.item()
    assert n_fused.item() == n_plain.item()
    for a, b in zip(grads_fused, grads_plain):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("trained", ["hidden", "head"])
def test_the_fused_loss_trains_when_only_one_of_its_inputs_does(trained):
    """A frozen head (or frozen hidden states) still gets the training path: the other's gradient is
    the plain cross-entropy's."""
    generator = torch.Generator().manual_seed(1)
    h = torch.randn(2, 5, 8, generator=generator, requires_grad=trained == "hidden")
    w = torch.randn(11, 8, generator=generator, requires_grad=trained == "head")
    targets = torch.randint(0, 11, (2, 5), generator=generator)
    x = h if trained == "hidden" else w
    fused, _ = losses.linear_cross_entropy(h, w, targets, None)
    plain, _ = losses.masked_cross_entropy(h @ w.T, targets, None)
    torch.testing.assert_close(torch.autograd.grad(fused, x)[0], torch.autograd.grad(plain, x)[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_fusable_chunk_kernel_equals_the_eager_one(masked):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 13, generator=generator)
    targets = torch.randint(0, 13, (6,), generator=generator)
    mask = (torch.rand(6, generator=generator) < 0.5).float() if masked else None
    expected = losses.chunk_nll_grad(logits.clone(), targets, mask)  # it works in place
    for got, want in zip(losses.chunk_nll_grad_fusable(logits, targets, mask), expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_unknown_loss_lists_the_known_ones():
    from hanyeong.errors import ConfigError

    with pytest.raises(ConfigError, match="causal_lm, sft"):
        losses.get_loss("dpo-typo")
