"""Importing the ADN weights the paper's authors published, without their files.

tests/data/authors-weights/<arch>.txt (copies of shared/authors-weights/) list every key and shape of
the authors' models next to ours. State dicts in their layout are built from those lists (random tensors
of the listed shapes) and imported; every tensor must land where the list says. ResNet-50 and
MobileNetV2 are imported for real and every sub-network is run; ViT-B/16 and Swin-T (86M and 28M
parameters) are checked on the meta device: names and shapes, no memory."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import torch

import adn
from adn.vision.authors import build_network, check_fits, import_authors_weights, rename_key, rename_state_dict
from adn.errors import CheckpointError
from adn.vision.checkpoint import load_network, validate_meta
from adn.cli import main

LISTS = Path(__file__).parent / "data" / "authors-weights"
ARCHITECTURES = ("resnet50", "mobilenet_v2", "vit_b_16", "swin_t")
LINE = re.compile(r"^(\S+)\s+\(([^)]*)\)\s+->\s+(\S+)\s+\(([^)]*)\)")


def key_list(arch: str) -> list[tuple[str, tuple, str, tuple]]:
    """(their key, their shape, our key, our shape) for every line of the list."""
    rows = []
    for line in (LISTS / f"{arch}.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        theirs, their_shape, ours, our_shape = LINE.match(line).groups()
        rows.append((theirs, _shape(their_shape), ours, _shape(our_shape)))
    return rows


def _shape(text: str) -> tuple:
    return tuple(int(x) for x in text.replace(",", " ").split())


def authors_state_dict(arch: str, device: str = "cpu") -> dict:
    """A state dict in the authors' layout: small random values (so that deep nets stay finite), positive
    running variances, integer batch counters."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for theirs, shape, _, _ in key_list(arch):
        if device == "meta" or theirs.endswith("relative_position_index"):
            state[theirs] = (
                torch.zeros(shape, dtype=torch.long, device=device)
                if theirs.endswith(("num_batches_tracked", "relative_position_index"))
                else torch.empty(shape, device=device)
            )
        elif theirs.endswith("num_batches_tracked"):
            state[theirs] = torch.tensor(7)
        elif theirs.endswith("running_var"):
            state[theirs] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[theirs] = torch.randn(shape, generator=generator) * 0.02
    return state


@pytest.fixture(scope="module")
def resnet50_import():
    state = authors_state_dict("resnet50")
    return state, import_authors_weights(state, "resnet50")


@pytest.fixture(scope="module")
def mobilenet_state():
    return authors_state_dict("mobilenet_v2")


# ----- the renaming rules against the lists ---------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_listed_key_is_renamed_as_the_list_says(arch):
    rows = key_list(arch)
    assert rows, f"empty key list for {arch}"
    wrong = [
        (theirs, rename_key(theirs, arch), ours) for theirs, _, ours, _ in rows if rename_key(theirs, arch) != ours
    ]
    assert not wrong, f"{len(wrong)} keys renamed wrongly, e.g. {wrong[:3]}"
    assert len({ours for _, _, ours, _ in rows}) == len(rows)  # one-to-one


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_renamed_keys_and_shapes_are_exactly_our_models(arch):
    with torch.device("meta"):  # names and shapes only: no memory for 86M parameters
        net = build_network(arch)
    own = net.state_dict()
    rows = key_list(arch)
    assert {ours for _, _, ours, _ in rows} == set(own)
    assert all(tuple(own[ours].shape) == shape == their_shape for _, their_shape, ours, shape in rows)
    check_fits(net, rename_state_dict(authors_state_dict(arch, device="meta"), arch), arch, "test")


# ----- importing for real ---------------------------------------------------------------------------------------
def test_resnet50_every_tensor_lands_where_the_list_says(resnet50_import):
    state, net = resnet50_import
    _assert_landed(state, net, "resnet50")


def test_mobilenet_v2_every_tensor_lands_where_the_list_says(mobilenet_state):
    _assert_landed(mobilenet_state, import_authors_weights(mobilenet_state, "mobilenet_v2"), "mobilenet_v2")


def _assert_landed(state: dict, net, arch: str) -> None:
    own = net.state_dict()
    for theirs, _, ours, _ in key_list(arch):
        assert torch.equal(own[ours], state[theirs]), f"{theirs} did not land in {ours}"


def test_resnet50_every_subnetwork_runs(resnet50_import):
    _assert_every_subnetwork_runs(resnet50_import[1], 64)


def test_mobilenet_v2_every_subnetwork_runs(mobilenet_state):
    _assert_every_subnetwork_runs(import_authors_weights({"model": mobilenet_state}, "mobilenet_v2"), 64)


def _assert_every_subnetwork_runs(net, size: int) -> None:
    image = torch.randn(1, 3, size, size)
    with torch.no_grad():
        for config in adn.SkipConfig.all(net.num_stages):
            net.skip = config
            out = net(image)
            assert out.shape == (1, 1000) and bool(out.isfinite().all()), str(config)


# ----- file layouts ---------------------------------------------------------------------------------------------
def test_training_file_entries_model_and_ema(mobilenet_state):
    ema = {"module." + k: v + 1 if v.is_floating_point() else v for k, v in mobilenet_state.items()}
    ema["n_averaged"] = torch.tensor(3)
    key, ours = "classifier.1.bias", "classifier.1.bias"
    from_ema = import_authors_weights({"model_ema": ema}, "mobilenet_v2")
    assert torch.equal(from_ema.state_dict()[ours], mobilenet_state[key] + 1)
    both = {"model": mobilenet_state, "model_ema": ema, "epoch": 3, "optimizer": {"state": {}, "param_groups": []}}
    assert torch.equal(import_authors_weights(both, "mobilenet_v2").state_dict()[ours], mobilenet_state[key])
    chosen = import_authors_weights(both, "mobilenet_v2", which="model_ema")
    assert torch.equal(chosen.state_dict()[ours], mobilenet_state[key] + 1)


