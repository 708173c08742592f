"""``fedbip flower-credentials``: a CA, the SuperLink's TLS certificate and SuperNode keys, made offline
with ``cryptography``, that Flower's own loaders accept, and that a second run never replaces.

The deployment that uses them runs in tests/test_flower.py (an authenticated SuperLink).
"""

from __future__ import annotations

import ipaddress
import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from test_cli import assert_user_error, invoke

from fedbip_cli.errors import OutputError, UsageError
from fedbip_cli.simulate.flower.credentials import write_credentials


def tree(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_the_files_chain_to_the_ca_and_flower_reads_the_keys(tmp_path: Path) -> None:
    made = write_credentials(tmp_path, ["alice", "bob"], hosts=["127.0.0.1", "superlink.example.org"])

    ca = x509.load_pem_x509_certificate(made.ca.read_bytes())
    server = x509.load_pem_x509_certificate(made.server_certificate.read_bytes())
    server.verify_directly_issued_by(ca)  # raises unless the CA signed it
    ca.verify_directly_issued_by(ca)  # self-signed
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert names.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert serialization.load_pem_private_key(made.server_key.read_bytes(), None).public_key() == server.public_key()

    from flwr.cli.supernode.register import try_load_public_key  # what `flwr supernode register` reads

    for name, private in made.supernodes.items():
        key = serialization.load_ssh_private_key(private.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        public = private.with_name(private.name + ".pub")
        assert serialization.load_ssh_public_key(public.read_bytes()) == key.public_key()
        assert try_load_public_key(public)
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, name
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(made.server_key.stat().st_mode) == 0o600
    assert (tmp_path / "supernodes.txt").read_text() == "alice supernode-alice.pub\nbob supernode-bob.pub\n"


def test_nothing_is_ever_replaced(tmp_path: Path) -> None:
    """A second run writes nothing; one more SuperNode adds its pair and its line, and nothing else changes."""
    write_credentials(tmp_path, ["alice", "bob"])
    before = tree(tmp_path)

    assert write_credentials(tmp_path, ["alice", "bob"]).written == []
    assert tree(tmp_path) == before

    more = write_credentials(tmp_path, ["carol", "alice"])
    assert [p.name for p in more.written] == ["supernode-carol", "supernode-carol.pub", "supernodes.txt"]
    after = tree(tmp_path)
    assert {k: v for k, v in after.items() if k in before and k != "supernodes.txt"} == {
        k: v for k, v in before.items() if k != "supernodes.txt"
    }
    assert after["supernodes.txt"] == before["supernodes.txt"] + b"carol supernode-carol.pub\n"


@pytest.mark.parametrize("present", ["supernode-carol", "supernode-carol.pub", "server.pem", "ca.key"])
def test_a_file_without_its_pair_is_refused_and_kept(tmp_path: Path, present: str) -> None:
    """A half pair (or a user's file under that name) is never replaced, nor is anything written beside it."""
    (tmp_path / present).write_text("a user's file")
    with pytest.raises(OutputError, match="without its pair"):
        write_credentials(tmp_path, ["carol"])
    assert tree(tmp_path) == {present: b"a user's file"}


@pytest.mark.parametrize("names", [["../evil"], ["a b"], [".hidden"], ["x", "x"], []])
def test_bad_supernode_names_are_usage_errors(tmp_path: Path, names: list[str]) -> None:
    with pytest.raises(UsageError):
        write_credentials(tmp_path / "out", names)
    assert not (tmp_path / "out").exists()


def test_the_command_writes_once_and_says_so(tmp_path: Path) -> None:
    first = invoke("flower-credentials", tmp_path / "secrets", "--supernodes", "2", "--json")
    assert first.exit_code == 0, first.output
    record = json.loads(first.stdout)
    assert sorted(record["supernodes"]) == ["0", "1"]
    assert len(record["written"]) == 9  # CA and server pairs, two SuperNode pairs, the key list
    again = invoke("flower-credentials", tmp_path / "secrets", "--supernodes", "2")
    assert again.exit_code == 0 and "nothing written" in again.stdout
    assert_user_error(invoke("flower-credentials", tmp_path / "bad", "--supernodes", "a/b"), "a/b", code=2)
