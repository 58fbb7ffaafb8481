"""`flwr-robust keys ...` called through `main([...])` in temporary directories."""

import json
import stat

import pytest
from cryptography.hazmat.primitives import serialization

from flwr_robust.cli import SUBCOMMANDS, main
from flwr_robust.security import KeyDir, keys
from flwr_robust.security.truststore import TrustStore


def _init(tmp_path, *extra: str) -> int:
    return main(["keys", "init", str(tmp_path / "k"), "--clients", "3", *extra])


def test_subcommands_are_registered():
    names = [name for name, _ in SUBCOMMANDS]
    assert "keys" in names and len(names) == len(set(names))


@pytest.mark.parametrize("algorithm", ["ed25519", "ecdsa-p256", "ecdsa-p384"])
def test_init_writes_the_documented_layout(tmp_path, capsys, algorithm):
    assert _init(tmp_path, "--algorithm", algorithm) == 0
    root = tmp_path / "k"
    server = keys.load_private_key(root / "server.key")
    assert keys.algorithm_of(server) == algorithm
    assert keys.key_id(keys.load_public_key(root / "server.pub")) == keys.key_id(server)
    assert stat.S_IMODE((root / "server.key").stat().st_mode) == 0o600
    store = TrustStore.load(root / "truststore.json")
    assert [e.name for e in store] == ["client-0", "client-1", "client-2"]
    for i, entry in enumerate(store):
        key_file = root / "clients" / f"client-{i}.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert keys.key_id(keys.load_private_key(key_file)) == entry.key_id
        assert keys.key_id(keys.load_public_key(key_file.with_suffix(".pub"))) == entry.key_id
        assert entry.algorithm == algorithm and not entry.revoked
    assert keys.key_id(server) not in {e.key_id for e in store}
    assert keys.key_id(server) in capsys.readouterr().out


def test_init_refuses_to_overwrite_without_force(tmp_path, capsys):
    assert _init(tmp_path) == 0
    before = (tmp_path / "k" / "server.key").read_bytes()
    assert _init(tmp_path) == 1
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "k" / "server.key").read_bytes() == before
    assert _init(tmp_path, "--force") == 0
    assert (tmp_path / "k" / "server.key").read_bytes() != before


def test_init_argument_errors(tmp_path, capsys):
    assert main(["keys", "init", str(tmp_path), "--clients", "-1"]) == 1
    assert "--clients" in capsys.readouterr().err
    assert main(["keys", "init", str(tmp_path)]) == 2  # --clients is required
    assert main(["keys", "init", str(tmp_path), "--clients", "2", "--algorithm", "rsa"]) == 2


def test_add_public_key_files(tmp_path, capsys):
    assert _init(tmp_path) == 0
    root = tmp_path / "k"
    pem_key = keys.generate_private_key("ecdsa-p256")
    keys.save_public_key(pem_key, tmp_path / "new.pub")
    assert main(["keys", "add", str(root), "--public-key", str(tmp_path / "new.pub"),
                 "--name", "site-a"]) == 0  # fmt: skip
    ssh_key = keys.generate_private_key("ecdsa-p384")  # a Flower SuperNode key
    (tmp_path / "node.pub").write_bytes(
        ssh_key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    assert main(["keys", "add", str(root), "--public-key", str(tmp_path / "node.pub")]) == 0
    store = TrustStore.load(root / "truststore.json")
    assert store.get(keys.key_id(pem_key)).name == "site-a"
    assert store.get(keys.key_id(ssh_key)).algorithm == "ecdsa-p384"
    assert keys.key_id(ssh_key) in capsys.readouterr().out
    # the same key twice is refused
    assert main(["keys", "add", str(root), "--public-key", str(tmp_path / "new.pub")]) == 1
    assert "already" in capsys.readouterr().err


def test_add_generates_a_client_key(tmp_path, capsys):
    assert _init(tmp_path) == 0
    root = tmp_path / "k"
    args = ["keys", "add", str(root), "--generate", "client-9", "--algorithm", "ecdsa-p384"]
    assert main(args) == 0
    key = keys.load_private_key(root / "clients" / "client-9.key")
    entry = TrustStore.load(root / "truststore.json").get(keys.key_id(key))
    assert entry.name == "client-9" and entry.algorithm == "ecdsa-p384"
    assert main(args) == 1  # files and name exist
    assert "refusing to overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--generate", "../evil"], "invalid client name"),
        (["--generate", "client-0"], "refusing to overwrite"),
        (["--generate", "x", "--name", "y"], "--name goes with --public-key"),
        (["--public-key", "missing.pub"], "missing.pub"),
    ],
)
def test_add_errors(tmp_path, capsys, args, message):
    assert _init(tmp_path) == 0
    assert main(["keys", "add", str(tmp_path / "k"), *args]) == 1
    assert message in capsys.readouterr().err


