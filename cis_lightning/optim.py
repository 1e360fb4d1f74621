"""torch's fused AdamW with less Python around its kernel.

A training step of the CC model costs about a millisecond on a CPU, and `torch.optim.AdamW.step`
spends a sizeable part of that in Python around its one fused kernel (grouping the tensors by device
and dtype, gathering the state, dynamo guards). `AdamW` is torch's AdamW (same class tree, same state
and state dict, so checkpoints load either way) whose step calls that kernel itself once the state
exists. Anything its shortcut does not cover (the first step, which creates the state, AMSGrad,
maximize, a tensor learning rate, a parameter without gradient, ...) takes torch's own step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks


class AdamW(torch.optim.AdamW):
    """`torch.optim.AdamW(..., fused=True)`, stepping through `torch._fused_adamw_` directly."""

    def __init__(self, params, **kwargs):
        kwargs["fused"] = True
        super().__init__(params, **kwargs)
        self._kept_state: dict[int, tuple] = {}  # id(group) -> (its params, their count, `_group_state`)

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        if _has_hooks(self):
            return _HOOKED_STEP(self, closure)
        return self._step(closure)

    # torch wraps every optimizer's step in a profiler range and the calls of its step hooks; this
    # one makes those calls only when a hook exists (a profiler range costs tens of us per step here).
    step.hooked = True

    def _step(self, closure: Callable[[], Tensor] | None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            work = [self._fused_arguments(group) for group in self.param_groups]
            if any(arguments is None for arguments in work):
                _torch_step()(self)
                return loss
            for tensors, options in work:
                torch._foreach_add_(tensors[-1], 1)  # the step counts
                torch._fused_adamw_(*tensors, **options)
        return loss

    def _fused_arguments(self, group: dict) -> tuple[list, dict] | None:
        """(params, grads, exp_avgs, exp_avg_sqs, [], steps) and the options of one group, or None
        where torch's own step is needed."""
        if group["amsgrad"] or group["maximize"] or group["capturable"] or group["differentiable"]:
            return None
        lr, (beta1, beta2) = group["lr"], group["betas"]
        if isinstance(lr, Tensor) or isinstance(beta1, Tensor) or isinstance(beta2, Tensor):
            return None
        params = group["params"]
        grads = [p.grad for p in params]
        if any(g is None or g.is_sparse for g in grads):
            return None
        state = self._group_state(group)
        if state is None:
            return None
        options = {
            "lr": lr,
            "beta1": beta1,
            "beta2": beta2,
            "weight_decay": group["weight_decay"],
            "eps": group["eps"],
            "amsgrad": False,
            "maximize": False,
            "grad_scale": None,
            "found_inf": None,
        }
        return [params, grads, *state], options

    def _group_state(self, group: dict) -> tuple[list, list, list, list] | None:
        """(exp_avgs, exp_avg_sqs, [], steps) of a group, kept until the state is loaded anew; None
        before the first step (which creates the state) or where torch would group the tensors."""
        params = group["params"]
        kept = self._kept_state.get(id(group))
        if kept is not None and kept[0] is params and kept[1] == len(params):
            return kept[2]
        if not params or any(p.device != params[0].device or p.dtype != params[0].dtype for p in params):
            return None  # torch groups these by device and dtype
        states = [self.state.get(p) for p in params]
        if any(not state for state in states):
            return None
        state = (
            [state["exp_avg"] for state in states],
            [state["exp_avg_sq"] for state in states],
            [],
            [state["step"] for state in states],
        )
        self._kept_state[id(group)] = (params, len(params), state)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._kept_state = {}  # torch pickles and copies only defaults, state and param groups

    def load_state_dict(self, state_dict: dict) -> None:
        self._kept_state = {}  # the loaded state has new tensors
        super().load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        # torch's zero_grad with set_to_none, without its profiler range.
        if not set_to_none:
            return super().zero_grad(set_to_none=False)
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None


def _has_hooks(optimizer: torch.optim.Optimizer) -> bool:
    return bool(
        _global_optimizer_pre_hooks
        or _global_optimizer_post_hooks
        or optimizer._optimizer_step_pre_hooks
        or optimizer._optimizer_step_post_hooks
    )


_HOOKED_STEP = torch.optim.Optimizer.profile_hook_step(AdamW._step)


def _torch_step() -> Callable:
    """torch's AdamW step without the hooks and profiling that torch wraps around every step method
    (they already ran around this class's own step)."""
    step = torch.optim.AdamW.step
    while getattr(step, "hooked", False):
        step = step.__wrapped__
    return step
