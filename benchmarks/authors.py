"""The authors' training loop (paper_code's scripts) in plain PyTorch, the reference of bench.py and experiments.py.

One model at a time: per step a dense `rand < p` batch with uniform values on [-1, 1] (one random
feature per sample for exactly-one-active data), labels ReLU(x) + sigma M x (sigma a parameter
where it is learned), a bias-free 100 -> d_mlp -> 100 ReLU MLP, torch.optim.AdamW (lr 3e-3, weight
decay 1e-2) with a cosine schedule, and `loss.item()` every step.
"""

from __future__ import annotations

import time

import torch


def training_seconds(
    p: float,
    batch: int,
    d_mlp: int,
    mixing: torch.Tensor,
    steps: int,
    warmup: int = 5,
    sigma: float = 1.0,
    learn_sigma: bool = False,
    one_active: bool = False,
) -> float:
    """Seconds of `steps` steps of the loop (timed after `warmup` steps) on labels ReLU(x) + sigma M x."""
    n = mixing.shape[0]
    generator = torch.Generator().manual_seed(0)
    w_in = torch.nn.Parameter(torch.empty(n, d_mlp))
    w_out = torch.nn.Parameter(torch.empty(d_mlp, n))
    torch.nn.init.kaiming_uniform_(w_in)
    torch.nn.init.kaiming_uniform_(w_out)
    scale = torch.nn.Parameter(torch.tensor(sigma)) if learn_sigma else None
    mixing = mixing if learn_sigma else sigma * mixing  # a fixed sigma scales M once
    optimizer = torch.optim.AdamW([w_in, w_out, *([scale] if learn_sigma else [])], lr=3e-3, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=warmup + steps)
    losses = []

    def step() -> None:
        if one_active:
            feature = torch.randint(n, (batch,), generator=generator)
            x = torch.zeros(batch, n)
            x[torch.arange(batch), feature] = torch.rand(batch, generator=generator) * 2 - 1
        else:
            mask = torch.rand(batch, n, generator=generator) < p
            x = (torch.rand(batch, n, generator=generator) * 2 - 1) * mask
        mixed = x @ mixing.T
        y = torch.relu(x) + (scale * mixed if learn_sigma else mixed)
        optimizer.zero_grad()
        loss = ((torch.relu(x @ w_in) @ w_out - y) ** 2).mean()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - start
