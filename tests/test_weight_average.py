"""The weight average the SFT stage can validate and publish (pagellm/train/weight_average.py)."""
import pytest
import torch

from pagellm.train.weight_average import WeightAverage


def _net(value: float) -> torch.nn.Linear:
    net = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(value)
    return net


def test_the_average_copies_the_first_weights_and_then_moves_by_one_minus_decay():
    net = _net(4.0)
    average = WeightAverage(net, decay=0.75)
    average.update(net)  # first update: a copy, no pull toward the init
    with torch.no_grad():
        net.weight.fill_(8.0)
    average.update(net)  # 0.75 * 4 + 0.25 * 8 = 5
    with torch.no_grad():
        net.weight.fill_(0.0)
    average.update(net)  # 0.75 * 5 + 0.25 * 0 = 3.75
    assert average.updates == 3
    assert torch.allclose(average.shadow["weight"], torch.full((1, 2), 3.75))


def test_applied_swaps_the_average_in_for_the_block_and_the_raw_weights_back():
    net = _net(2.0)
    average = WeightAverage(net, decay=0.5)
    average.update(net)
    with torch.no_grad():
        net.weight.fill_(6.0)
    average.update(net)  # 4.0
    x = torch.ones(1, 2)
    with average.applied(net):
        assert float(net(x)) == pytest.approx(8.0)  # 4 + 4
    assert float(net(x)) == pytest.approx(12.0)  # raw 6 + 6 again
    with pytest.raises(RuntimeError):
        with average.applied(net):
            raise RuntimeError("validation failed")
    assert torch.equal(net.weight, torch.full((1, 2), 6.0))  # restored on error too


def test_the_average_survives_a_save_and_load(tmp_path):
    net = _net(1.0)
    average = WeightAverage(net, decay=0.9)
    for value in (1.0, 3.0, 5.0):
        with torch.no_grad():
            net.weight.fill_(value)
        average.update(net)
    average.save(tmp_path)
    resumed = WeightAverage(_net(0.0), decay=0.9)
    assert resumed.load(tmp_path)
    assert resumed.updates == 3
    assert torch.equal(resumed.shadow["weight"], average.shadow["weight"])
    assert not WeightAverage(net, decay=0.9).load(tmp_path / "empty")


def test_a_decay_outside_the_open_unit_interval_is_refused():
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(_net(0.0), decay=1.0)


def test_the_next_item_average_under_zero3_fails_at_load():
    from pagellm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="meta_average_epochs"):
        load_config(None, ["sft.meta_average_epochs=1.0", "sft.zero_stage=3"])
    assert load_config(None, ["sft.meta_average_epochs=1.0", "sft.zero_stage=2"]).sft.meta_average_epochs == 1.0


def test_only_the_next_item_phase_averages_over_its_configured_epochs_of_steps():
    from pagellm.config import SFTConfig
    from pagellm.train.sft import phase_average

    net = _net(0.0)
    cfg = SFTConfig(meta_average_epochs=0.5)
    assert phase_average(cfg, "meta", net, steps_per_epoch=400).decay == pytest.approx(1 - 1 / 200)
    assert phase_average(cfg, "sft", net, steps_per_epoch=400) is None  # the page phase: raw weights
    assert phase_average(SFTConfig(), "meta", net, steps_per_epoch=400) is None  # off by default
    assert phase_average(cfg, "meta", net, steps_per_epoch=1).decay == pytest.approx(0.5)  # at least 2 steps
