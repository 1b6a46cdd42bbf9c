"""The TLS client context both services use towards the broker, built from file paths.

The broker's certificate is verified against `ca_file` (the CA that deploy/mqtt-certs.sh
makes) including its host name; a client certificate is sent when `cert_file` is given.
"""

from __future__ import annotations

import ssl


def client_context(ca_file: str, cert_file: str = "", key_file: str = "") -> ssl.SSLContext:
    """Raises OSError or ssl.SSLError for an unreadable or invalid file."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file:
        context.load_cert_chain(cert_file, key_file or None)
    return context
