"""DICOM TLS (PS3.15 B.1, BCP 195): TLS 1.2 or later around the Upper Layer, for the receiver and
the sender of results; the upper layer reads and writes the wrapped socket as it would a plain one.

A receiver that takes both plain and TLS associations on one port tells them apart by the first
byte a peer sends: 0x16 opens a TLS handshake, 0x01 an A-ASSOCIATE-RQ.
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from pathlib import Path

from service.dicomnet.upper_layer import PeerGone
from service.errors import SetupError

TLS_HANDSHAKE = 0x16  # content type of the TLS record that opens a handshake
REJECT_PLAIN = (0x01, 0x01, 0x01)  # A-ASSOCIATE-RJ permanent, service user, no reason given (DICOM has no "TLS required")


def _load(context: ssl.SSLContext, certificate: Path | None, key: Path | None, ca: Path | None, what: str) -> None:
    """Load the certificate, key and CA files; a SetupError naming the file and setting otherwise."""
    try:
        if certificate is not None:
            context.load_cert_chain(certificate, key)
    except (OSError, ssl.SSLError) as error:
        raise SetupError(
            f"cannot load the {what} certificate {certificate} with key {key} ({error.strerror or error}): "
            "give PEM files readable by this user, the key unencrypted and matching the certificate"
        ) from None
    try:
        if ca is not None:
            context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as error:
        raise SetupError(f"cannot load the CA file {ca} ({error.strerror or error}): give a PEM file of CA certificates") from None


def server_context(certificate: Path, key: Path, ca: Path | None, require_client_certificate: bool) -> ssl.SSLContext:
    """The receiver's TLS context: our certificate; peers' certificates checked against ``ca``
    (required when ``require_client_certificate``, else checked only when presented)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(context, certificate, key, ca, "DICOM TLS")
    if require_client_certificate:
        context.verify_mode = ssl.CERT_REQUIRED
    elif ca is not None:
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def client_context(ca: Path | None, certificate: Path | None, key: Path | None, check_hostname: bool) -> ssl.SSLContext:
    """The sender's TLS context for one destination: its certificate must chain to ``ca`` (the
    system's trusted CAs when None) and, with ``check_hostname``, name the host we connect to;
    our own certificate is presented when the destination asks for one."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = check_hostname
    _load(context, certificate, key, ca, "DICOM TLS client")
    return context


def accept(sock: socket.socket, context: ssl.SSLContext, timeout_s: float) -> tuple[socket.socket, bool]:
    """An accepted connection ready for the upper layer, and whether it is encrypted: the TLS
    connection after a completed handshake when the peer opens one, else ``sock`` itself (plain
    DICOM, for the caller to accept or refuse). The first byte and the whole handshake must come
    within ``timeout_s`` (TimeoutError), so that a slow peer cannot hold its thread; a failed
    handshake raises ``ssl.SSLError``."""
    deadline = time.monotonic() + timeout_s
    sock.settimeout(timeout_s)
    first = sock.recv(1, socket.MSG_PEEK)
    if not first:
        raise PeerGone("connection closed before the first byte")
    if first[0] != TLS_HANDSHAKE:
        return sock, False
    secured = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    try:
        secured.setblocking(False)
        while True:
            try:
                secured.do_handshake()
                break
            except ssl.SSLWantReadError:
                ready = select.select([secured], [], [], max(deadline - time.monotonic(), 0))[0]
            except ssl.SSLWantWriteError:
                ready = select.select([], [secured], [], max(deadline - time.monotonic(), 0))[1]
            if not ready:
                raise TimeoutError(f"TLS handshake not finished within {timeout_s:g} s")
        secured.settimeout(timeout_s)
    except BaseException:
        secured.close()
        raise
    return secured, True
