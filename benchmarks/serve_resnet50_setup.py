"""A compute-dominated serving setup: ResNet-50-ADN at 224x224, for `benchmarks/serve_load.py`.

The networks a 2-core machine can train here (ResNet-20, width 8, 28x28) take about 1 ms per image, less
than the HTTP and decoding work of a request, so no choice of depth can change a server's latency much.
A governor earns its keep where the network's compute dominates. This writes, into --output:

* ``checkpoint.pt``: the paper's ResNet-50-ADN (torchvision ResNet-50, converted) with *random* weights
  and the authors' ImageNet metadata (224x224, ImageNet normalization). Latency does not depend on the
  values of the weights, so it costs what the authors' published network costs;
* ``eval.json``: the three sub-networks the paper reports, with the paper's ImageNet top-1 (Table 1
  and 2: FFFF 77.6 %, TTFF 77.0 %, TTTT 76.1 %) and their MACs measured here. The answers of this
  checkpoint are meaningless; the *effective accuracy* of the load test is computed from these published
  accuracies of the depth that answered, which is what the authors' weights (`adn import-weights --from
  authors`) would give.

Then, as printed at the end:

    adn depth-table --checkpoint OUT/checkpoint.pt --eval OUT/eval.json --batch-sizes 1,2,4,8 --threads 1
    python benchmarks/serve_load.py --checkpoint OUT/checkpoint.pt --server-threads 1 --server-cpus 0 \
        --client-cpus 1 --budget-ms 1000 --rate 10 ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from adn.vision.authors import authors_meta, build_network
from adn.utils.checkpoint_file import save_checkpoint
from adn.runtime.profile import count_macs

# The paper's ImageNet top-1 of ResNet50-ADN (Table 1; TTFF from Table 2), as in docs/pretrained.md.
PAPER_TOP1 = {"FFFF": 77.6, "TTFF": 77.0, "TTTT": 76.1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="runs/serve-resnet50", help="folder for checkpoint.pt and eval.json")
    args = parser.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = build_network("resnet50").eval()
    meta = authors_meta("resnet50", source=None, entry="random weights (serving benchmark)")
    meta["config"]["note"] = "random weights: for latency only; accuracies in eval.json are the paper's"
    save_checkpoint(out / "checkpoint.pt", net, meta)
    example = torch.zeros(1, 3, 224, 224)
    rows = []
    for skip, acc1 in PAPER_TOP1.items():
        with net.skipping(skip):
            macs = count_macs(net, example)
        rows.append(
            {
                "skip": skip,
                "acc1": acc1,
                "macs": macs,
                "source": "paper, Table 1/2 (ImageNet top-1 of the authors' ResNet50-ADN)",
            }
        )
    (out / "eval.json").write_text(json.dumps(rows, indent=1) + "\n")
    for row in rows:
        print(f"{row['skip']}: top-1 {row['acc1']} % (paper), {row['macs'] / 1e9:.2f} GMACs")
    print(
        f"wrote {out / 'checkpoint.pt'} and {out / 'eval.json'}; next:\n"
        f"  adn depth-table --checkpoint {out / 'checkpoint.pt'} --eval {out / 'eval.json'} "
        f"--batch-sizes 1,2,4,8 --repeats 20 --threads 1\n"
        f"  python benchmarks/serve_load.py --checkpoint {out / 'checkpoint.pt'} --eval {out / 'eval.json'} "
        f"--server-threads 1 --server-cpus 0 --client-cpus 1 --budget-ms 1000 --rate 10 --seconds 60"
    )


if __name__ == "__main__":
    main()
