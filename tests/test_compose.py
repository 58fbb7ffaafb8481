"""Static checks of docker-compose.yml, its overlays in deploy/ and the Dockerfile.

Nothing here runs Docker. The files are parsed, validated against the Compose
specification's JSON schema, merged the way Compose merges ``-f`` overlays (for the keys
they use), and checked against the package: Flower version pins, every command line
against the installed Flower's own argument parsers, ports, node configs against
:class:`flwr_robust.runtime.deploy.NodeSpec`, key and certificate mounts against the layouts the
``flwr-robust deploy`` helpers write and the client mod reads, and the demo run config
against ``[tool.flwr.app.config]``.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import flwr
import pytest
import yaml
from flwr.app import Context, RecordDict
from flwr.common.config import get_fused_config_from_dir, parse_config_args
from flwr.supercore.cli.flower_superexec import _parse_args as superexec_parser
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink as superlink_parser
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode as supernode_parser

from flwr_robust.aggregation import get_aggregator
from flwr_robust.apps.client import ROLES
from flwr_robust.apps.settings import RunSettings
from flwr_robust.attacks import available_attacks
from flwr_robust.cli import build_parser
from flwr_robust.runtime import deploy
from flwr_robust.runtime.deploy import (
    AuthKeys,
    DeploymentKeys,
    NodeKeyPaths,
    NodeSpec,
    TlsFiles,
    write_deployment_keys,
)
from flwr_robust.security.keys import key_id, load_public_key
from flwr_robust.security.mod import node_keys

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = Path(__file__).resolve().parents[2] / "shared/data/compose-spec.json"
BASE = "docker-compose.yml"
TLS = "deploy/compose.tls.yml"
AUTH = "deploy/compose.auth.yml"
STACKS = {"insecure": [BASE], "tls": [BASE, TLS], "tls+auth": [BASE, TLS, AUTH]}
RUN_CONFIG = ROOT / "deploy/run-config.toml"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
FLWR_PIN = next(
    m.group(1)
    for dep in PYPROJECT["project"]["dependencies"]
    if (m := re.fullmatch(r"flwr(?:\[[\w,]+\])?==([\w.]+)", dep.replace(" ", "")))
)
APP_IMAGE = f"flwr-robust-superexec:{PYPROJECT['project']['version']}"


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / name).read_text())


def volume_entry(entry: str | dict[str, Any]) -> dict[str, Any]:
    """A service volume in long syntax."""
    if isinstance(entry, dict):
        return entry
    source, target, *mode = entry.split(":")
    return {"type": "volume", "source": source, "target": target, "read_only": mode == ["ro"]}


def merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``docker compose -f base -f overlay`` for the keys these files use: services merge
    field by field, ``volumes`` by mount target, ``depends_on`` by service, anything else
    (``command`` included) is replaced; top-level ``volumes`` merge by name."""
    merged = copy.deepcopy(base)
    for name, service in overlay.get("services", {}).items():
        target = merged["services"].setdefault(name, {})
        for key, value in service.items():
            if key == "volumes":
                mounts = {volume_entry(v)["target"]: volume_entry(v) for v in target.get(key, [])}
                mounts.update({volume_entry(v)["target"]: volume_entry(v) for v in value})
                target[key] = list(mounts.values())
            elif key == "depends_on":
                target[key] = {**target.get(key, {}), **value}
            else:
                target[key] = copy.deepcopy(value)
    merged.setdefault("volumes", {}).update(overlay.get("volumes", {}))
    return merged


def stack(files: list[str]) -> dict[str, Any]:
    merged = load(files[0])
    for name in files[1:]:
        merged = merge(merged, load(name))
    return merged


def option(command: list[str], flag: str) -> str | None:
    """The value after ``flag`` in an argument list (None when absent)."""
    return command[command.index(flag) + 1] if flag in command else None


class Topology:
    """The services of one merged stack, by kind."""

    def __init__(self, compose: dict[str, Any]) -> None:
        self.compose = compose
        self.services: dict[str, dict[str, Any]] = compose["services"]
        self.superlink = self.by_image("flwr/superlink")
        self.supernodes = self.by_image("flwr/supernode")
        self.superexecs = {
            name: s
            for name, s in self.services.items()
            if s.get("image") == APP_IMAGE and "entrypoint" not in s
        }
        self.helpers = {
            name: s for name, s in self.services.items() if s.get("entrypoint") == ["flwr-robust"]
        }

    def by_image(self, repository: str) -> dict[str, dict[str, Any]]:
        return {
            name: s
            for name, s in self.services.items()
            if str(s.get("image", "")).split(":")[0] == repository
        }

    def node_config(self, name: str) -> dict[str, Any]:
        return parse_config_args([option(self.supernodes[name]["command"], "--node-config")])

    def superexec_for(self, service: str) -> tuple[str, dict[str, Any]]:
        """The SuperExec whose Runtime API address points at ``service``."""
        found = [
            (name, s)
            for name, s in self.superexecs.items()
            if option(s["command"], "--runtime-api-address").split(":")[0] == service
        ]
        assert len(found) == 1, f"{service} needs exactly one SuperExec, found {found}"
        return found[0]

    def mount(self, service: str, path: str) -> dict[str, Any]:
        """The volume of ``service`` that holds ``path`` (the deepest mount)."""
        mounts = [
            volume_entry(v)
            for v in self.services[service].get("volumes", [])
            if PurePosixPath(path).is_relative_to(volume_entry(v)["target"])
        ]
        assert mounts, f"{path} is not on a volume of {service}"
        return max(mounts, key=lambda m: len(m["target"]))


