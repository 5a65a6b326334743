"""Building the C++/CUDA kernels of ``csrc/`` just in time: where the sources are, and the flag that makes torch
rebuild when any of them changes. Shared by the ``cpu`` and ``cuda`` backends (and the tests' compile checks)."""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from twilight.contract import BackendUnavailableError

__all__ = ["CSRC_DIR", "csrc_dir", "source_hash_flag", "sources"]


def csrc_dir() -> Path:
    """Where the C++/CUDA sources are: ``$TWILIGHT_CSRC``, else the repository's ``csrc/`` (source checkout, editable
    install), else the copy a regular install puts in ``<prefix>/share/twilight/csrc`` (setup.py's data_files).

    The one place that decides it: the cpu and cuda backends' JIT builds and the test suite's compile checks.
    """
    if "TWILIGHT_CSRC" in os.environ:
        return Path(os.environ["TWILIGHT_CSRC"])
    checkout = Path(__file__).resolve().parents[2] / "csrc"
    installed = Path(sys.prefix) / "share" / "twilight" / "csrc"
    return checkout if checkout.is_dir() or not installed.is_dir() else installed


#: The sources, as found by `csrc_dir` when this module was imported.
CSRC_DIR = csrc_dir()


def sources(names) -> list[str]:
    """The paths of the files ``names`` of ``CSRC_DIR``; a missing one raises ``BackendUnavailableError``."""
    paths = [CSRC_DIR / n for n in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise BackendUnavailableError(f"the CUDA sources are missing ({', '.join(missing)}): the cuda backend needs "
                                      "a source checkout or an editable install (pip install -e .), or "
                                      "TWILIGHT_CSRC pointing at csrc/")
    return [str(p) for p in paths]


def source_hash_flag() -> str:
    """A define carrying the hash of every file in csrc/: torch's JIT versioning hashes only the listed sources,
    not the headers and .cu files they include, so any edit must also change the build flags."""
    digest = hashlib.sha1()
    for path in sorted(CSRC_DIR.glob("*")):
        if path.suffix in (".cu", ".cuh", ".h", ".cpp"):
            digest.update(path.name.encode() + path.read_bytes())
    return f"-DTWILIGHT_CSRC_HASH={digest.hexdigest()[:16]}"
