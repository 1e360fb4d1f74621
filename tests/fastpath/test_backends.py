"""The loss backends (`model.loss_backend`): the fast one equals the reference, and auto picks right.

The reference differentiates the network's own `forward` with autograd; `fastpath.mean_loss` is the
same loss with its backward written out. For every network and option the fast path takes, both
give the same losses and the same gradients (parameters and a learned sigma), in float64 to 1e-12
and in float32, as training runs, to float32 rounding.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cis_lightning import fastpath
from cis_lightning.backends import LOSS_BACKENDS, check_loss_backend, fast_path_problem, training_loss
from cis_lightning.core.errors import ConfigError
from cis_lightning.core.loss import mean_loss
from cis_lightning.core.mixing import Mixing
from cis_lightning.core.models import MLP, ResidualMLP
from cis_lightning.core.task import Instance, Task
from cis_lightning.lightning.cli import run
from tests.conftest import REPO, tiny_args

N = 30

NETWORKS = {
    "mlp": lambda k: MLP(n_features=N, d_mlp=8, seeds=list(range(k))),
    "tied mlp": lambda k: MLP(n_features=N, d_mlp=8, seeds=list(range(k)), tied=True),
    "residual": lambda k: ResidualMLP(n_features=N, d_embed=80, d_mlp=8, seeds=list(range(k))),
}


def _task(labels: str, k: int, p: float, one_active: bool = False) -> Task:
    settings = {
        "clean": {},
        "fixed M": {"sigma": 0.2, "mixing": Mixing("gaussian")},
        "learned sigma": {"sigma": 0.1, "learn_sigma": True, "mixing": Mixing("gaussian", symmetric=True)},
    }[labels]
    return Task([Instance(p / (1 + i), seed=i, **settings) for i in range(k)], N, one_active)


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Weights moved off their init, so that more ReLUs are active and gradients are not special."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return model


def _losses_and_gradients(loss_function, model, task, x):
    params = [p for p in [*model.parameters(), task.sigma] if p.requires_grad]
    losses = loss_function(model, task, x)
    weights = torch.linspace(0.5, 1.5, losses.shape[0], dtype=losses.dtype)  # instances weighted differently
    return losses.detach(), torch.autograd.grad((weights * losses).sum(), params)


CASES = [
    (network, labels, k, p, one_active)
    for network in NETWORKS
    for labels in ("clean", "fixed M", "learned sigma")
    for k in (1, 3)
    for p, one_active in ((0.01, False), (0.2, False), (0.0, True))  # sparse, the densest sparse draw, one active
]


@pytest.mark.parametrize("network, labels, k, p, one_active", CASES)
def test_the_fast_loss_equals_the_reference_in_losses_and_gradients(network, labels, k, p, one_active):
    model = _perturbed(NETWORKS[network](k)).double()
    task = _task(labels, k, p or 0.01, one_active).double()
    x = task.draw(512, step=3).to(torch.float64)
    assert task.draws_sparse and fastpath.one_layer_form(model, task) is not None  # the fast path takes it
    fast, fast_grads = _losses_and_gradients(fastpath.mean_loss, model, task, x)
    reference, reference_grads = _losses_and_gradients(mean_loss, model, task, x)
    torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-14)
    assert len(fast_grads) == len(reference_grads) >= 1
    for a, b in zip(fast_grads, reference_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("network", list(NETWORKS))
def test_the_fast_loss_equals_the_reference_in_float32(network):
    model, task = _perturbed(NETWORKS[network](2)), _task("learned sigma", 2, 0.05)
    x = task.draw(2048, step=1)
    fast, fast_grads = _losses_and_gradients(fastpath.mean_loss, model, task, x)
    reference, reference_grads = _losses_and_gradients(mean_loss, model, task, x)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-7)
    for a, b in zip(fast_grads, reference_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_auto_takes_the_fast_path_where_it_applies_and_the_reference_elsewhere():
    mlp, task, cpu = NETWORKS["mlp"](1), _task("clean", 1, 0.01), torch.device("cpu")
    assert fast_path_problem(mlp, task, cpu) is None
    assert training_loss("auto", None) is fastpath.mean_loss
    assert training_loss("reference", None) is mean_loss
    elsewhere = {
        "GPU": fast_path_problem(mlp, task, torch.device("cuda")),
        "DDP": fast_path_problem(mlp, task, cpu, world_size=2),
        "mixed precision": fast_path_problem(mlp, task, cpu, precision="bf16-mixed"),
        "float64": fast_path_problem(mlp.double(), task, cpu),
        "compile": fast_path_problem(mlp, task, cpu, compiled=True),
        "dense batches": fast_path_problem(mlp, _task("clean", 1, 0.5), cpu),
        "biases": fast_path_problem(MLP(n_features=N, d_mlp=8, hidden_bias=True), task, cpu),
        "two layers": fast_path_problem(ResidualMLP(n_features=N, d_embed=80, d_mlp=4, n_layers=2), task, cpu),
    }
    for setting, problem in elsewhere.items():
        assert problem is not None, setting
        assert training_loss("auto", problem) is mean_loss, setting
        with pytest.raises(ConfigError, match="model.loss_backend: fast does not apply here"):
            training_loss("fast", problem)


def test_a_subclass_with_its_own_forward_is_left_to_the_reference():
    class GeluMLP(MLP):
        def forward(self, x):
            return super().forward(x)

    assert fastpath.one_layer_form(GeluMLP(n_features=N, d_mlp=8), _task("clean", 1, 0.01)) is None


@pytest.mark.parametrize("value", ["bogus", "", None, 1])
def test_a_bad_backend_is_one_config_error_naming_the_field_and_the_values(value):
    with pytest.raises(ConfigError) as error:
        check_loss_backend(value)
    assert str(error.value) == f"model.loss_backend: must be one of auto, reference, fast; got {value!r}"
    assert LOSS_BACKENDS == ("auto", "reference", "fast")


def test_the_cli_refuses_a_bad_backend_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run(["fit", *tiny_args(tmp_path, steps=1), "--model.loss_backend", "bogus"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "cis: error: model.loss_backend: must be one of auto, reference, fast; got 'bogus'"


def test_the_cli_refuses_fast_where_it_does_not_apply(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(["fit", *tiny_args(tmp_path, steps=1), "--model.loss_backend", "fast", "--trainer.precision", "64-true"])
    assert "cis: error: model.loss_backend: fast does not apply here" in capsys.readouterr().err


def _fit(tmp_path: Path, backend: str, config: str, extra: list[str]):
    args = tiny_args(tmp_path / backend, config, steps=8, log_every_n_steps=None)
    cli = run(["fit", *args, "--trainer.limit_val_batches", "0", "--model.loss_backend", backend, *extra])
    return cli, torch.load(Path(cli.trainer.log_dir) / "weights.pt", weights_only=True)


@pytest.mark.parametrize(
    "config, extra",
    [
        ("configs/mlp_gaussian.yaml", ["--data.learn_sigma", "true"]),
        ("configs/compressed_computation.yaml", ["--model.network.init_args.d_embed", "64"]),
    ],
)
def test_fit_with_either_backend_trains_the_same_weights(tmp_path, config, extra):
    """Eight AdamW steps from the same batches: the same weights up to float32 rounding."""
    auto, auto_weights = _fit(tmp_path, "auto", config, extra)
    reference, reference_weights = _fit(tmp_path, "reference", config, extra)
    assert (auto.model.training_backend, reference.model.training_backend) == ("fast", "reference")
    for part in ("network", "task"):
        for name, value in auto_weights[part].items():
            torch.testing.assert_close(value, reference_weights[part][name], rtol=1e-4, atol=1e-5)


def test_the_core_does_not_import_the_fast_path():
    """Models, data, mixing and evaluation are usable (and deletable from the fast path) on their own."""
    code = (
        "import sys, cis_lightning, cis_lightning.core.models, cis_lightning.core.task, cis_lightning.evaluation, "
        "cis_lightning.core.mixing, cis_lightning.core.baselines, cis_lightning.analysis; "
        "print('cis_lightning.fastpath' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
