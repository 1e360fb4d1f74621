"""The task: input distribution, labels, instances and reproducibility of the stream."""

import math

import pytest
import torch

from cis_lightning import ConfigError, Instance, Mixing, Stream, Task, expand_grid
from cis_lightning.core.task import nonempty_probability

N = 100


def task(*instances: Instance, exactly_one_active: bool = False) -> Task:
    return Task(list(instances) or [Instance()], N, exactly_one_active)


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 1.0])
def test_activation_frequency_is_p(p):
    x = task(Instance(feature_probability=p)).sample(8192, step=0)
    frequency = (x != 0).double().mean().item()
    # 819,200 Bernoulli(p) entries: 6 standard deviations of the mean.
    assert abs(frequency - p) < 6 * math.sqrt(p * (1 - p) / x.numel()) + 1e-12


@pytest.mark.parametrize("p", [0.01, 0.5])
def test_active_values_are_uniform_on_minus_one_one(p):
    x = task(Instance(feature_probability=p)).sample(8192, step=1)
    values = x[x != 0].double()
    assert values.min() >= -1 and values.max() <= 1
    # U[-1, 1]: mean 0, variance 1/3; 6 standard errors.
    se = math.sqrt(1 / 3 / values.numel())
    assert abs(values.mean().item()) < 6 * se
    assert abs(values.pow(2).mean().item() - 1 / 3) < 6 * math.sqrt(4 / 45 / values.numel())


def test_exactly_one_active_has_one_feature_per_sample_spread_uniformly():
    x = task(exactly_one_active=True).sample(20000, step=0)
    assert torch.equal((x != 0).sum(dim=-1), torch.ones(1, 20000, dtype=torch.long))
    counts = (x != 0).sum(dim=(0, 1)).double()
    # Multinomial(20000, 1/100): each count 200 +- 14; allow 6 standard deviations.
    assert (counts - 200).abs().max() < 6 * math.sqrt(200 * 0.99)


def test_empty_samples_are_kept():
    x = task(Instance(feature_probability=0.001)).sample(10000, step=0)
    empty = ((x != 0).sum(dim=-1) == 0).double().mean().item()
    expected = (1 - 0.001) ** N
    assert abs(empty - expected) < 6 * math.sqrt(expected * (1 - expected) / 10000)


def test_nonempty_probability_formula():
    assert math.isclose(nonempty_probability(0.01, 100).item(), 1 - 0.99**100, rel_tol=1e-12)


def test_same_seed_and_step_draw_the_same_batch_and_other_steps_differ():
    t = task()
    assert torch.equal(t.sample(512, step=7), t.sample(512, step=7))
    assert not torch.equal(t.sample(512, step=7), t.sample(512, step=8))
    assert not torch.equal(t.sample(512, step=7, stream=Stream.TRAIN), t.sample(512, step=7, stream=Stream.TEST))


@pytest.mark.parametrize("p", [0.01, 0.5])
def test_ranks_draw_disjoint_rows_of_the_same_global_batch(p):
    t = task(Instance(feature_probability=p))
    whole = t.sample(1024, step=3)
    parts = [t.sample(1024, step=3, rank=r, world_size=4) for r in range(4)]
    assert torch.equal(torch.cat(parts, dim=1), whole)


def test_instance_draws_do_not_depend_on_the_other_instances():
    alone = task(Instance(seed=5, feature_probability=0.02)).sample(1024, step=2)
    together = task(Instance(seed=1), Instance(seed=5, feature_probability=0.02)).sample(1024, step=2)
    assert torch.equal(together[1], alone[0])


@pytest.mark.parametrize("p", [0.01, 0.5])
def test_an_instance_at_probability_zero_draws_nothing_and_leaves_the_others_alone(p):
    """A frozen instance of an equal-non-empty-samples run is drawn at p = 0 (`CCDataModule`)."""
    pair = task(Instance(seed=5, feature_probability=p), Instance(seed=1, feature_probability=1.0))
    x = pair.sample(1024, step=4, feature_probability=[p, 0.0])
    assert torch.count_nonzero(x[1]) == 0
    assert torch.equal(x[0], task(Instance(seed=5, feature_probability=p)).sample(1024, step=4)[0])


