"""The one version of every PlanetLab program (`plc`, `planetlab-agent`,
`planetlab-sensors`): the installed distribution's, or setup.cfg's in a checkout
that was never installed. In the neutral package planetlab/, which every other
package may import (docs/dev/layering.md)."""

from __future__ import annotations

import configparser
from functools import lru_cache
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "planetlab"


@lru_cache(maxsize=1)
def version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        pass
    setup_cfg = Path(__file__).resolve().parents[1] / "setup.cfg"
    parser = configparser.ConfigParser()
    try:
        parser.read(setup_cfg)
        return parser["metadata"]["version"]
    except (KeyError, configparser.Error):
        return "unknown"


def version_line(program: str) -> str:
    """What `PROGRAM --version` prints."""
    return f"{program} {version()}"
