"""vicuna: make a chat model the Vicuna way, from one terminal command."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vicuna-cli")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
