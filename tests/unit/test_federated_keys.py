"""SuperNode identities: key pairs, and the Flower command lines that use them."""

from __future__ import annotations

import stat

import pytest

from privmed.errors import InputError
from privmed.federated.deploy import (
    generate_site_key,
    register_command,
    superlink_command,
    supernode_command,
)


def test_site_key_is_a_private_p384_openssh_pair(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import (
        load_ssh_private_key,
        load_ssh_public_key,
    )

    key, pub = generate_site_key(tmp_path, "site_a")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    private = load_ssh_private_key(key.read_bytes(), None)
    public = load_ssh_public_key(pub.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()  # type: ignore[union-attr]
    # an identity is never silently replaced
    with pytest.raises(InputError, match="already exists"):
        generate_site_key(tmp_path, "site_a")
    with pytest.raises(InputError, match="without slashes"):
        generate_site_key(tmp_path, "../evil")


def test_commands_enable_and_use_supernode_authentication(tmp_path):
    from privmed.federated.deploy import generate_certificates

    certs = tmp_path / "certs"
    generate_certificates(certs)
    assert "--enable-supernode-auth" in superlink_command(certs, host="127.0.0.1", port=9092)
    assert "--enable-supernode-auth" not in superlink_command(certs, host="127.0.0.1", port=9092, supernode_auth=False)
    key, pub = generate_site_key(tmp_path / "keys", "site_b")
    node = supernode_command("127.0.0.1:9092", certs / "ca.crt", data_dir=tmp_path, site="site_b",
                             state_dir=tmp_path / "s", port=9094, auth_key=key)  # fmt: skip
    assert node[node.index("--auth-supernode-private-key") + 1] == str(key.resolve())
    reg = register_command(pub, "site_b")
    assert reg[1:4] == ["supernode", "register", str(pub.resolve())] and reg[-2:] == ["--name", "site_b"]
    with pytest.raises(InputError, match="private key not found"):
        supernode_command("127.0.0.1:9092", certs / "ca.crt", data_dir=tmp_path, site="site_b",
                          state_dir=tmp_path / "s", port=9094, auth_key=tmp_path / "missing.key")  # fmt: skip
