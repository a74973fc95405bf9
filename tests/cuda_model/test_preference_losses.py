"""The preference losses (cuda_model/losses.py dpo, ipo, simper) against TRL's DPOTrainer formulas,
and their laws: log 2 at step 0, swapping chosen and rejected negates delta, prompts get no gradient."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cuda_model import losses
from tests.cuda_model.conftest import tiny

B, T = 5, 10


def pair_masks(rng, B: int, T: int, prompt: int = 3) -> np.ndarray:
    """[2B, T] masks [chosen; rejected]: 0 on the shared prompt's targets, 1 on an answer of random
    length, 0 on padding."""
    mask = np.zeros((2 * B, T), np.float32)
    for row in range(2 * B):
        mask[row, prompt : prompt + int(rng.integers(1, T - prompt + 1))] = 1.0
    return mask


def trl_loss(per_token, mask, ref_c, ref_r, loss_type, beta, weights=None, metrics=None):
    """TRL's DPOTrainer._compute_loss (installed trl) on given per-token log-probs [2B, T]: a stub
    trainer and a stub model whose output log_probs are `per_token` (TRL reads the answer tokens
    through completion_mask; here targets are already shifted, so a prompt column 0 is prepended)."""
    from trl import DPOTrainer

    rows = per_token.shape[0]
    completion = torch.cat([torch.zeros(rows, 1), mask], dim=1)
    outputs = SimpleNamespace(log_probs=per_token * mask, entropy=torch.zeros_like(per_token),
                              mean_logits=torch.zeros_like(per_token),
                              is_top1=torch.zeros_like(per_token, dtype=torch.bool))  # fmt: skip
    model = SimpleNamespace(training=True)
    accelerator = SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x)
    types = loss_type if isinstance(loss_type, list) else [loss_type]
    trainer = SimpleNamespace(model=model, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
                              precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=types,
                              loss_weights=weights or [1.0] * len(types), beta=beta, label_smoothing=0.0,
                              use_weighting=False, _metrics={"train": defaultdict(list) if metrics is None else metrics},
                              _total_train_tokens=0, _tp_size=1)  # fmt: skip
    inputs = {"input_ids": torch.zeros(rows, mask.shape[1] + 1, dtype=torch.long),
              "attention_mask": torch.ones(rows, mask.shape[1] + 1, dtype=torch.long),
              "completion_mask": completion, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}  # fmt: skip
    return DPOTrainer._compute_loss(trainer, lambda **_: outputs, inputs, return_outputs=False)


def ours(name, per_token, mask, ref_c, ref_r, beta, sft_weight=None):
    """Our per-pair loss from the same per-token log-probs, as the step sees it: sum / pairs."""
    logps, lengths = (per_token * mask).sum(-1), mask.sum(-1)
    c, r, nc, nr = logps[:B], logps[B:], lengths[:B], lengths[B:]
    if name == "dpo":
        per_pair = losses.dpo_pair_loss(c, r, ref_c, ref_r, torch.full((B,), beta))
    elif name == "ipo":
        per_pair = losses.ipo_pair_loss(c, r, ref_c, ref_r, torch.full((B,), beta), nc, nr)
    else:
        per_pair = losses.simper_pair_loss(c, r, nc, nr)
    if sft_weight is not None:
        per_pair = losses.with_sft(per_pair, {"sft_weight": torch.full((B,), sft_weight)}, c, nc)
    return per_pair.sum() / B


def random_logps(seed: int):
    rng = np.random.default_rng(seed)
    mask = torch.from_numpy(pair_masks(rng, B, T))
    per_token = torch.from_numpy(rng.uniform(-4.0, -0.01, (2 * B, T)).astype(np.float32))
    ref = torch.from_numpy(rng.normal(-12.0, 4.0, 2 * B).astype(np.float32))
    return per_token, mask, ref[:B], ref[B:]


def loss_and_grad(fn, per_token):
    leaf = per_token.clone().requires_grad_(True)
    loss = fn(leaf)
    loss.backward()
    return loss.item(), leaf.grad


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("name", "trl_name", "beta"), [("dpo", "sigmoid", 0.1), ("dpo", "sigmoid", 0.5),
                                                         ("ipo", "ipo", 0.1), ("ipo", "ipo", 1.0)])  # fmt: skip
def test_loss_and_gradient_equal_trl(seed, name, trl_name, beta):
    per_token, mask, ref_c, ref_r = random_logps(seed)
    want, want_grad = loss_and_grad(lambda x: trl_loss(x, mask, ref_c, ref_r, trl_name, beta), per_token)
    got, got_grad = loss_and_grad(lambda x: ours(name, x, mask, ref_c, ref_r, beta), per_token)
    assert got == pytest.approx(want, abs=1e-5, rel=1e-5)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-5, rtol=1e-5)


def test_sft_term_equals_trl_sigmoid_plus_sft():
    """With equal chosen lengths TRL's batch-mean NLL ('sft' loss) is the mean of our per-pair ones."""
    per_token, mask, ref_c, ref_r = random_logps(7)
    mask[:B] = 0.0
    mask[:B, 3:8] = 1.0
    trl = lambda x: trl_loss(x, mask, ref_c, ref_r, ["sigmoid", "sft"], 0.1, [1.0, 0.3])  # noqa: E731
    want, want_grad = loss_and_grad(trl, per_token)
    got, got_grad = loss_and_grad(lambda x: ours("dpo", x, mask, ref_c, ref_r, 0.1, 0.3), per_token)
    assert got == pytest.approx(want, abs=1e-5)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-5, rtol=1e-5)


