"""Learning-rate schedules of `adn train`: the multi-step schedule of He et al. (2016) that the
reproduction uses, and the errors a user gets for milestones that cannot work."""

import pytest
import torch

from adn.cli import build_parser
from adn.vision.train_config import TrainConfig
from adn.training.optim import build_scheduler


def lrs_per_epoch(cfg: TrainConfig) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = build_scheduler(optimizer, cfg)
    lrs = []
    for _ in range(cfg.epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_multistep_drops_tenfold_at_each_milestone():
    lrs = lrs_per_epoch(TrainConfig(epochs=30, lr=0.1, lr_scheduler="multisteplr", lr_steps=(15, 23)))
    assert lrs[:15] == pytest.approx([0.1] * 15)
    assert lrs[15:23] == pytest.approx([0.01] * 8)
    assert lrs[23:] == pytest.approx([0.001] * 7)


def test_multistep_milestones_count_after_warmup():
    lrs = lrs_per_epoch(TrainConfig(epochs=10, lr=0.1, lr_scheduler="multisteplr", lr_steps=(4,), lr_warmup_epochs=2))
    assert lrs[0] < 0.1 and lrs[2:6] == pytest.approx([0.1] * 4) and lrs[6:] == pytest.approx([0.01] * 4)


def test_cli_reads_milestones_into_the_config():
    args = build_parser().parse_args(["train", "--lr-scheduler", "multisteplr", "--lr-steps", "15", "23"])
    assert args.lr_steps == [15, 23]
    assert TrainConfig(lr_steps=args.lr_steps).lr_steps == (15, 23)


@pytest.mark.parametrize(
    "steps, message",
    [((), "needs its milestones"), ((23, 15), "increasing"), ((15, 15), "increasing"), ((0, 15), "positive")],
)
def test_bad_milestones_are_refused_with_the_fix(steps, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(epochs=30, lr_scheduler="multisteplr", lr_steps=steps).validate()
