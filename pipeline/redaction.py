"""Secrets never enter a config and never leave in text: what looks like a credential, by name or
by value, is refused in the config and masked wherever text is printed or written.

By name: option keys such as ``secret``, ``password``, ``token``, ``key``, ``connection_string``,
``authorization``. By value: a password in a URL (``https://user:pw@host``), Azure's
``AccountKey=`` / ``SharedAccessSignature=``, ``Bearer``/``Basic`` authorization values, signed-URL
query parameters (``sig=``, ``X-Amz-Signature=``), and the values of the environment variables
that hold the credentials this package reads (AWS, Azure, PostgreSQL, the stores' keys).
"""

from __future__ import annotations

import os
import re

SECRET_NAMES = (
    "secret",
    "password",
    "passwd",
    "token",
    "key",
    "credential",
    "session",
    "connection_string",
    "authorization",
    "signature",
    "cookie",
)
SECRET_ENVIRONMENT = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_SAS_TOKEN",
    "PGPASSWORD",
    "QDRANT_API_KEY",
    "MILVUS_TOKEN",
    "PINECONE_API_KEY",
)
KEY_VARIABLE_PREFIX = "SPLADE_PIPELINE_"  # store keys in other variables must carry this prefix
MASK = "***"
_PATTERNS = [
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/@\s:]*):[^/@\s]*@"), r"\1:" + MASK + "@"),
    (re.compile(r"(?i)\b(AccountKey|SharedAccessSignature|SharedAccessKey|Password|Pwd)=[^;&\s'\"]+"), r"\1=" + MASK),
    (re.compile(r"(?i)\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]{8,}"), r"\1 " + MASK),
    (
        re.compile(r"(?i)([?&](?:sig|signature|X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token)=)[^&\s'\"]+"),
        r"\1" + MASK,
    ),
]


def is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in SECRET_NAMES)


def credential_in(value: str) -> str | None:
    """What credential ``value`` carries (``"a password in a URL"``...), or None."""
    for pattern, what in zip(
        (p for p, _ in _PATTERNS),
        ("a password in a URL", "an account key or signature", "an authorization header value", "a URL signature"),
    ):
        if pattern.search(value):
            return what
    return None


def scrub(text: str) -> str:
    """``text`` with every credential-looking value masked (see the module docstring)."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    for name, value in os.environ.items():
        if (name in SECRET_ENVIRONMENT or name.startswith(KEY_VARIABLE_PREFIX)) and len(value) >= 6:
            text = text.replace(value, MASK)
    return text