def test_conservative_dpo_and_simper_equal_their_formulas():
    """TRL 1.16's sigmoid loss has no label smoothing and TRL has no SimPER: the papers' formulas in
    float64 (cDPO: Mitchell 2023; SimPER: Xiao et al. 2025, eq. 6) and their analytic gradients."""
    per_token, mask, ref_c, ref_r = random_logps(3)
    logps, lengths = (per_token * mask).sum(-1).double(), mask.sum(-1).double()
    c, r, nc, nr = logps[:B], logps[B:], lengths[:B], lengths[B:]
    beta, eps = 0.2, 0.15
    z = beta * ((c - ref_c.double()) - (r - ref_r.double()))
    sig = torch.sigmoid
    want = (-(1 - eps) * torch.log(sig(z)) - eps * torch.log(sig(-z))).numpy()
    got = losses.dpo_pair_loss(c.float(), r.float(), ref_c, ref_r, beta, eps).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    want = (-torch.exp(c / nc) + torch.exp(r / nr)).numpy()
    np.testing.assert_allclose(losses.simper_pair_loss(c.float(), r.float(), nc.float(), nr.float()).numpy(),
                               want, atol=1e-6)  # fmt: skip
    # d/dc of -exp(c/|c|) = -exp(c/|c|)/|c|, spread over the answer's tokens
    got_grad = loss_and_grad(lambda x: ours("simper", x, mask, ref_c, ref_r, 0.0) * B, per_token)[1]
    want_chosen = (-torch.exp(c / nc) / nc).float()[:, None] * mask[:B]
    torch.testing.assert_close(got_grad[:B], want_chosen, atol=1e-6, rtol=1e-5)


# ---- a real tiny model ---------------------------------------------------------------------------


def test_the_registered_losses_read_label_smoothing_and_report_simpers_rewards(model):
    """dpo takes each pair's label_smoothing from the batch (cDPO per pair); simper's rewards are the
    answers' mean token log-probs, its margin their difference."""
    batch = model_batch(4)
    with torch.no_grad():
        c, r, nc, nr = losses.pair_logps(model, batch)
        refs = (batch["ref_chosen_logps"], batch["ref_rejected_logps"], batch["beta"])
        smoothing = torch.tensor([0.0, 0.1, 0.3])
        summed, _, _ = losses.dpo(model, {**batch, "label_smoothing": smoothing})
        want = losses.dpo_pair_loss(c, r, refs[0], refs[1], refs[2], smoothing).sum()
        assert summed.item() == pytest.approx(want.item(), abs=1e-5)
        assert abs(summed.item() - losses.dpo(model, batch)[0].item()) > 1e-3
        _, _, metrics = losses.simper(model, batch)
    mean_c, mean_r = c / nc, r / nr
    for key, value in (("rewards/chosen", mean_c), ("rewards/rejected", mean_r), ("rewards/margins", mean_c - mean_r)):
        assert metrics[key].item() == pytest.approx(value.sum().item(), rel=1e-5), key


def model_batch(seed: int, rows: int = 3, length: int = 12, vocab: int = 97) -> dict[str, torch.Tensor]:
    """A pair batch of random tokens in the layout of cuda_model/losses.py (shared prompt per row)."""
    rng = np.random.default_rng(seed)
    chosen = rng.integers(0, vocab, (rows, length + 1))
    rejected = rng.integers(0, vocab, (rows, length + 1))
    rejected[:, :4] = chosen[:, :4]  # the same prompt
    mask = pair_masks(rng, rows, length)
    batch = {"inputs": chosen[:, :-1], "targets": chosen[:, 1:], "loss_mask": mask[:rows],
             "rejected_inputs": rejected[:, :-1], "rejected_targets": rejected[:, 1:],
             "rejected_mask": mask[rows:], "ref_chosen_logps": rng.normal(-40, 3, rows),
             "ref_rejected_logps": rng.normal(-40, 3, rows), "beta": np.full(rows, 0.1)}  # fmt: skip
    return {k: torch.from_numpy(np.asarray(v, np.int64 if v.dtype.kind == "i" else np.float32))
            for k, v in batch.items()}  # fmt: skip


@pytest.fixture(scope="module")
def model():
    from cuda_model.backend import TorchBackend

    return TorchBackend("cpu").init(tiny(), seed=0)


