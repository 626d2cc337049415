"""Ships the repository's data folders inside the wheel.

``targets/`` (build targets and device profiles) and ``calibration/`` (the general calibration text)
are data that live at the repository root, where a checkout and an editable install read them. A
wheel carries only packages, so this build step copies both into ``edgeft/_data/``, where
:func:`edgeft.targets.targets_dir` and :func:`edgeft.calibration.calibration_dir` look when the
repository folders are not beside the package. Everything else is in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

DATA = {"targets": ("*.toml", "devices/*.toml"), "calibration": ("general.txt", "SOURCES.md")}


class BuildWithData(build_py):
    def run(self):
        super().run()
        root = Path(__file__).resolve().parent
        for folder, patterns in DATA.items():
            for pattern in patterns:
                for src in sorted((root / folder).glob(pattern)):
                    dest = Path(self.build_lib) / "edgeft" / "_data" / folder / src.relative_to(root / folder)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, dest)


setup(cmdclass={"build_py": BuildWithData})
