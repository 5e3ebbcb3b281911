"""torchrun worker for the distributed tests: train as CONFIG says, then every rank writes the
trainable parameters as it holds them after training (FSDP shards gathered) to OUT/rank-<r>.safetensors,
so a test can compare what each rank trained with each other and with the exported files."""

from __future__ import annotations

import sys
from pathlib import Path

from safetensors.torch import save_file

from yunque.config import load_config
from yunque.train import distributed as D
from yunque.train.config import TrainConfig
from yunque.train.loop import Trainer


def main(config: str, out: str) -> None:
    tr = Trainer(load_config(TrainConfig, Path(config)))
    tr.run()
    sd = {}
    for name, p in tr.model.named_parameters():
        if p.requires_grad:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP: a DTensor shard
            sd[name] = t.detach().cpu().contiguous().clone()
    save_file(sd, str(Path(out) / f"rank-{tr.d.rank}.safetensors"))
    D.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
