"""Filesystems for every URL the pipeline touches, with object-store clients configured to ride
through throttling and flaky networks.

S3 (s3fs over botocore): botocore's ``adaptive`` retry mode retries throttling (``SlowDown``,
503), 5xx answers, timeouts and dropped or refused connections with exponential backoff and
client-side rate limiting, up to ``max_attempts``; permission errors (403), missing buckets and
keys (404) and other client errors are not retried, so they fail fast with the URL named by the
caller. The user's own ``storage_options`` win over these defaults.
"""

from __future__ import annotations

import copy
from typing import Any

import fsspec

S3_DEFAULTS: dict[str, Any] = {
    "config_kwargs": {"retries": {"max_attempts": 10, "mode": "adaptive"}, "connect_timeout": 10, "read_timeout": 120},
}


def options_for(url: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """``options`` over the defaults for ``url``'s protocol."""
    protocol = url.split("://", 1)[0].lower() if "://" in url else "file"
    merged = copy.deepcopy(S3_DEFAULTS) if protocol in ("s3", "s3a") else {}
    return _merge(merged, options or {})


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    for key, value in over.items():
        base[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return base


def url_to_fs(url: str, options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(url, **options_for(url, options))


def open_url(url: str, mode: str, options: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    return fsspec.open(url, mode, **kwargs, **options_for(url, options)).open()