def test_add_needs_a_trust_store(tmp_path, capsys):
    assert main(["keys", "add", str(tmp_path), "--generate", "c"]) == 1
    assert "keys init" in capsys.readouterr().err
    assert main(["keys", "add", str(tmp_path)]) == 2  # --public-key or --generate required


def test_revoke_by_name_and_full_id(tmp_path, capsys):
    assert _init(tmp_path) == 0
    root = tmp_path / "k"
    assert main(["keys", "revoke", str(root), "client-1"]) == 0
    kid = TrustStore.load(root / "truststore.json").find("client-2").key_id
    assert main(["keys", "revoke", str(root), kid]) == 0
    store = TrustStore.load(root / "truststore.json")
    assert [e.revoked for e in store] == [False, True, True]
    capsys.readouterr()
    assert main(["keys", "revoke", str(root), "client-1"]) == 0
    assert "already revoked" in capsys.readouterr().out
    assert main(["keys", "revoke", str(root), "nobody"]) == 1
    assert "no key" in capsys.readouterr().err


def test_revoke_refuses_id_prefixes(tmp_path, capsys):
    assert _init(tmp_path) == 0
    root = tmp_path / "k"
    kid = TrustStore.load(root / "truststore.json").find("client-0").key_id
    for prefix in (kid[:4], kid[:8], kid[:31]):
        assert main(["keys", "revoke", str(root), prefix]) == 1
        assert "prefixes are not accepted" in capsys.readouterr().err
    assert not any(e.revoked for e in TrustStore.load(root / "truststore.json"))


def test_revoke_by_a_prefix_never_hits_a_key_named_like_it(tmp_path, capsys):
    """Finding 16: a key named after another key's id prefix used to be revoked instead."""
    assert _init(tmp_path) == 0
    root = tmp_path / "k"
    target = TrustStore.load(root / "truststore.json").find("client-0").key_id
    keys.save_public_key(keys.generate_private_key(), tmp_path / "decoy.pub")
    assert main(["keys", "add", str(root), "--public-key", str(tmp_path / "decoy.pub"),
                 "--name", target[:8]]) == 0  # fmt: skip
    assert main(["keys", "revoke", str(root), target]) == 0
    store = TrustStore.load(root / "truststore.json")
    assert store.get(target).revoked and not store.find(target[:8]).revoked


def test_revoke_refuses_a_name_that_is_another_keys_id(tmp_path, capsys):
    assert _init(tmp_path) == 0
    root = tmp_path / "k"
    path = root / "truststore.json"
    store = TrustStore.load(path)
    victim = store.find("client-0").key_id
    impostor = store.add(keys.generate_private_key().public_key()).key_id
    store.save()
    doc = json.loads(path.read_text())  # a hand-edited store: names bypass add()'s checks
    doc["keys"][-1]["name"] = victim
    path.write_text(json.dumps(doc))
    assert main(["keys", "revoke", str(root), victim]) == 1
    err = capsys.readouterr().err
    assert "ambiguous" in err and victim in err and impostor in err
    assert not any(e.revoked for e in TrustStore.load(path))
    assert main(["keys", "revoke", str(root), impostor]) == 0
    assert TrustStore.load(path).get(impostor).revoked


