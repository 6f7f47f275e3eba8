"""The installed version of hyphae, and the agent string peers see."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hyphae")
except PackageNotFoundError:  # running from a checkout without installing
    __version__ = "0.0.0+unknown"

AGENT = f"hyphae/{__version__}"
