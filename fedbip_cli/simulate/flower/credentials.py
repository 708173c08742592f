"""Certificates and SuperNode keys for an authenticated Flower deployment, made offline.

Flower 1.42's secure deployment needs, in one directory:

- ``ca.crt`` / ``ca.key``: a certificate authority that every party trusts (the key stays with the
  operator);
- ``server.pem`` / ``server.key``: the SuperLink's TLS certificate, signed by the CA, valid for the
  host names and IP addresses the SuperNodes dial (``flower-superlink --ssl-ca-certfile ca.crt
  --ssl-certfile server.pem --ssl-keyfile server.key --enable-supernode-auth``);
- ``supernode-<name>`` / ``supernode-<name>.pub``: one EC P-384 key pair per SuperNode in OpenSSH
  form (``flower-supernode --root-certificates ca.crt --auth-supernode-private-key
  supernode-<name>``); each public key is registered with the SuperLink by ``flwr supernode register
  supernode-<name>.pub <connection>``, and a SuperNode whose key is not registered is refused;
- ``supernodes.txt``: the key list, one ``<name> supernode-<name>.pub`` line per SuperNode.

Nothing is ever overwritten: a file that exists is kept and used (an existing CA signs a new server
certificate; asking for one more SuperNode adds its pair alone), and each file is created with
``O_EXCL``, so two runs at once cannot replace each other's keys. Private keys are mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedbip_cli.errors import OutputError, UsageError

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
KEY_LIST = "supernodes.txt"
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
VALID_DAYS = 365
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass
class Credentials:
    """Where the files of a secure deployment are, and which of them this call wrote."""

    directory: Path
    supernodes: dict[str, Path]  # name -> private key (its public key: the same path + ".pub")
    written: list[Path] = field(default_factory=list)

    @property
    def ca(self) -> Path:
        return self.directory / CA_CERT

    @property
    def server_certificate(self) -> Path:
        return self.directory / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.directory / SERVER_KEY


def supernode_key(directory: Path, name: str) -> Path:
    """The private key file of SuperNode ``name`` (its public key: the same path + ``.pub``)."""
    return Path(directory) / f"supernode-{name}"


def _create(path: Path, data: bytes, mode: int, written: list[Path]) -> None:
    """Write a new file, failing if anything is there already (never replacing it)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    written.append(path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _read_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise OutputError(f"{path}: not an EC private key; expected the key this command wrote", where=str(path))
    return key


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    hosts: Sequence[str] = (),
) -> x509.Certificate:
    """A certificate for ``key``: self-signed CA when ``issuer`` is None, else a server certificate for ``hosts``."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name if issuer is None else issuer[0])
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName([_host(h) for h in hosts]), critical=False)
    return builder.sign(key if issuer is None else issuer[1], hashes.SHA256())


def _host(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _ensure_authority(directory: Path, written: list[Path]) -> tuple[x509.Name, ec.EllipticCurvePrivateKey]:
    """The CA's name and key: read when its files exist, made when they do not (``_check_pairs``)."""
    cert, key_file = directory / CA_CERT, directory / CA_KEY
    if cert.exists():
        return x509.load_pem_x509_certificate(cert.read_bytes()).subject, _read_key(key_file)
    key = ec.generate_private_key(ec.SECP384R1())
    certificate = _certificate("fedbip-flower-ca", key, None)
    _create(key_file, _pem_key(key), 0o600, written)
    _create(cert, certificate.public_bytes(serialization.Encoding.PEM), 0o644, written)
    return certificate.subject, key


def _ensure_server(directory: Path, hosts: Sequence[str], written: list[Path]) -> None:
    """The SuperLink's certificate and key, signed by the CA, unless both are there already."""
    cert, key_file = directory / SERVER_CERT, directory / SERVER_KEY
    if cert.exists():
        return
    issuer = _ensure_authority(directory, written)
    key = ec.generate_private_key(ec.SECP384R1())
    certificate = _certificate(hosts[0], key, issuer, hosts)
    _create(key_file, _pem_key(key), 0o600, written)
    _create(cert, certificate.public_bytes(serialization.Encoding.PEM), 0o644, written)


def _ensure_supernode(directory: Path, name: str, written: list[Path]) -> Path:
    """SuperNode ``name``'s OpenSSH key pair, unless it is there already."""
    private = supernode_key(directory, name)
    public = private.with_name(private.name + ".pub")
    if private.exists():
        return private
    key = ec.generate_private_key(ec.SECP384R1())
    openssh = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    _create(private, openssh, 0o600, written)
    ssh_public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _create(public, ssh_public + f" {name}\n".encode(), 0o644, written)
    return private


def _check_pairs(directory: Path, supernodes: Sequence[str]) -> None:
    """Refuse, before writing anything, a file whose pair is missing: it is kept, never completed or replaced."""
    pairs = [(CA_CERT, CA_KEY), (SERVER_CERT, SERVER_KEY)]
    pairs += [(f"supernode-{name}", f"supernode-{name}.pub") for name in supernodes]
    for pair in pairs:
        present = [name for name in pair if (directory / name).exists()]
        if len(present) == 1:
            missing = pair[1 - pair.index(present[0])]
            raise OutputError(
                f"{directory / present[0]} exists without its pair {missing}",
                where=str(directory),
                hint="restore the missing file, or move the other one away to make a new pair",
            )


def _check(supernodes: Sequence[str], hosts: Sequence[str]) -> None:
    bad = [name for name in supernodes if not _NAME.fullmatch(name)]
    if bad:
        raise UsageError(
            f"SuperNode name {bad[0]!r}: expected letters, digits, '.', '_' or '-' (at most 64, not starting with . _ -)"
        )
    if len(set(supernodes)) != len(supernodes) or not supernodes:
        raise UsageError(f"SuperNode names {list(supernodes)}: expected one or more distinct names")
    if not hosts:
        raise UsageError("the SuperLink certificate needs at least one host name or IP address")


def write_credentials(
    directory: Path, supernodes: Sequence[str], *, hosts: Sequence[str] = DEFAULT_HOSTS
) -> Credentials:
    """Make what is missing of a secure deployment's files in ``directory`` (created if needed).

    Args:
        directory: where the files are.
        supernodes: the SuperNodes' names (one key pair each).
        hosts: host names and IP addresses the SuperLink certificate is valid for (the first is its
            common name).

    Returns:
        The files, and the list of those written now (empty when everything was there).
    """
    _check(supernodes, hosts)
    directory = Path(directory)
    _check_pairs(directory, supernodes)
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    _ensure_server(directory, hosts, written)
    keys = {name: _ensure_supernode(directory, name, written) for name in supernodes}
    key_list = directory / KEY_LIST
    known = key_list.read_text(encoding="utf-8").splitlines() if key_list.exists() else []
    lines = [*known, *(f"{n} {k.name}.pub" for n, k in keys.items() if f"{n} {k.name}.pub" not in known)]
    if lines != known:
        temporary = key_list.with_name(f".{KEY_LIST}.{os.getpid()}.tmp")
        temporary.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
        os.replace(temporary, key_list)  # the list only ever grows: every line it had is kept
        written.append(key_list)
    return Credentials(directory, keys, written)