def subpath(mount: dict[str, Any]) -> str:
    return mount.get("volume", {}).get("subpath", "")


@pytest.fixture(params=list(STACKS), scope="module")
def topology(request: pytest.FixtureRequest) -> Topology:
    return Topology(stack(STACKS[request.param]))


# ------------------------------------------------------------------ files and schema
@pytest.mark.parametrize("name", [BASE, TLS, AUTH])
def test_file_follows_the_compose_specification(name: str) -> None:
    if not SCHEMA.exists():
        pytest.skip(f"the Compose specification schema is not available offline at {SCHEMA}")
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(load(name)))
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors]


def test_merged_stacks_follow_the_compose_specification() -> None:
    if not SCHEMA.exists():
        pytest.skip(f"the Compose specification schema is not available offline at {SCHEMA}")
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    for files in STACKS.values():
        errors = list(validator.iter_errors(stack(files)))
        assert not errors, (files, [e.message for e in errors])


# ------------------------------------------------------------------- versions, images
def test_flwr_pin_matches_the_installed_flwr() -> None:
    assert flwr.__version__ == FLWR_PIN


@pytest.mark.parametrize("name", [BASE, TLS, AUTH])
def test_images_are_pinned_to_the_flwr_version(name: str) -> None:
    for service_name, service in load(name)["services"].items():
        image = service.get("image", "")
        if image.startswith("flwr/"):
            assert image.split(":")[1] == FLWR_PIN, (service_name, image)
        if "build" in service:
            assert image == APP_IMAGE, service_name
            assert service["build"] == {
                "context": ".",
                "dockerfile": "Dockerfile",
                "args": {"FLWR_VERSION": FLWR_PIN},
            }, service_name


def test_dockerfile_matches_the_package() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(rf"^ARG FLWR_VERSION={re.escape(FLWR_PIN)}$", text, re.MULTILINE)
    python = re.fullmatch(r">=3\.(\d+),<3\.(\d+)", PYPROJECT["project"]["requires-python"])
    assert python and int(python.group(2)) == int(python.group(1)) + 1
    assert re.search(
        rf"^FROM flwr/superexec:\${{FLWR_VERSION}}-py3\.{python.group(1)}-ubuntu[\d.]+$",
        text,
        re.MULTILINE,
    ), "the app image must be Flower's SuperExec with the package's Python"
    torch = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch=="))
    assert f"ARG TORCH_VERSION={torch.split('==')[1]}" in text
    assert '--index-url "${TORCH_INDEX_URL}"' in text and "whl/cpu" in text
    assert 'ENTRYPOINT ["flower-superexec"]' in text
    copied = set(re.findall(r"^COPY --chown=app:app (\S+) \./\1$", text, re.MULTILINE))
    components = PYPROJECT["tool"]["flwr"]["app"]["components"].values()
    needed = {ref.split(".")[0] for ref in components} | {"flwr_robust"}
    assert needed <= copied, needed - copied


def test_app_components_resolve() -> None:
    for reference in PYPROJECT["tool"]["flwr"]["app"]["components"].values():
        module, attribute = reference.split(":")
        assert hasattr(importlib.import_module(module), attribute), reference


# --------------------------------------------------------------------- command lines
def test_commands_parse_with_the_installed_flower_and_flwr_robust(topology: Topology) -> None:
    for service in topology.superlink.values():
        superlink_parser().parse_args(service["command"])
    for service in topology.supernodes.values():
        supernode_parser().parse_args(service["command"])
    for service in topology.superexecs.values():
        superexec_parser().parse_args(service["command"])
    for name, service in topology.helpers.items():
        args = build_parser().parse_args(service["command"])
        assert args.command == "deploy", name


