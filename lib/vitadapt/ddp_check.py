"""A 2-process CPU DDP run (gloo) of the project's training loop on synthetic data.

    python -m vitadapt.ddp_check OUT_DIR [--devices 2] [--steps 4] [--accelerator cpu|cuda]

Each rank sees different batches (DistributedSampler through Fabric), gradients are all-reduced, so every
rank must end with identical parameters; each rank writes its parameters to OUT_DIR/rank<r>.pt."""

from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch
from torch.utils.data import DataLoader

from vitadapt.data.synthetic import SyntheticShapes
from vitadapt.eval import Transformed, eval_transform
from vitadapt.train import fit, make_fabric, seed_everything


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--accelerator", default="cpu", help="cpu (gloo) or cuda (nccl)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    fabric = make_fabric(args.accelerator, args.devices, "ddp")
    seed_everything(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                              embed_dim=48, num_heads=2, num_classes=10)
    data = Transformed(SyntheticShapes(4, size=32, split="train"), eval_transform(32))
    loader = DataLoader(data, batch_size=4, shuffle=True)
    crit = torch.nn.CrossEntropyLoss()

    def loss_fn(m, batch):
        x, y = batch
        return crit(m(x), y), {"rank": fabric.global_rank}

    res = fit(fabric, model, loss_fn, loader, steps=args.steps, lr=1e-3)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"params": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "world_size": fabric.world_size, "steps": res.steps},
               out / f"rank{fabric.global_rank}.pt")


if __name__ == "__main__":
    main()
