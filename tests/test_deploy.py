"""The files under deploy/: manifests parse and hold the settings operations rely on, and every
config they embed passes `dicom-tls-proxy check` with real certificate files beside it."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the deploy manifests")

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
REPO = DEPLOY.parent
UNIT = DEPLOY / "systemd" / "dicom-tls-proxy.service"
DOCKERFILE = DEPLOY / "container" / "Dockerfile"
CONFIG_IN_IMAGE = "/etc/dicom-tls-proxy/config.toml"
CERTS_IN_IMAGE = "/etc/dicom-tls-proxy/certs"
METRICS_PORT = 9102


# -- readers ----------------------------------------------------------------------------------


def manifests(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text()) if d]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    return data


def configmap_toml(name: str) -> str:
    text: str = one(manifests(name), "ConfigMap")["data"]["config.toml"]
    return text


def drain_timeout(config_text: str) -> float:
    return float(tomllib.loads(config_text).get("proxy", {}).get("drain_timeout", 30.0))


def unit_directives() -> dict[str, list[str]]:
    """Key -> values, in order (systemd allows repeated keys); comments and sections skipped."""
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        word, _, rest = (pending + line).partition(" ")
        instructions.append((word.upper(), rest.strip()))
        pending = ""
    return instructions


def instruction(name: str) -> list[str]:
    return [args for word, args in dockerfile() if word == name]


# -- Kubernetes -------------------------------------------------------------------------------


def check_pod_spec(spec: dict[str, Any], config_text: str) -> dict[str, Any]:
    """Settings both manifests share; returns the proxy container."""
    assert spec["terminationGracePeriodSeconds"] > drain_timeout(config_text)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["fsGroup"]
    proxy = next(c for c in spec["containers"] if c["name"] == "proxy")
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": METRICS_PORT}
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": METRICS_PORT}
    # kubelet probes the pod's address: the metrics endpoint must not be on loopback only.
    assert tomllib.loads(config_text)["metrics"]["bind"] == f"0.0.0.0:{METRICS_PORT}"
    for container in spec["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"]
    assert proxy["args"] == ["run", "-c", CONFIG_IN_IMAGE]
    mounts = {m["mountPath"]: m for m in proxy["volumeMounts"]}
    assert mounts[CONFIG_IN_IMAGE]["readOnly"] and mounts[CERTS_IN_IMAGE]["readOnly"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    secret = volumes[mounts[CERTS_IN_IMAGE]["name"]]["secret"]
    assert secret["secretName"]
    assert secret["defaultMode"] == 0o440
    return proxy


def test_gateway_manifest() -> None:
    docs = manifests("gateway.yaml")
    kinds = {d["kind"] for d in docs}
    assert kinds == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] >= 2
    template = deployment["spec"]["template"]
    check_pod_spec(template["spec"], configmap_toml("gateway.yaml"))
    configmap = one(docs, "ConfigMap")["metadata"]["name"]
    assert any(v.get("configMap", {}).get("name") == configmap for v in template["spec"]["volumes"])

    labels = template["metadata"]["labels"]
    service = one(docs, "Service")["spec"]
    assert service["type"] in ("ClusterIP", "LoadBalancer")
    assert service["ports"] == [
        {"name": "dicom-tls", "port": 2762, "targetPort": 2762, "protocol": "TCP"}
    ]
    assert service["selector"].items() <= labels.items()
    pdb = one(docs, "PodDisruptionBudget")["spec"]
    assert pdb["minAvailable"] == 1
    assert pdb["selector"]["matchLabels"].items() <= labels.items()


def test_sidecar_pod_manifest() -> None:
    docs = manifests("sidecar-pod.yaml")
    assert {d["kind"] for d in docs} == {"ConfigMap", "Pod"}
    spec = one(docs, "Pod")["spec"]
    assert {c["name"] for c in spec["containers"]} == {"modality", "proxy"}
    config = configmap_toml("sidecar-pod.yaml")
    check_pod_spec(spec, config)
    # Same network namespace: the proxy reaches the application on loopback.
    assert [r["upstream"] for r in tomllib.loads(config)["route"]] == ["127.0.0.1:104"]


# -- compose ----------------------------------------------------------------------------------


def test_compose_sidecar() -> None:
    services = compose()["services"]
    assert set(services) == {"modality", "proxy"}
    proxy = services["proxy"]
    assert proxy["build"]["dockerfile"] == "deploy/container/Dockerfile"
    assert (DEPLOY / "compose" / proxy["build"]["context"]).resolve() == REPO
    assert proxy["ports"] == ["2762:2762"]
    assert "ports" not in services["modality"]  # plaintext only on the compose network
    assert {
        "./config/config.toml:/etc/dicom-tls-proxy/config.toml:ro",
        "./certs:/etc/dicom-tls-proxy/certs:ro",
    } <= set(proxy["volumes"])
    config = (DEPLOY / "compose" / "config" / "config.toml").read_text()
    grace = re.fullmatch(r"(\d+)s", proxy["stop_grace_period"])
    assert grace and int(grace[1]) > drain_timeout(config)
    # The route names the modality service and the port its storescp listens on.
    assert [r["upstream"] for r in tomllib.loads(config)["route"]] == ["modality:104"]
    modality_cmd = (DEPLOY / "compose" / "modality" / "Dockerfile").read_text()
    assert re.search(r'^CMD \[.*"storescp".*"104"\]$', modality_cmd, re.MULTILINE)
    # The image's HEALTHCHECK calls 127.0.0.1:9102 inside the container.
    host, _, port = tomllib.loads(config)["metrics"]["bind"].rpartition(":")
    assert host in ("127.0.0.1", "0.0.0.0") and int(port) == METRICS_PORT


# -- embedded configs pass `check` ------------------------------------------------------------


CONFIGS = {
    "compose": lambda: (DEPLOY / "compose" / "config" / "config.toml").read_text(),
    "k8s-gateway": lambda: configmap_toml("gateway.yaml"),
    "k8s-sidecar": lambda: configmap_toml("sidecar-pod.yaml"),
    "systemd": lambda: (DEPLOY / "systemd" / "config.toml").read_text(),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_config_passes_check(name: str, pki: Path, tmp_path: Path) -> None:
    """Each config names certs/... relative to its folder, as in the image and /etc; the folders
    systemd creates (LogsDirectory=, RuntimeDirectory=) become temporary ones."""
    text = CONFIGS[name]()
    for folder in ("/var/log/dicom-tls-proxy", "/run/dicom-tls-proxy"):
        stand_in = tmp_path / folder.strip("/").replace("/", "-")
        stand_in.mkdir()
        text = text.replace(folder + "/", f"{stand_in}/")
    shutil.copytree(pki, tmp_path / "certs")
    (tmp_path / "config.toml").write_text(text)
    done = subprocess.run(
        [sys.executable, "-m", "dicom_tls_proxy", "check", "-c", str(tmp_path / "config.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", f"warnings from an example config: {done.stderr}"


# -- systemd ----------------------------------------------------------------------------------


def test_systemd_unit_settings() -> None:
    unit = unit_directives()
    single = {key: values[-1] for key, values in unit.items()}
    assert single["Type"] == "notify" and single["NotifyAccess"] == "main"
    config = "-c /etc/dicom-tls-proxy/config.toml"
    assert single["ExecStartPre"].endswith(f"dicom-tls-proxy check {config}")
    assert single["ExecStart"].endswith(f"dicom-tls-proxy run {config}")
    assert single["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert single["User"] == single["Group"] == "dicom-tls-proxy"
    for key in ("AmbientCapabilities", "CapabilityBoundingSet"):
        assert single[key] == "CAP_NET_BIND_SERVICE"
    assert "2" in single["RestartPreventExitStatus"].split()
    # One SIGTERM to the supervisor: a second one (KillMode=control-group) would stop at once.
    assert single["KillMode"] == "mixed"
    example = (DEPLOY / "systemd" / "config.toml").read_text()
    assert int(single["TimeoutStopSec"]) > drain_timeout(example)
    # cffi's ffi.callback (pyOpenSSL's verify callback) needs W+X memory: `run` cannot start.
    assert single.get("MemoryDenyWriteExecute", "no") == "no"
    for key in ("ProtectSystem", "ProtectHome", "NoNewPrivileges", "PrivateTmp", "PrivateDevices"):
        assert key in single, key


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    # `verify` fails on Exec* binaries that do not exist, and the unit names the install path
    # /opt/dicom-tls-proxy/bin/dicom-tls-proxy. A copy names this interpreter instead (the rest of
    # each command line is kept); the user need not exist for `verify`.
    text = UNIT.read_text().replace("/opt/dicom-tls-proxy/bin/dicom-tls-proxy", sys.executable)
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    done = subprocess.run([analyze, "verify", copy], capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    # Unknown or misspelt keys are only warnings (exit 0), each naming the file.
    assert UNIT.name not in output, output


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sd_notify is Linux-only")
@pytest.mark.parametrize("workers", [1, 2])
def test_ready_comes_from_the_main_process(workers: int, pki: Path, tmp_path: Path) -> None:
    """The unit says Type=notify, NotifyAccess=main: systemd accepts READY=1 only from the
    process it started. A stand-in $NOTIFY_SOCKET records who sends it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    shutil.copytree(pki, tmp_path / "certs")
    config = tmp_path / "config.toml"
    config.write_text(
        f"[proxy]\nworkers = {workers}\n"
        '[tls.in]\ncertificate = "certs/proxy.pem"\nprivate_key = "certs/proxy.key"\n'
        'ca = "certs/ca.pem"\n'
        f'[[listener]]\nname = "in"\nbind = "127.0.0.1:{port}"\ntls = "in"\n'
        '[[route]]\ncalled_ae = "ANY"\nupstream = "127.0.0.1:9"\n'
    )
    name = f"dicom-tls-proxy-test-{os.getpid()}-{tmp_path.name}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind("\0" + name)
        notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        notify.settimeout(30)
        proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_tls_proxy", "run", "-c", str(config)],
            env={**os.environ, "NOTIFY_SOCKET": "@" + name},
            stderr=subprocess.DEVNULL,
        )
        try:
            while True:
                message, ancillary, _, _ = notify.recvmsg(4096, socket.CMSG_SPACE(12))
                if b"READY=1" in message.split(b"\n"):
                    break
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    (sender,) = [
        struct.unpack("iII", data)[0]
        for level, kind, data in ancillary
        if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
    ]
    assert sender == proc.pid


# -- container image --------------------------------------------------------------------------


def test_dockerfile() -> None:
    assert instruction("FROM") == ["python:3.11-slim"]
    users = instruction("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "--uid 10001" in " ".join(instruction("RUN"))
    assert "2762" in " ".join(instruction("EXPOSE")).split()
    assert instruction("STOPSIGNAL") == ["SIGTERM"]
    assert json.loads(instruction("ENTRYPOINT")[-1]) == ["dicom-tls-proxy"]
    assert json.loads(instruction("CMD")[-1]) == ["run", "-c", CONFIG_IN_IMAGE]
    # Built from the repository root: what it copies is there.
    copies = instruction("COPY")
    assert copies
    for args in copies:
        *sources, _ = args.split()
        for source in sources:
            assert (REPO / source).exists(), source


def test_dockerfile_healthcheck_is_valid_python() -> None:
    (healthcheck,) = instruction("HEALTHCHECK")
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
    assert command[:2] == ["python", "-c"]
    assert f"http://127.0.0.1:{METRICS_PORT}/healthz" in command[2]
    compile(command[2], "HEALTHCHECK", "exec")
