"""The PyTorch model: the shared laws, checkpoint names, KV cache, document mask, init."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orchestration.core.checkpoint import parameter_names
from tests.check_model import (biased_toward_specials, check_generation_never_samples_specials,
                               check_model, random_tokens)  # fmt: skip
from tests.cuda_model.conftest import tiny


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("n_kv_heads", [2, 4])
def test_check_model(backend, tmp_path, tied, n_kv_heads):
    check_model(backend, tiny(tie_embeddings=tied, n_kv_heads=n_kv_heads), tmp_path)


@pytest.mark.parametrize("tied", [True, False])
def test_state_dict_is_the_checkpoint_layout(backend, tied):
    spec = tiny(tie_embeddings=tied)
    model = backend.init(spec)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(shapes) == list(parameter_names(spec))  # same names, same order
    assert shapes == parameter_names(spec)
    assert sum(p.numel() for p in model.parameters()) == spec.parameter_count()


def test_init_is_seeded(backend):
    spec = tiny()
    a, b, c = backend.init(spec, seed=3), backend.init(spec, seed=3), backend.init(spec, seed=4)
    for (name, x), y, z in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values()
    ):
        assert torch.equal(x, y), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(x, z), name
        else:
            assert torch.equal(x, torch.ones_like(x))
    o_proj = a.model.layers[0].self_attn.o_proj.weight
    assert o_proj.std().item() == pytest.approx(0.02 / np.sqrt(2 * spec.n_layers), rel=0.1)


def naive_greedy(backend, model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding recomputing the full logits each step: what the KV cache must reproduce."""
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(backend.logits(model, np.array([tokens]))[0, -1].argmax()))
    return tokens[len(prompt) :]


@pytest.mark.parametrize("tied", [True, False])
def test_kv_cache_generation_equals_recomputing(backend, tied):
    from tests.cuda_model.conftest import perturbed

    spec = tiny(tie_embeddings=tied)
    model = perturbed(backend.init(spec, seed=1))  # where attention decides the continuation
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [40, 41, 42]]  # ragged: left padding must be invisible
    got = backend.generate(model, prompts, max_new_tokens=6)
    assert got == [naive_greedy(backend, model, p, 6) for p in prompts]
    assert got == [backend.generate(model, [p], max_new_tokens=6)[0] for p in prompts]


def test_kv_cache_logits_equal_full_forward(backend):
    spec = tiny()
    model = backend.init(spec, seed=2)
    tokens = torch.from_numpy(random_tokens(spec, (2, 10)))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(10)
        parts = [
            model(tokens[:, :4], None, cache),
            model(tokens[:, 4:5], None, cache),
            model(tokens[:, 5:], None, cache),
        ]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_generation_stops_and_samples_reproducibly(backend):
    model = backend.init(tiny(), seed=1)
    greedy = backend.generate(model, [[1, 2, 3]], max_new_tokens=8)[0]
    stopped = backend.generate(model, [[1, 2, 3]], max_new_tokens=8, stop_ids=[greedy[2]])[0]
    assert stopped == greedy[: greedy.index(greedy[2]) + 1]  # the stop id ends the row, included
    kwargs = {"max_new_tokens": 8, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    first, again = (backend.generate(model, [[1, 2, 3]], **kwargs) for _ in range(2))
    assert first == again
    nucleus = backend.generate(
        model, [[1, 2, 3]], seed=7, max_new_tokens=8, temperature=1.0, top_p=1e-6
    )
    assert nucleus == [greedy]  # a vanishing nucleus keeps only the most likely token


def test_generation_never_samples_special_ids(backend):
    spec = tiny(tie_embeddings=False).replace(vocab_size=600)  # the special block + 256 bytes fit
    plain, biased = backend.init(spec, seed=1), backend.init(spec, seed=1)
    named = {k: torch.from_numpy(v) for k, v in biased_toward_specials(spec).items()}
    biased.load_state_dict({**biased.state_dict(), **named})
    check_generation_never_samples_specials(backend, plain, biased, rows=16, seeds=20)


def test_document_mask_keeps_packed_documents_apart(backend):
    spec = tiny()
    model = backend.init(spec, seed=3)
    lengths = [5, 1, 8, 3]
    docs = [random_tokens(spec, (1, n), seed=i) for i, n in enumerate(lengths)]
    packed = np.concatenate(docs, axis=1)
    segments = np.concatenate([np.full((1, n), i) for i, n in enumerate(lengths)], axis=1)
    together = backend.logits(model, packed, segment_ids=segments)[0]
    alone = np.concatenate([backend.logits(model, d)[0] for d in docs])
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)
    # without the mask the later documents see the earlier ones
    assert not np.allclose(backend.logits(model, packed)[0], alone, atol=1e-3)


def test_too_long_sequence_is_refused(backend):
    spec = tiny(max_seq_len=16)
    model = backend.init(spec)
    with pytest.raises(ValueError, match="max_seq_len"):
        backend.logits(model, random_tokens(spec, (1, 17)))


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(backend, packed, monkeypatch):
    """torch.utils.checkpoint per block: the loss and every parameter's gradient as without it
    (fp32); a training forward runs each block twice (once again in backward), evaluation and
    generation once, and the state dict (the checkpoint) does not change."""
    from cuda_model.losses import get_loss
    from cuda_model.model import TransformerBlock

    calls, forward = [], TransformerBlock.forward

    def counted(block, *args):  # a method, not a hook: checkpoint's recompute runs no module hooks
        calls.extend([1] if block.self_attn.layer == 0 else [])
        return forward(block, *args)

    monkeypatch.setattr(TransformerBlock, "forward", counted)

    spec = tiny(tie_embeddings=False)
    tokens = torch.from_numpy(random_tokens(spec, (3, 17), seed=5))
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    if packed:
        batch["segment_ids"] = torch.tensor([[0] * 9 + [1] * 7] * 3)
    runs = []
    for recompute in (False, True):
        model = backend.init(spec, seed=0)
        model.model.activation_checkpointing = recompute
        calls.clear()
        model.train()
        loss, _ = get_loss("causal_lm")(model, batch)
        loss.backward()
        runs.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)))
        assert list(model.state_dict()) == list(parameter_names(spec))
        calls.clear()
        backend.logits(model, tokens.numpy())
        backend.generate(model, [[1, 2, 3]], max_new_tokens=2)
        assert len(calls) == 1 + 2  # no recomputation: one forward, a prefill and one decode step
    (loss_off, grads_off, calls_off), (loss_on, grads_on, calls_on) = runs
    assert (calls_off, calls_on) == (1, 2)
    assert loss_on == pytest.approx(loss_off, rel=1e-6)
    for name, g in grads_off.items():
        torch.testing.assert_close(grads_on[name], g, rtol=0, atol=1e-6, msg=name)