def test_other_layouts_are_refused_clearly(mobilenet_state):
    with pytest.raises(CheckpointError, match="no 'model' or 'model_ema' entry.*'weights'"):
        import_authors_weights({"weights": mobilenet_state, "epoch": 1}, "mobilenet_v2")
    with pytest.raises(CheckpointError, match="no 'model_ema' entry.*--which model"):
        import_authors_weights({"model": mobilenet_state}, "mobilenet_v2", which="model_ema")
    with pytest.raises(ValueError, match="plain state dict.*drop --which"):
        import_authors_weights(mobilenet_state, "mobilenet_v2", which="model")
    with pytest.raises(CheckpointError, match="holds a list"):
        import_authors_weights([1, 2], "mobilenet_v2")
    with pytest.raises(ValueError, match="published weights for resnet50"):
        import_authors_weights(mobilenet_state, "resnet18")


# ----- keys that do not fit are named ---------------------------------------------------------------------------
def test_missing_extra_and_misshaped_keys_are_named(mobilenet_state):
    missing = dict(mobilenet_state)
    del missing["features.3.1.conv.1.norm_skip.weight"]
    with pytest.raises(CheckpointError, match=r"1 missing key.*features\.5\.conv\.1\.1\.twin\.weight"):
        import_authors_weights(missing, "mobilenet_v2")
    extra = {**mobilenet_state, "features.9.extra.weight": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=r"1 unexpected key.*features\.9\.extra\.weight"):
        import_authors_weights(extra, "mobilenet_v2")
    misshaped = {**mobilenet_state, "classifier.1.weight": torch.zeros(10, 1280)}
    with pytest.raises(CheckpointError, match=r"classifier\.1\.weight: ours \(1000, 1280\), file \(10, 1280\)"):
        import_authors_weights(misshaped, "mobilenet_v2")


def test_the_wrong_architecture_is_reported_with_counts(mobilenet_state):
    with pytest.raises(CheckpointError, match=r"\d+ missing key.*\d+ unexpected key.*Check --model"):
        import_authors_weights(mobilenet_state, "resnet50")
    plain = {k: v for k, v in mobilenet_state.items() if "_skip." not in k}  # torchvision-like, no twins
    with pytest.raises(CheckpointError, match="no skip norms.*not an adaptive depth network"):
        import_authors_weights(plain, "mobilenet_v2")


# ----- files: weights only, written as adn checkpoints ----------------------------------------------------------
class RunsCode:
    """Unpickling this would call open(marker, "w"): a stand-in for any code a file could run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_file_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "evil.pth"
    torch.save({"model": {"fc.weight": torch.zeros(1)}, "payload": RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match="holds objects other than tensors"):
        import_authors_weights(path, "mobilenet_v2")
    assert not marker.exists()


def test_training_file_with_args_namespace_and_checkpoint_that_adn_reads(mobilenet_state, tmp_path):
    source, output = tmp_path / "checkpoint.pth", tmp_path / "mv2-adn.pt"
    torch.save(
        {"model": mobilenet_state, "args": argparse.Namespace(lr=0.1, model="mobilenet_v2"), "epoch": 149}, source
    )
    net = import_authors_weights(source, "mobilenet_v2", output=output)
    loaded = adn.load(output)
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    _, checkpoint = load_network(output)  # what adn eval, export and analyze call
    meta = validate_meta(checkpoint["meta"])
    assert (meta["model"], meta["num_classes"], meta["dataset"], meta["method"]) == (
        "mobilenet_v2",
        1000,
        "imagefolder",
        "adn",
    )
    assert meta["config"]["entry"] == "model" and meta["config"]["source"] == "checkpoint.pth"


def test_cli_import_then_profile(mobilenet_state, tmp_path, capsys):
    source, output = tmp_path / "mobilenet_v2.pth", tmp_path / "out" / "mv2.pt"
    output.parent.mkdir()
    torch.save(mobilenet_state, source)
    assert (
        main(["import-weights", "--from", "authors", "--model", "mobilenet_v2", str(source), "--output", str(output)])
        == 0
    )
    assert "adn eval --checkpoint" in capsys.readouterr().err
    assert (
        main(["profile", "--checkpoint", str(output), "--skip", "super,base", "--no-latency", "--input-size", "64"])
        == 0
    )
    stages = adn.load(output).num_stages
    assert "T" * stages in capsys.readouterr().out
    broken = {k: v for k, v in mobilenet_state.items() if k != "classifier.1.bias"}
    torch.save(broken, source)
    assert main(["import-weights", "--model", "mobilenet_v2", str(source), "--output", str(output)]) == 2
    assert "classifier.1.bias" in capsys.readouterr().err


def test_code_inside_the_allowed_args_namespace_is_refused_too(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "train.pth"
    torch.save({"model": {"fc.weight": torch.zeros(1)}, "args": argparse.Namespace(hook=RunsCode(marker))}, path)
    with pytest.raises(CheckpointError, match="holds objects other than tensors"):
        import_authors_weights(path, "mobilenet_v2")
    assert not marker.exists()
