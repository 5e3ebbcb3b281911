"""setuptools build step (pyproject.toml `[tool.setuptools.cmdclass]`): ship `_yunque_lm_eval.pth`.

The .pth makes the plain `lm_eval` command see `--model yunque` (see `_yunque_lm_eval.py`). It has
to sit at the top of site-packages, and setuptools has no declarative option for a top-level
non-Python file, hence this `build_py` subclass:

- a regular wheel is assembled from `build_lib`, so the file is written there;
- an editable wheel (PEP 660, `pip install -e`) is assembled from the `install` command's
  `install_lib` directory (setuptools points it at the unpacked editable wheel), not from
  `build_lib`, so in editable mode the file is written there as well.

Build-time only: nothing here is installed or imported by yunque.
"""

from __future__ import annotations

import os

from setuptools.command.build_py import build_py as _build_py

PTH_NAME = "_yunque_lm_eval.pth"
PTH_LINE = "import _yunque_lm_eval\n"


class BuildPy(_build_py):
    def run(self) -> None:
        super().run()
        targets = [self.build_lib]
        if self.editable_mode:
            targets.append(self.get_finalized_command("install").install_lib)
        for directory in targets:
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, PTH_NAME), "w", encoding="utf-8") as f:
                f.write(PTH_LINE)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH_NAME)]

    def get_source_files(self) -> list[str]:
        # An sdist must carry this file too: the wheel built from it runs this command.
        return [*super().get_source_files(), os.path.basename(__file__)]
