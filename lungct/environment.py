"""What a result was computed with: Python, the platform and package versions.

Recorded in dataset.json (prepare) and, with the Keras backend and devices added by
:func:`lungct.backend.environment`, in training_results.json and report.json.
"""

from __future__ import annotations

import platform
from importlib import metadata

from lungct import __version__

__all__ = ["package_versions"]


def package_versions(*distributions: str) -> dict[str, str]:
    """Python, platform, lungct and the installed version of each distribution named.

    A distribution that is not installed is recorded as ``"not installed"``.
    """
    versions = {"python": platform.python_version(), "platform": platform.platform(),
                "lungct": __version__}
    for name in distributions:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
