"""The package version, from its installed metadata: one place, read by the public face and by
the encoding fingerprint (which must not import the face: it reaches every room)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("splade-pipeline")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
