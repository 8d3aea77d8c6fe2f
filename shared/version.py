"""The running code's version, reported in health and used by rolling upgrades."""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["CODE_VERSION"]

try:
    CODE_VERSION = version("sitecloud")
except PackageNotFoundError:  # running from a checkout that was never installed
    CODE_VERSION = "0+unknown"