def test_topology_and_ports(topology: Topology) -> None:
    assert len(topology.superlink) == 1
    ((link_name, link),) = topology.superlink.items()
    link_port = option(link["command"], "--port")
    assert option(link["command"], "--host") == "0.0.0.0"
    assert [p.split(":")[-1] for p in link["ports"]] == [link_port]
    assert option(link["command"], "--isolation") == "process"
    assert "--disable-runtime-dependency-installation" in link["command"]
    _, serverapp = topology.superexec_for(link_name)
    assert option(serverapp["command"], "--runtime-api-address") == f"{link_name}:{link_port}"
    assert len(topology.supernodes) == 5
    for node_name, node in topology.supernodes.items():
        command = node["command"]
        assert option(command, "--superlink") == f"{link_name}:{link_port}"
        assert option(command, "--isolation") == "process"
        _, clientapp = topology.superexec_for(node_name)
        runtime = f"{node_name}:{option(command, '--port')}"
        assert option(clientapp["command"], "--runtime-api-address") == runtime
        assert option(clientapp["command"], "--root-certificates") is None  # see compose.tls.yml
    assert len(topology.superexecs) == len(topology.supernodes) + 1


def test_depends_on_and_volumes_are_declared(topology: Topology) -> None:
    declared = set(topology.compose.get("volumes", {}))
    for name, service in topology.services.items():
        assert set(service.get("depends_on", {})) <= set(topology.services), name
        sources = {volume_entry(v)["source"] for v in service.get("volumes", [])}
        assert sources <= declared, (name, sources - declared)


# ------------------------------------------------------------------- nodes and keys
def test_node_configs_are_valid_and_partitions_unique(topology: Topology) -> None:
    assert deploy.ROLES == ROLES  # the launcher's roles are the ClientApp's
    configs = [topology.node_config(name) for name in topology.supernodes]
    assert sorted(c["partition-id"] for c in configs) == list(range(len(configs)))
    assert {c["num-partitions"] for c in configs} == {len(configs)}
    assert {c["role"] for c in configs} <= set(ROLES)
    byzantine = [c for c in configs if c["role"] == "byzantine"]
    assert 1 <= len(byzantine) <= 2
    assert {c["attack"] for c in byzantine} <= set(available_attacks())
    assert all("attack" not in c for c in configs if c["role"] == "honest")


def test_node_configs_match_the_launcher_and_mounted_keys(topology: Topology) -> None:
    """Each node config is what :class:`NodeSpec` builds (``flwr-robust deploy local``
    starts the same nodes), and its key paths lie on the keys volume's ``node-<i>``
    subdirectory, mounted where its ClientApps run: in its SuperExec's container."""
    layout = DeploymentKeys(Path("/keys"))
    for name in topology.supernodes:
        config = topology.node_config(name)
        i = config["partition-id"]
        _, clientapp = topology.superexec_for(name)
        superexec = next(n for n, s in topology.superexecs.items() if s is clientapp)
        mount = topology.mount(superexec, config["signing-key"])
        assert mount["source"] == "keys" and mount["read_only"]
        assert subpath(mount) == layout.node_dir(i).name
        target = Path(mount["target"])
        paths = NodeKeyPaths(target / layout.NODE_KEY, target / layout.SERVER_PUBLIC_KEY)
        spec = NodeSpec(i, config["role"], config.get("attack", ""))
        assert config == spec.node_config(config["num-partitions"], paths)


def test_client_mod_loads_the_keys_the_node_config_names(
    topology: Topology, tmp_path: Path
) -> None:
    """The client mod, given a compose node config (container paths mapped onto keys from
    ``flwr-robust deploy keys``), finds and loads that node's keys."""
    keys = write_deployment_keys(tmp_path, len(topology.supernodes))
    for name in topology.supernodes:
        config = topology.node_config(name)
        i = config["partition-id"]
        _, clientapp = topology.superexec_for(name)
        superexec = next(n for n, s in topology.superexecs.items() if s is clientapp)
        target = topology.mount(superexec, config["signing-key"])["target"]
        local = {
            k: str(keys.node_dir(i) / PurePosixPath(v).relative_to(target))
            if k in ("signing-key", "server-public-key")
            else v
            for k, v in config.items()
        }
        context = Context(
            run_id=1,
            node_id=i + 1,
            node_config=local,
            state=RecordDict(),
            run_config={"signing": True, "keys-dir": "/nonexistent"},
        )
        loaded = node_keys(context)
        assert loaded is not None
        assert key_id(loaded.signing_key) == key_id(
            load_public_key(keys.all.client_pub(f"client-{i}"))
        )
        assert key_id(loaded.server_key) == key_id(load_public_key(keys.all.server_pub))