def test_revoke_help_names_the_accepted_forms(capsys):
    assert main(["keys", "revoke", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "full key id" in help_text and "prefixes are not accepted" in help_text


def test_add_refuses_the_server_key_as_a_client_key(tmp_path, capsys):
    assert _init(tmp_path) == 0
    root = tmp_path / "k"
    server_id = keys.key_id(keys.load_public_key(root / "server.pub"))
    before = (root / "truststore.json").read_bytes()
    copy = tmp_path / "renamed.pub"
    copy.write_bytes((root / "server.pub").read_bytes())
    for path in (root / "server.pub", copy):
        assert main(["keys", "add", str(root), "--public-key", str(path), "--name", "x"]) == 1
        err = capsys.readouterr().err
        assert "it is the server's public key" in err and server_id in err
    assert (root / "truststore.json").read_bytes() == before


def test_group_or_world_writable_keys_are_warned_about(tmp_path, capsys):
    assert _init(tmp_path) == 0
    root = tmp_path / "k"
    assert stat.S_IMODE(root.stat().st_mode) & 0o022 == 0  # init never makes them writable
    assert stat.S_IMODE((root / "clients").stat().st_mode) & 0o022 == 0
    capsys.readouterr()
    assert main(["keys", "show", str(root)]) == 0
    assert "warning" not in capsys.readouterr().err
    root.chmod(0o777)
    (root / "server.key").chmod(0o620)
    (root / "clients" / "client-1.key").chmod(0o602)
    for args in (["show"], ["revoke", "x"], ["add", "--generate", "c-9"]):
        main(["keys", args[0], str(root), *args[1:]])
        err = capsys.readouterr().err
        assert f"warning: {root} is writable by everyone (mode 0777)" in err
        assert f"{root / 'server.key'} is writable by its group (mode 0620)" in err
        assert f"{root / 'clients' / 'client-1.key'} is writable by all users" in err
        assert "chmod go-w" in err
    assert len(KeyDir(root).permission_warnings()) == 3


def test_show_lists_keys(tmp_path, capsys):
    assert _init(tmp_path) == 0
    root = tmp_path / "k"
    assert main(["keys", "revoke", str(root), "client-0"]) == 0
    capsys.readouterr()
    assert main(["keys", "show", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    server_id = keys.key_id(keys.load_public_key(root / "server.pub"))
    assert out[0] == f"server key: {server_id} (ed25519)"
    assert out[1].split() == ["KEY", "ID", "NAME", "ALGORITHM", "STATUS", "ADDED"]
    assert "client-0" in out[2] and "revoked" in out[2]
    assert "client-1" in out[3] and "active" in out[3]
    assert len(out) == 5


def test_show_without_server_key(tmp_path, capsys):
    assert _init(tmp_path) == 0
    (tmp_path / "k" / "server.pub").unlink()
    assert main(["keys", "show", str(tmp_path / "k")]) == 0
    assert "server key: none" in capsys.readouterr().out


def test_rotation_through_the_cli_reaches_a_running_server(tmp_path):
    assert _init(tmp_path) == 0
    root = tmp_path / "k"
    server_store = TrustStore.load(root / "truststore.json")
    assert main(["keys", "add", str(root), "--generate", "client-3"]) == 0
    assert main(["keys", "revoke", str(root), "client-0"]) == 0
    assert server_store.reload_if_changed()
    new_id = keys.key_id(keys.load_private_key(root / "clients" / "client-3.key"))
    assert server_store.is_trusted(new_id)
    assert not server_store.is_trusted(server_store.find("client-0").key_id)


def test_usage_errors_and_help(capsys):
    assert main([]) == 2
    assert main(["nope"]) == 2
    assert main(["keys"]) == 2
    assert main(["--help"]) == 0
    assert "keys" in capsys.readouterr().out
