import pytest
import torch
import torchvision

import adn
from adn.runtime.profile import count_macs, count_macs_by_hooks, measure_latency, profile_subnetworks


@pytest.fixture(scope="module")
def resnet50_rows():
    net = adn.convert(torchvision.models.resnet50()).eval()
    x = torch.randn(1, 3, 224, 224)
    return net, profile_subnetworks(net, x, latency=False)


def test_resnet50_macs_match_published_figures(resnet50_rows):
    _, rows = resnet50_rows
    macs = {r["skip"]: r["macs"] for r in rows}
    # torchvision: 4.09 GFLOPS (MACs) for ResNet-50; paper: ResNet50-ADN 4.11G super / 2.58G base.
    assert macs["FFFF"] == pytest.approx(4.09e9, rel=0.01)
    assert macs["TTTT"] / macs["FFFF"] == pytest.approx(2.58 / 4.11, rel=0.01)


def test_macs_drop_strictly_with_each_skipped_stage(resnet50_rows):
    _, rows = resnet50_rows
    macs = {r["skip"]: r["macs"] for r in rows}
    for config, value in macs.items():
        for i, flag in enumerate(config):
            if flag == "F":
                deeper_skip = config[:i] + "T" + config[i + 1 :]
                assert macs[deeper_skip] < value


def test_flop_counter_agrees_with_an_independent_count_from_layer_shapes(resnet50_rows):
    net, rows = resnet50_rows
    x = torch.randn(1, 3, 224, 224)
    for row in rows[::5]:
        assert row["macs"] == count_macs_by_hooks(net.subnet(row["skip"]), x)


def test_latency_rows_state_their_conditions():
    net = adn.convert(torchvision.models.resnet18(num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    rows = profile_subnetworks(net, x, skips=["FFFF", "TTTT"], warmup=1, repeats=3)
    for row in rows:
        assert row["latency_ms"] > 0 and row["batch_size"] == 2 and row["threads"] == torch.get_num_threads()
        assert row["latency_p10_ms"] <= row["latency_ms"] <= row["latency_p90_ms"]
        assert 0 <= row["switch_us"] < 1e5  # flag writes: far below a forward pass
    assert count_macs(net, x[:1]) == rows[0]["macs"]
    with pytest.raises(ValueError):
        measure_latency(net, x, repeats=0)
