"""Model files shipped inside installed wheels (Silero VAD, DNSMOS, Whisper), found without importing the package:
several of those packages import torch or librosa at import time, which this project never needs."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_file(module: str, relative: str, package: str, install_hint: str = "run `make install`") -> Path:
    """``relative`` inside the installed package ``module`` (distribution name ``package``).

    Raises:
        FileNotFoundError: the package is not installed, or lacks the file; the message says how to install it.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{package} is not installed: {install_hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise FileNotFoundError(
            f"{package} is installed but has no {relative} at {path}: reinstall it ({install_hint})"
        )
    return path
