"""The two models: shapes, per-instance seeds, and the residual = MLP + mixing equivalence."""

import pytest
import torch

from cis_lightning import MLP, Instance, ResidualMLP, Task, naive_loss_per_feature
from cis_lightning.core.loss import per_sample_loss
from cis_lightning.core.models import CCModel


@pytest.mark.parametrize(
    "model",
    [
        MLP(n_features=12, d_mlp=5, seeds=[0, 1, 2]),
        MLP(n_features=12, d_mlp=5, seeds=[0, 1, 2], hidden_bias=True, output_bias=True),
        MLP(n_features=12, d_mlp=5, seeds=[0, 1, 2], tied=True),
        ResidualMLP(n_features=12, d_embed=30, d_mlp=5, seeds=[0, 1, 2]),
        ResidualMLP(n_features=12, d_embed=30, d_mlp=5, n_layers=3, seeds=[0, 1, 2]),
    ],
)
def test_shapes(model: CCModel):
    x = torch.randn(3, 7, 12)
    assert model(x).shape == (3, 7, 12)
    w_in, w_out = model.effective_weights()
    assert w_in.shape == (3, model.n_neurons, 12)
    assert w_out.shape == (3, 12, model.n_neurons)
    assert model.effective_mixing().shape == (3, 12, 12)


def test_defaults_are_the_papers():
    residual = ResidualMLP()
    assert (residual.n_features, residual.d_embed, residual.d_mlp, residual.n_layers) == (100, 1000, 50, 1)
    assert residual.w_embed.requires_grad is False
    assert "w_embed" in residual.state_dict()
    mlp = MLP()
    assert (mlp.n_features, mlp.d_mlp, mlp.b_hidden, mlp.b_out) == (100, 50, None, None)


def test_instance_k_is_initialised_from_its_own_seed():
    many = ResidualMLP(n_features=10, d_embed=20, d_mlp=4, seeds=[4, 9])
    alone = ResidualMLP(n_features=10, d_embed=20, d_mlp=4, seeds=[9])
    assert torch.equal(many.w_in[1], alone.w_in[0])
    assert torch.equal(many.w_embed[1], alone.w_embed[0])
    assert not torch.equal(many.w_in[0], many.w_in[1])


def test_tied_mlp_uses_the_transpose_of_w_in():
    mlp = MLP(n_features=6, d_mlp=3, tied=True)
    w_in, w_out = mlp.effective_weights()
    assert torch.equal(w_out, w_in.transpose(1, 2))
    assert mlp.w_out is None


def test_mlp_forward_is_w_out_relu_w_in_x_plus_biases():
    mlp = MLP(n_features=4, d_mlp=2, hidden_bias=True, output_bias=True)
    with torch.no_grad():
        mlp.w_in.copy_(torch.tensor([[[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]]]))
        mlp.w_out.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.5, 0.0], [0.0, 0.0]]]))
        mlp.b_hidden.copy_(torch.tensor([[[0.0, -1.0]]]))
        mlp.b_out.copy_(torch.tensor([[[0.0, 0.0, 0.0, 0.25]]]))
    x = torch.tensor([[[0.5, 0.25, 1.0, -3.0]]])
    # hidden = ReLU([0.5 - 0.25, 2.0 - 1.0]) = [0.25, 1.0]; y = W_out hidden + b_out.
    assert torch.allclose(mlp(x), torch.tensor([[[0.25, 1.0, 0.125, 0.25]]]))


@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_folded_residual_forward_equals_the_residual_stream(n_layers):
    model = ResidualMLP(n_features=20, d_embed=64, d_mlp=6, n_layers=n_layers, seeds=[0, 1]).double()
    x = torch.randn(2, 33, 20, dtype=torch.float64)
    assert torch.allclose(model(x), model.forward_direct(x), atol=1e-10)


def test_residual_error_equals_mlp_error_against_the_embedding_mixing():
    """y_hat - (x + ReLU(x)) == W_out' ReLU(W_in' x) - (ReLU(x) + (I - W_E W_E^T) x)."""
    residual = ResidualMLP(n_features=30, d_embed=200, d_mlp=10, seeds=[0, 1]).double()
    data = Task([Instance(feature_probability=0.2), Instance(feature_probability=0.2, seed=1)], 30).double()
    x = data.sample(500, step=0).double()
    residual_error = residual(x) - (x + torch.relu(x))

    mlp = MLP(n_features=30, d_mlp=10, seeds=[0, 1]).double()
    w_in, w_out = residual.effective_weights()
    with torch.no_grad():
        mlp.w_in.copy_(w_in)
        mlp.w_out.copy_(w_out)
    m = residual.effective_mixing()
    mlp_error = mlp(x) - (torch.relu(x) + x @ m.transpose(1, 2))
    assert torch.allclose(residual_error, mlp_error, atol=1e-10)
    # The sign: M = I - G has zero diagonal and off-diagonal -G_ij.
    g = residual.w_embed @ residual.w_embed.transpose(1, 2)
    assert torch.allclose(m, torch.eye(30, dtype=torch.float64) - g)


def test_per_sample_loss_of_the_residual_model_uses_its_labels():
    residual = ResidualMLP(n_features=10, d_embed=40, d_mlp=3)
    data = Task([Instance(feature_probability=0.3)], 10)
    x = data.sample(64, step=0)
    expected = (residual(x) - (x + torch.relu(x))).pow(2).mean(dim=-1)
    assert torch.allclose(per_sample_loss(residual, data, x), expected)


@pytest.mark.parametrize(("n", "d", "expected"), [(100, 50, 1 / 12), (102, 51, 1 / 12), (10, 10, 0.0), (6, 0, 1 / 6)])
def test_naive_loss_per_feature(n, d, expected):
    assert naive_loss_per_feature(n, d) == pytest.approx(expected, abs=1e-15)


def test_the_residual_models_kept_gram_is_its_embeddings_after_loads_and_casts():
    """G = W_E W_E^T is kept between steps; it must be exactly what the model's W_E gives, also after
    a load of another embedding and a cast to float64 (a float32 G cast would not be)."""
    model = ResidualMLP(n_features=20, d_embed=30, d_mlp=4)

    def made(m: ResidualMLP) -> torch.Tensor:
        return m.w_embed @ m.w_embed.transpose(1, 2)

    assert torch.equal(model.gram(), made(model))
    other = ResidualMLP(n_features=20, d_embed=30, d_mlp=4, seeds=[5])
    model.load_state_dict(other.state_dict())
    assert torch.equal(model.gram(), made(other))
    model = model.double()
    assert model.gram().dtype == torch.float64 and torch.equal(model.gram(), made(model))