@pytest.mark.parametrize(("name", "trl_name"), [("dpo", "sigmoid"), ("ipo", "ipo")])
def test_model_batch_equals_trl(model, name, trl_name):
    """The registered loss on a tiny model's batch, and its parameter gradients, equal TRL's
    _compute_loss fed that model's per-token log-probs."""
    batch = model_batch(0)
    rows = batch["inputs"].shape[0]
    params = [p for p in model.parameters()]
    summed, count, *_ = losses.get_loss(name)(model, batch)
    ours_grads = torch.autograd.grad(summed / count, params)
    x = torch.cat([batch["inputs"], batch["rejected_inputs"]])
    y = torch.cat([batch["targets"], batch["rejected_targets"]])
    mask = torch.cat([batch["loss_mask"], batch["rejected_mask"]])
    per_token = losses.token_logprobs(model(x, None), y)
    global B
    saved, B = B, rows
    try:
        want = trl_loss(per_token, mask, batch["ref_chosen_logps"], batch["ref_rejected_logps"], trl_name, 0.1)
    finally:
        B = saved
    trl_grads = torch.autograd.grad(want, params)
    assert (summed / count).item() == pytest.approx(want.item(), abs=1e-5)
    for a, b in zip(ours_grads, trl_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), beta=st.floats(0.01, 5.0))
def test_dpo_is_log_2_when_reference_is_policy(model, seed, beta):
    batch = model_batch(seed)
    with torch.no_grad():
        c, r, _, _ = losses.pair_logps(model, batch)
    batch = {**batch, "ref_chosen_logps": c, "ref_rejected_logps": r, "beta": torch.full_like(c, beta)}
    summed, count, metrics = losses.dpo(model, batch)
    assert (summed / count).item() == pytest.approx(math.log(2), abs=1e-5)
    assert metrics["rewards/margins"].item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize(("name", "trl_name"), [("dpo", "sigmoid"), ("ipo", "ipo")])
def test_step_metrics_equal_trl_logged_metrics(model, name, trl_name):
    """The metrics a preference loss returns (summed over pairs; the step logs their means) equal
    what TRL's DPOTrainer logs for the same batch: rewards, margins, accuracies, log-probs."""
    batch = model_batch(2)
    rows = batch["inputs"].shape[0]
    with torch.no_grad():
        c, r, _, _ = losses.pair_logps(model, batch)  # references making pair 2 (only) a miss
        # rejected rewards not zero either: margins = chosen - rejected is told from chosen + rejected
        batch["ref_chosen_logps"] = c + torch.tensor([-1.0, 1.0, -1.0])
        batch["ref_rejected_logps"] = r + torch.tensor([0.5, -0.5, 0.2])
        _, count, ours = losses.get_loss(name)(model, batch)
        x = torch.cat([batch["inputs"], batch["rejected_inputs"]])
        y = torch.cat([batch["targets"], batch["rejected_targets"]])
        mask = torch.cat([batch["loss_mask"], batch["rejected_mask"]])
        per_token = losses.token_logprobs(model(x, None), y)
        global B
        saved, B = B, rows
        theirs = defaultdict(list)
        try:
            trl_loss(per_token, mask, batch["ref_chosen_logps"], batch["ref_rejected_logps"], trl_name, 0.1,
                     metrics=theirs)  # fmt: skip
        finally:
            B = saved
    names = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
             "logps/rejected")  # fmt: skip
    for key in names:
        assert (ours[key] / count).item() == pytest.approx(theirs[key][-1], abs=1e-5), key
    assert (ours["rewards/accuracies"] / count).item() == pytest.approx(2 / 3)
    assert (ours["lengths/chosen"] / count).item() == pytest.approx(batch["loss_mask"].sum(-1).mean().item())


@settings(max_examples=30, deadline=None)
@given(logps=st.lists(st.floats(-50, 0), min_size=4, max_size=4), beta=st.floats(0.01, 5.0))
def test_swapping_chosen_and_rejected_negates_delta(logps, beta):
    """L(c, r) - L(r, c) = -beta * delta exactly (log s(z) - log s(-z) = z)."""
    c, r, rc, rr = (torch.tensor([v], dtype=torch.float64) for v in logps)
    delta = (c - rc) - (r - rr)
    difference = losses.dpo_pair_loss(c, r, rc, rr, beta) - losses.dpo_pair_loss(r, c, rr, rc, beta)
    assert difference.item() == pytest.approx(-beta * delta.item(), abs=1e-9)


class LogitsModel(torch.nn.Module):
    """A 'model' whose logits are a parameter: d loss / d logits per position."""

    def __init__(self, rows: int, length: int, vocab: int):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.randn(rows, length, vocab))

    def forward(self, inputs, segment_ids=None):
        return self.logits


@pytest.mark.parametrize("name", ["dpo", "ipo", "simper"])
def test_prompt_tokens_get_zero_gradient(name):
    batch = model_batch(1, vocab=50)
    batch["label_smoothing"] = torch.full((3,), 0.1)
    batch["sft_weight"] = torch.full((3,), 0.5)
    fake = LogitsModel(6, 12, 50)
    summed, *_ = losses.get_loss(name)(fake, batch)
    summed.backward()
    mask = torch.cat([batch["loss_mask"], batch["rejected_mask"]]).bool()
    grad = fake.logits.grad.abs().sum(-1)
    assert grad[~mask].max().item() == 0.0
    assert grad[mask].min().item() > 0.0
