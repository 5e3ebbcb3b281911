"""Atomic, pickle-free training checkpoints.

A checkpoint is a directory `step-00000123/` under the run's `checkpoints/` folder:

    model.safetensors      trainable weights (all of them, or only the adapter)
    optimizer.safetensors  optimizer state, one tensor per (parameter, slot): `state.<fqn>.<slot>`
    rng.safetensors        torch (CPU and CUDA) and numpy generator states
    state.json             step, counters, data position, schedule, python RNG, optimizer groups,
                           early-stopping state, resolved config
    adapter_config.json,   LoRA / QLoRA runs: the adapter again as a PEFT directory, so a
    adapter_model.safetensors  checkpoint is what `merge`, `generate --adapter` and `serve` take

It is written into `.tmp-...` in the same folder, every file and the directory are fsynced,
then one `rename` makes it appear. A process killed at any point leaves either the complete
checkpoint or a `.tmp-` directory that is never read and is swept on the next save; so
"the newest `step-*` directory" is always a complete one. Deleting old checkpoints renames
them out of the `step-*` namespace first for the same reason.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from yunque.errors import CheckpointError

_NAME = re.compile(r"^step-(\d{8})$")
# Test hook: SIGKILL this process in the middle of writing the checkpoint of this step.
CRASH_ENV = "YUNQUE_TEST_CRASH_IN_CHECKPOINT"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    # Own, contiguous CPU copies: safetensors refuses shared storage (tied embeddings) and views.
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(path))
    _fsync_path(path)


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / "state.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(root: Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def _remove(path: Path) -> None:
    trash = path.with_name(f".tmp-del-{path.name}-{os.getpid()}")
    os.rename(path, trash)  # out of the step-* namespace first: a half-deleted dir is never "complete"
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(
    root: Path,
    step: int,
    files: dict[str, dict[str, torch.Tensor]],
    state: dict,
    *,
    keep_last: int,
    best_step: int | None = None,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write `files` ({"model": tensors, ...} -> model.safetensors ...) and state.json atomically.

    `extra(dir)` writes more files into the checkpoint before it appears (a PEFT adapter).
    """
    if root.is_symlink():  # step-* folders inside its target would be written and deleted
        raise CheckpointError(
            f"{root}: is a symlink (to {os.readlink(root)}); refusing to write checkpoints through it"
        )
    root.mkdir(parents=True, exist_ok=True)
    for p in root.iterdir():
        if p.name.startswith(".tmp-"):
            shutil.rmtree(p, ignore_errors=True)  # leftovers of a killed write
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    crash = os.environ.get(CRASH_ENV) == str(step)
    for i, (name, tensors) in enumerate(files.items()):
        _write_tensors(tmp / f"{name}.safetensors", tensors)
        if crash and i == 0:
            os.kill(os.getpid(), signal.SIGKILL)
    if extra is not None:
        extra(tmp)
        for p in tmp.iterdir():  # the files above are synced already: this costs nothing for them
            if p.is_file():
                _fsync_path(p)
    _write_json(tmp / "state.json", state)
    _fsync_path(tmp)
    if final.exists():
        _remove(final)
    os.rename(tmp, final)
    _fsync_path(root)
    ckpts = list_checkpoints(root)
    keep = {s for s, _ in ckpts[-keep_last:]} if keep_last > 0 else set()
    keep.add(step)
    if best_step is not None:
        keep.add(best_step)
    for s, p in ckpts:
        if s not in keep:
            _remove(p)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no state.json)")
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'state.json'}: invalid JSON: {e}") from None
    files = {}
    for f in sorted(path.glob("*.safetensors")):
        try:
            files[f.stem] = load_file(str(f))
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{f}: cannot read safetensors: {e}") from None
    return files, state


# ---------------------------------------------------------------- optimizer state <-> tensors + JSON


def flatten_optimizer(osd: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """A full optimizer state dict keyed by parameter name (FQN) -> safetensors dict + JSON groups."""
    tensors, scalars = {}, {}
    for fqn, slots in osd["state"].items():
        for slot, v in slots.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{fqn}.{slot}"] = v
            else:
                scalars[f"{fqn}.{slot}"] = v
    groups = [dict(g, params=list(g["params"])) for g in osd["param_groups"]]
    if scalars:
        groups.append({"_scalars": scalars})
    return tensors, groups


def unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    scalars = groups[-1]["_scalars"] if groups and "_scalars" in groups[-1] else {}
    groups = [g for g in groups if "_scalars" not in g]
    fqns = {f for g in groups for f in g["params"]}
    state: dict[str, dict] = {}
    for key, v in tensors.items():
        fqn, slot = key[len("state.") :].rsplit(".", 1)
        state.setdefault(fqn, {})[slot] = v
    for key, v in scalars.items():
        fqn, slot = key.rsplit(".", 1)
        state.setdefault(fqn, {})[slot] = v
    unknown = set(state) - fqns
    if unknown:
        raise CheckpointError(f"optimizer state names parameters not in its groups: {sorted(unknown)[:3]}")
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------- RNG


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    py = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [py[0], list(py[1]), py[2]]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    v, internal, g = meta["python"]
    random.setstate((v, tuple(internal), g))
