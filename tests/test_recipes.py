"""Training-recipe flags of torchvision's reference scripts, and the paper-scale commands started on a
tiny ImageNet-layout folder (they must start, take a few steps and stop cleanly)."""

import json

import pytest
import torch

import adn
from adn.vision.checkpoint import load_network
from adn.cli import main
from adn.vision.train_config import TrainConfig
from adn.training.optim import parameter_groups
from adn.vision.train import train
from tests.conftest import write_image_folder


def test_weight_decay_groups_follow_torchvision():
    net = adn.convert(adn.build_model("vit_small_images", num_classes=10, in_channels=1, image_size=28))
    cfg = TrainConfig(weight_decay=0.05, norm_weight_decay=0.0, bias_weight_decay=0.01, transformer_embedding_decay=0.0)
    groups = {g["weight_decay"]: {id(p) for p in g["params"]} for g in parameter_groups(net, cfg)}
    named = dict(net.named_parameters())
    assert id(named["encoder.pos_embedding"]) in groups[0.0] and id(named["class_token"]) in groups[0.0]
    twin = net.adn_stages[0].norms[0].twin
    assert id(twin.weight) in groups[0.0] and id(twin.bias) in groups[0.0]
    assert id(named["heads.head.bias"]) in groups[0.01] and id(named["heads.head.weight"]) in groups[0.05]
    assert sum(len(g) for g in groups.values()) == len(named)


def test_transformer_recipe_flags_train_and_resume_with_ema(tmp_path, fashion_dir):
    common = dict(
        model="vit_small_images",
        data="fashion-mnist",
        data_path=str(fashion_dir),
        output_dir=str(tmp_path / "run"),
        batch_size=16,
        max_steps_per_epoch=3,
        opt="adamw",
        lr=1e-3,
        weight_decay=0.05,
        norm_weight_decay=0.0,
        bias_weight_decay=0.0,
        transformer_embedding_decay=0.0,
        label_smoothing=0.1,
        mixup_alpha=0.2,
        cutmix_alpha=1.0,
        auto_augment="ta_wide",
        random_erase=0.25,
        clip_grad_norm=1.0,
        model_ema=True,
        model_ema_steps=1,
        lr_warmup_epochs=1,
        progress=False,
    )
    train(TrainConfig(epochs=2, **common))
    train(TrainConfig(epochs=3, resume=str(tmp_path / "run" / "checkpoint.pt"), **common))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert all("val_acc1_super_ema" in r and "val_acc1_base_ema" in r for r in log)
    assert all(r["train_loss"] == r["train_loss"] for r in log)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert "model_ema" in ckpt


PAPER_RECIPES = {  # abbreviated forms of docs/recipes.md, at batch 2 on a tiny folder
    "resnet50": ["--opt", "sgd", "--lr", "0.1", "--wd", "1e-4", "--lr-scheduler", "cosineannealinglr"],
    "mobilenet_v2": [
        "--opt",
        "sgd",
        "--lr",
        "0.045",
        "--wd",
        "4e-5",
        "--lr-scheduler",
        "steplr",
        "--lr-step-size",
        "1",
        "--lr-gamma",
        "0.98",
    ],
    "vit_b_16": [
        "--opt",
        "adamw",
        "--lr",
        "0.003",
        "--wd",
        "0.3",
        "--lr-warmup-epochs",
        "1",
        "--lr-warmup-method",
        "linear",
        "--label-smoothing",
        "0.11",
        "--mixup-alpha",
        "0.2",
        "--auto-augment",
        "ra",
        "--clip-grad-norm",
        "1",
        "--model-ema",
    ],
    "swin_t": [
        "--opt",
        "adamw",
        "--lr",
        "0.001",
        "--wd",
        "0.05",
        "--norm-weight-decay",
        "0.0",
        "--bias-weight-decay",
        "0.0",
        "--transformer-embedding-decay",
        "0.0",
        "--label-smoothing",
        "0.1",
        "--mixup-alpha",
        "0.8",
        "--cutmix-alpha",
        "1.0",
        "--auto-augment",
        "ta_wide",
        "--random-erase",
        "0.25",
        "--clip-grad-norm",
        "5.0",
        "--interpolation",
        "bicubic",
        "--model-ema",
    ],
}


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("imagenet"), classes=2, per_class=2, size=256)


@pytest.mark.parametrize("model", list(PAPER_RECIPES))
def test_paper_scale_recipes_start_and_stop_cleanly(model, tiny_imagenet, tmp_path):
    out = tmp_path / model
    args = [
        "train",
        "--model",
        model,
        "--data",
        "imagefolder",
        "--data-path",
        str(tiny_imagenet),
        "--epochs",
        "2",
        "-b",
        "2",
        "--max-steps-per-epoch",
        "1",
        "--method",
        "adn",
        "--output-dir",
        str(out),
        "--no-progress",
        *PAPER_RECIPES[model],
    ]
    assert main(args) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(r["steps"] == 1 for r in log)
    net, _ = load_network(out / "checkpoint.pt")
    assert net.num_stages == 4 or (model == "mobilenet_v2" and net.num_stages == 5)
