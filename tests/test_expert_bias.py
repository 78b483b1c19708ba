"""Aux-loss-free balancing: the documented expert-bias update rule."""
import os

import numpy as np
import mindspore as ms
import pytest

import mindspore_moe_ep as mee

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "yaml_configs", "tiny.yaml")


def test_update_moves_bias_against_the_observed_load():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    config = mee.load_config(TINY, expert_bias=True, bias_update_rate=0.01)
    layer = mee.MoELayer(config)
    x = np.random.default_rng(0).standard_normal((32, config.model.hidden_size)).astype(np.float32)
    layer(ms.Tensor(x))
    load = layer.stats()["routed_per_expert"].astype(np.float64)
    assert load.sum() == 32 * config.router.top_k and load.max() > load.min()
    before = layer.router.expert_bias.asnumpy().astype(np.float64)
    layer.update_expert_bias()
    after = layer.router.expert_bias.asnumpy().astype(np.float64)
    expected = before + 0.01 * np.sign(load.mean() - load)
    np.testing.assert_allclose(after, expected, atol=1e-7)
    assert (after[load > load.mean()] < before[load > load.mean()]).all()   # overloaded: down


def test_update_needs_expert_bias_enabled():
    layer = mee.MoELayer(mee.load_config(TINY, expert_bias=False))
    with pytest.raises(ValueError, match="router.expert_bias"):
        layer.update_expert_bias()


def test_explicit_load_must_have_one_count_per_expert():
    layer = mee.MoELayer(mee.load_config(TINY, expert_bias=True))
    with pytest.raises(ValueError, match="one count per expert"):
        layer.update_expert_bias(np.ones(3))