def test_helpers_create_the_volumes_before_anyone_mounts_them(topology: Topology) -> None:
    """Each one-shot helper writes the volume it mounts at the directory its command names,
    and every service mounting that volume waits for the helper to complete (directly or
    through another service that does)."""
    makers = {"keys": "keys", "certs": "certs", "auth-keys": "auth"}
    made_by = {}
    for name, helper in topology.helpers.items():
        command = helper["command"]
        if command[1] in makers:
            mount = topology.mount(name, command[2])
            assert mount["target"] == command[2] and mount["source"] == makers[command[1]]
            made_by[mount["source"]] = name
    assert {"keys"} <= set(made_by)

    def waits_for(service: str, helper: str) -> bool:
        for other, condition in topology.services[service].get("depends_on", {}).items():
            completed = condition.get("condition") == "service_completed_successfully"
            if (other == helper and completed) or (other != helper and waits_for(other, helper)):
                return True
        return False

    for name, service in topology.services.items():
        for mount in map(volume_entry, service.get("volumes", [])):
            helper = made_by.get(mount["source"])
            if helper is not None and helper != name:
                assert waits_for(name, helper), (name, helper)


# ----------------------------------------------------------------- ServerApp, run config
def test_run_config_matches_pyproject_and_the_topology(topology: Topology) -> None:
    overrides = parse_config_args([str(RUN_CONFIG)])
    assert set(overrides) <= set(PYPROJECT["tool"]["flwr"]["app"]["config"])
    fused = get_fused_config_from_dir(ROOT, overrides)
    settings = RunSettings.from_run_config(fused)
    configs = [topology.node_config(name) for name in topology.supernodes]
    byzantine = [c for c in configs if c["role"] == "byzantine"]
    assert settings.byzantine_partitions(len(configs)) == {c["partition-id"] for c in byzantine}
    assert settings.attack == byzantine[0]["attack"]
    assert settings.min_available_nodes == len(configs)
    rule = get_aggregator(settings.strategy, **settings.rule_params(fused))
    assert rule.min_clients() <= len(configs)
    assert settings.signing
    server, _ = topology.superexec_for(next(iter(topology.superlink)))
    mount = topology.mount(server, settings.keys_dir)
    assert mount["target"] == settings.keys_dir and mount["source"] == "keys"
    assert subpath(mount) == DeploymentKeys(Path("/keys")).server_dir.name
    assert topology.mount(server, settings.results_file)["source"] == "results"


# ------------------------------------------------------------------- TLS and auth
def test_tls_overlay(topology: Topology) -> None:
    ((link_name, link),) = topology.superlink.items()
    tls = "--ssl-certfile" in link["command"]
    if not tls:
        assert "--insecure" in link["command"]
        return
    assert "--insecure" not in link["command"]
    layout = TlsFiles(Path("/certs"))
    certfile = option(link["command"], "--ssl-certfile")
    mount = topology.mount(link_name, certfile)
    assert mount["source"] == "certs" and subpath(mount) == layout.superlink_dir.name
    assert link["command"][: len(layout.superlink_args())] == layout.superlink_args(
        Path(mount["target"])
    )
    server, _ = topology.superexec_for(link_name)
    for name in (server, *topology.supernodes):
        command = topology.services[name]["command"]
        assert "--insecure" not in command
        ca = option(command, "--root-certificates")
        mount = topology.mount(name, ca)
        assert mount["source"] == "certs" and subpath(mount) == layout.ca_cert.parent.name
        assert PurePosixPath(ca).name == layout.ca_cert.name
    certgen = topology.helpers["certgen"]["command"]
    hosts = {certgen[i + 1] for i, arg in enumerate(certgen) if arg == "--host"}
    assert link_name in hosts  # the name SuperNodes and SuperExecs connect to
    assert {p.split(":")[0] for p in link["ports"]} <= hosts  # the address the CLI uses


def test_supernode_authentication_overlay(topology: Topology) -> None:
    ((link_name, link),) = topology.superlink.items()
    if "--enable-supernode-auth" not in link["command"]:
        assert all(
            "--auth-supernode-private-key" not in s["command"] for s in topology.supernodes.values()
        )
        return
    assert "--ssl-certfile" in link["command"]
    layout = AuthKeys(Path("/auth"))
    authgen = topology.helpers["authgen"]["command"]
    assert option(authgen, "--nodes") == str(len(topology.supernodes))
    register = topology.helpers["register"]
    link_port = option(link["command"], "--port")
    assert option(register["command"], "--superlink") == f"{link_name}:{link_port}"
    public = topology.mount("register", register["command"][2])
    assert public["source"] == "auth" and subpath(public) == layout.public_dir.name
    for name, node in topology.supernodes.items():
        i = topology.node_config(name)["partition-id"]
        key = option(node["command"], "--auth-supernode-private-key")
        mount = topology.mount(name, key)
        assert mount["source"] == "auth" and subpath(mount) == layout.node_dir(i).name
        assert PurePosixPath(key).name == layout.PRIVATE_KEY
        assert node["depends_on"]["register"]["condition"] == "service_completed_successfully"
