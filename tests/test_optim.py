"""cis_lightning.optim.AdamW is torch's fused AdamW: the same updates, bit for bit, and the same state."""

from __future__ import annotations

import pytest
import torch

from cis_lightning import optim
from cis_lightning.optim import AdamW


def _parameters(seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(2, 5, 3, generator=generator)) for _ in range(3)]


def _train(optimizer_class, steps: int = 30, **options) -> tuple[list[torch.Tensor], dict]:
    """Steps of a quadratic loss, in two parameter groups (the second without weight decay, like a
    learned sigma), under a cosine schedule; returns the parameters and the optimizer's state dict."""
    a, b, c = _parameters()
    optimizer = optimizer_class(
        [{"params": [a, b]}, {"params": [c], "lr": 1e-3, "weight_decay": 0.0}], lr=3e-2, weight_decay=1e-2, **options
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    target = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(9))

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = sum(((p - target) ** 3).abs().sum() for p in (a, b, c))
        loss.backward()
        return loss

    for _ in range(steps):
        optimizer.step(closure)
        schedule.step()
    return [a.detach(), b.detach(), c.detach()], optimizer.state_dict()


def test_steps_equal_torchs_fused_adamw_bit_for_bit_and_so_does_the_state(monkeypatch):
    fallbacks = []
    torch_step = optim._torch_step
    monkeypatch.setattr(optim, "_torch_step", lambda: fallbacks.append(1) or torch_step())
    ours, our_state = _train(AdamW)
    assert len(fallbacks) == 1  # only the first step, which creates the state, is torch's
    theirs, their_state = _train(torch.optim.AdamW, fused=True)
    assert all(torch.equal(x, y) for x, y in zip(ours, theirs, strict=True))
    assert our_state["param_groups"] == their_state["param_groups"]
    for key, state in their_state["state"].items():
        assert state.keys() == our_state["state"][key].keys()
        assert all(torch.equal(state[name], our_state["state"][key][name]) for name in state)


def test_a_torch_checkpoint_of_the_optimizer_loads_and_continues_identically():
    params, state = _train(torch.optim.AdamW, steps=5, fused=True)
    for optimizer_class in (AdamW, torch.optim.AdamW):
        copies = [p.clone().requires_grad_() for p in params]
        optimizer = optimizer_class(
            [{"params": copies[:2]}, {"params": copies[2:], "lr": 1e-3, "weight_decay": 0.0}], lr=3e-2, fused=True
        )
        for p in copies:
            p.grad = torch.ones_like(p)
        optimizer.step()  # state of its own, then the checkpoint's replaces it
        optimizer.step()
        with torch.no_grad():
            for p, original in zip(copies, params, strict=True):
                p.copy_(original)
        optimizer.load_state_dict(state)
        optimizer.step()
        if optimizer_class is AdamW:
            ours = [p.detach().clone() for p in copies]
    assert all(torch.equal(x, y.detach()) for x, y in zip(ours, copies, strict=True))


@pytest.mark.parametrize("option", ["amsgrad", "maximize"])
def test_options_it_does_not_shortcut_take_torchs_step(option, monkeypatch):
    fallbacks = []
    torch_step = optim._torch_step
    monkeypatch.setattr(optim, "_torch_step", lambda: fallbacks.append(1) or torch_step())
    ours, _ = _train(AdamW, **{option: True})
    assert len(fallbacks) == 30
    theirs, _ = _train(torch.optim.AdamW, fused=True, **{option: True})
    assert all(torch.equal(x, y) for x, y in zip(ours, theirs, strict=True))


def test_a_parameter_without_gradient_is_left_alone_as_torch_does():
    a, b = _parameters()[:2]
    optimizer = AdamW([a, b], lr=0.1)
    before = b.detach().clone()
    for _ in range(3):
        optimizer.zero_grad()
        a.sum().backward()  # b gets no gradient
        optimizer.step()
    assert torch.equal(b.detach(), before) and b not in optimizer.state
    assert a.grad is not None
    optimizer.zero_grad()
    assert a.grad is None


def test_step_hooks_run_around_the_step_as_torch_runs_them():
    a = _parameters()[0]
    optimizer = AdamW([a], lr=0.1)
    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append(("pre", float(a.detach().sum()))))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append(("post", float(a.detach().sum()))))
    for _ in range(2):
        optimizer.zero_grad()
        a.sum().backward()
        optimizer.step()
    assert [name for name, _ in calls] == ["pre", "post", "pre", "post"]
    assert calls[0][1] != calls[1][1] == calls[2][1] != calls[3][1]  # each step moved a between its hooks


def test_a_copied_optimizer_steps_its_own_state():
    import copy

    a = _parameters()[0]
    optimizer = AdamW([a], lr=0.1)
    for _ in range(2):
        a.grad = torch.ones_like(a)
        optimizer.step()
    twin = copy.deepcopy(optimizer)
    twin_a = twin.param_groups[0]["params"][0]
    twin_a.grad = torch.ones_like(twin_a)
    twin.step()
    assert torch.equal(twin.state[twin_a]["step"], torch.tensor(3.0))
    assert torch.equal(optimizer.state[a]["step"], torch.tensor(2.0))  # the original's state is untouched
