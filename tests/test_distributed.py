"""Data-parallel training: the batches each process gets, synchronised batch norm and gradient averaging
(exact, in float64, two Gloo processes), and a real two-process torchrun run of ``adn train`` that ends
where a one-process run with the same global batch ends."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from torch.utils.data import RandomSampler

from adn.training.sampling import EpochBatches, epoch_order
from tests.conftest import tiny_flags


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("size, batch, world", [(103, 8, 1), (103, 8, 2), (103, 5, 3), (10, 8, 2), (7, 4, 3)])
def test_processes_share_exactly_the_global_batches_of_one_process(size, batch, world):
    one = list(EpochBatches(size, batch * world, seed=3, epoch=2))
    shares = [list(EpochBatches(size, batch, seed=3, epoch=2, rank=r, world_size=world)) for r in range(world)]
    assert all(len(s) == len(one) for s in shares)
    for step, global_batch in enumerate(one):
        parts = [share[step] for share in shares]
        assert sorted(sum(parts, [])) == sorted(global_batch), "no image lost or repeated"
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    # The epoch's order is the one earlier versions drew with a seeded RandomSampler (old checkpoints).
    sampler = RandomSampler(range(size), generator=torch.Generator().manual_seed(3 * 1000 + 2))
    assert epoch_order(size, 3, 2) == list(sampler)
    # Resuming after k steps yields the remaining batches, unchanged.
    assert list(EpochBatches(size, batch * world, seed=3, epoch=2, start=1)) == one[1:]


def test_more_processes_than_images_is_refused():
    with pytest.raises(ValueError, match="fewer than the 3 processes"):
        EpochBatches(2, 4, seed=0, epoch=0, world_size=3)


# ----- two Gloo processes, float64: synchronised BN + gradient averaging == one process on the whole batch --
def _exactness_worker(rank: int, port: int) -> None:
    import torch.distributed as dist
    from torch.utils.data import DataLoader, Subset, TensorDataset

    import adn
    from adn.core.distill import SubPathDistillationLoss
    from adn.training.distributed import Distributed
    from adn.vision.evaluate import evaluate_accuracy
    from adn.core.sync_bn import GlobalBatchNorm, convert_sync_batchnorm
    from adn.training.methods import adn_step

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    world = Distributed(rank, 2)
    try:

        def network():
            torch.manual_seed(0)
            return adn.convert(adn.build_model("resnet20", num_classes=10, in_channels=1, width=4)).double().train()

        generator = torch.Generator().manual_seed(1)
        x = torch.randn(24, 1, 28, 28, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 10, (24,), generator=generator)
        net = network()
        norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert convert_sync_batchnorm(net, torch.device("cpu")) == len(norms) == 33  # 21 + 12 twins
        assert all(isinstance(m, GlobalBatchNorm) for m in norms)
        assert isinstance(net.layer1[0].bn1, adn.SkipAwareNorm) and isinstance(net.layer1[0].bn1, GlobalBatchNorm)
        share = slice(12 * rank, 12 * (rank + 1))
        adn_step(net, x[share], y[share], SubPathDistillationLoss())
        world.average_gradients(net.parameters())

        reference = network()
        adn_step(reference, x, y, SubPathDistillationLoss())
        for (name, mine), theirs in zip(net.named_parameters(), reference.parameters()):
            assert torch.allclose(mine.grad, theirs.grad, rtol=1e-9, atol=1e-12), name
        for (name, mine), theirs in zip(net.named_buffers(), reference.buffers()):
            assert torch.allclose(mine, theirs, rtol=1e-9, atol=1e-12), name  # running stats of the global batch

        # Sharded evaluation of 7 images on 2 processes (4 + 3): counts summed, not accuracies averaged.
        data = TensorDataset(x[:7], y[:7])
        whole = evaluate_accuracy(reference, DataLoader(data, batch_size=3), ["super", "base"])
        shard = Subset(data, range(rank, 7, 2))
        sharded = evaluate_accuracy(
            reference, DataLoader(shard, batch_size=3), ["super", "base"], sum_over_processes=world.sum_tensor
        )
        assert sharded == whole
    finally:
        dist.destroy_process_group()


def test_two_processes_compute_the_gradients_of_one_process_exactly():
    # spawn, not fork: forking after earlier tests started OpenMP/ONNX Runtime thread pools can deadlock
    torch.multiprocessing.start_processes(_exactness_worker, args=(_free_port(),), nprocs=2, start_method="spawn")


# ----- torchrun -m adn train ---------------------------------------------------------------------------------
def test_torchrun_two_processes_end_where_one_process_ends(tmp_path, fashion_dir):
    from adn.utils.checkpoint_file import load_checkpoint, numbered_checkpoints
    from adn.vision.train_config import TrainConfig
    from adn.vision.train import train

    common = [
        *tiny_flags(fashion_dir, steps=3),
        "--lr",
        "0.01",
        "--val-subset",
        "255",
        "--device",
        "cpu",
        "--no-progress",
        "--no-amp",
    ]  # float32: the comparison below is at float32 rounding
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "adn",
        "train",
        *common,
        "-b",
        "16",
        "--sync-bn",
        "--save-every-steps",
        "2",
        "--keep-last",
        "2",
        "--output-dir",
        str(tmp_path / "ddp"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes x batch 16 (sync-bn)" in result.stderr
    assert result.stderr.count("epoch 1:") == 1, "only rank 0 logs"

    single = TrainConfig(
        model="resnet20",
        width=4,
        data="fashion-mnist",
        data_path=str(fashion_dir),
        epochs=1,
        max_steps_per_epoch=3,
        lr=0.01,
        val_subset=255,
        device="cpu",
        progress=False,
        batch_size=32,
        output_dir=str(tmp_path / "single"),
        amp=False,
    )
    train(single)
    ddp, one = (
        load_checkpoint(tmp_path / "ddp" / "checkpoint.pt"),
        load_checkpoint(tmp_path / "single" / "checkpoint.pt"),
    )
    # float32 rounding differs (batch statistics are summed in another order); per-process batch
    # statistics without --sync-bn differ from these by ~4e-3.
    for key, value in one["model"].items():
        assert torch.allclose(ddp["model"][key].double(), value.double(), rtol=1e-3, atol=1e-4), key
    logs = [[json.loads(line) for line in open(tmp_path / run / "log.jsonl")] for run in ("ddp", "single")]
    assert len(logs[0]) == 1
    assert logs[0][0]["train_loss"] == pytest.approx(logs[1][0]["train_loss"], rel=1e-4)
    for key in ("val_acc1_super", "val_acc1_base", "val_acc5_super", "val_acc5_base"):
        counted = logs[0][0][key] * 255 / 100  # 255 images on 2 processes: each counted once
        assert counted == pytest.approx(round(counted), abs=1e-6) and 0 < counted
        assert abs(logs[0][0][key] - logs[1][0][key]) <= 100 / 255 + 1e-9
    # A mid-epoch checkpoint holds both processes' RNG states; only the last 2 numbered ones are kept.
    numbered = numbered_checkpoints(tmp_path / "ddp")
    assert [p.name for p in numbered] == ["checkpoint-e0001-s0000002.pt", "checkpoint-e0001-s0000003.pt"]
    assert len(load_checkpoint(numbered[0])["rng"]) == 2
    # The default (joint) run's per-depth batch-norm statistics: measured once, by rank 0, after training, and
    # stored in checkpoint.pt and in the numbered checkpoint it links to.
    assert result.stderr.count("stored the batch-norm statistics of 8 depths") == 1
    assert ddp["depth_statistics"]["measured_by"] == "adn train"
    assert os.path.samefile(numbered[-1], tmp_path / "ddp" / "checkpoint.pt")