def test_labels_are_relu_plus_sigma_m_x():
    t = task(Instance(sigma=0.5, mixing=Mixing(kind="gaussian")))
    x = t.sample(64, step=0)
    m = t.mixing[0]
    expected = torch.relu(x[0]) + 0.5 * x[0] @ m.T
    assert torch.allclose(t.labels(x)[0], expected, atol=1e-6)
    assert torch.allclose(t.labels(x, residual=True)[0], expected + x[0], atol=1e-6)


def test_labels_of_a_hand_made_input():
    t = task(Instance(sigma=2.0, mixing=Mixing(kind="gaussian")))
    t.mixing.zero_()
    t.mixing[0, 1, 0] = 1.0  # feature 0 leaks into output 1
    x = torch.zeros(1, 1, N)
    x[0, 0, 0] = -0.5
    y = t.labels(x)
    assert y[0, 0, 0] == 0.0  # ReLU(-0.5)
    assert y[0, 0, 1] == pytest.approx(2.0 * -0.5)


def test_learned_sigma_gets_a_gradient_and_fixed_sigma_does_not():
    t = task(
        Instance(sigma=0.1, learn_sigma=True, mixing=Mixing(kind="gaussian")),
        Instance(sigma=0.1, mixing=Mixing(kind="gaussian")),
    )
    x = t.sample(256, step=0)
    t.labels(x).pow(2).sum().backward()
    assert t.sigma.grad[0] != 0
    assert t.sigma.grad[1] == 0


def test_grid_is_the_cartesian_product_with_the_last_key_fastest():
    base = Instance(sigma=0.0)
    grid = {"sigma": [0.01, 0.02], "mixing.symmetric": [True, False], "seed": [3]}
    instances = expand_grid(base, grid)
    assert [(i.sigma, i.mixing.symmetric, i.seed) for i in instances] == [
        (0.01, True, 3),
        (0.01, False, 3),
        (0.02, True, 3),
        (0.02, False, 3),
    ]


@pytest.mark.parametrize(
    ("instance", "field"),
    [
        (Instance(feature_probability=0.0), "data.feature_probability"),
        (Instance(feature_probability=1.5), "data.feature_probability"),
        (Instance(sigma=-0.1), "data.sigma"),
        (Instance(seed=-1), "data.seed"),
        (Instance(mixing=Mixing(kind="low_rank", rank=0)), "data.mixing.rank"),
    ],
)
def test_bad_instance_settings_name_their_field(instance, field):
    with pytest.raises(ConfigError) as error:
        task(instance)
    assert error.value.field == field


def test_unknown_grid_key_is_refused():
    with pytest.raises(ConfigError) as error:
        expand_grid(Instance(), {"sigmas": [0.1]})
    assert error.value.field == "data.grid.sigmas"


def test_the_kept_stream_key_follows_seeds_loaded_into_the_task():
    """Task keeps the per-stream part of the key; loading other seeds (a checkpoint) must renew it."""
    a, b = Task([Instance(seed=1)], 20), Task([Instance(seed=2)], 20)
    before = a.sample(64, step=3)
    a.load_state_dict(b.state_dict())
    assert torch.equal(a.sample(64, step=3), b.sample(64, step=3))
    assert not torch.equal(before, b.sample(64, step=3))


@pytest.mark.parametrize("one_active", [False, True])
def test_predict_draws_dense_batches_of_the_input_distribution(one_active):
    """predict covers about eval_nonempty_samples non-empty samples in dense batches, also where every
    evaluation stratum is exact (exactly one active feature and a bias-free model)."""
    import lightning.pytorch as pl

    from cis_lightning.lightning.datamodule import CCDataModule

    data = CCDataModule(n_features=20, exactly_one_active=one_active, eval_nonempty_samples=3000, eval_batch_size=1024)
    data.exact_strata = (0, 1)
    data.trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    batches = [data.on_after_batch_transfer(b, 0) for b in data.predict_dataloader()]
    n_samples = sum(x.shape[1] for x in batches)
    expected = 3000 if one_active else 3000 / (1 - 0.99**20)
    assert expected <= n_samples < expected + 1024
