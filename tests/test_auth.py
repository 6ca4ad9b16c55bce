"""Who may call, and whose money it is: API keys, roles, tenant isolation and TLS, against a
real `gmv serve` (the session's Milvus) and real keys made with `gmv keys`."""
from __future__ import annotations

import datetime
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from gmv_client import GMVClient
from gmv_engine.datasets import read_heldout

from helpers import start_server, stop_server

pytestmark = pytest.mark.e2e  # starts real servers or subprocesses

NODE_CLIENT = Path(__file__).resolve().parent.parent / "client" / "node"


def gmv_keys(data_dir: Path, *args: str) -> str:
    run = subprocess.run([sys.executable, "-m", "gmv_server.cli", "keys", *args, "--data-dir", str(data_dir)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def code_of(call) -> grpc.StatusCode | None:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return None


def eventually(condition, timeout_s: float = 10.0) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"not within {timeout_s} s"
        time.sleep(0.2)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def images(digits):
    return [example[0].read_bytes() for example in read_heldout(digits.heldout)[:6]]


def test_keys_roles_tenants_and_revocation_on_a_running_server(milvus, digits_collection, images, tmp_path):
    data_dir = tmp_path / "server"
    data_dir.mkdir()
    server = start_server(milvus, digits_collection[0], data_dir / "server.log")
    target = server["target"]
    try:
        # No key exists yet: an open server (loopback), the tenant is the request's word.
        with GMVClient(target, retries=0) as open_client:
            assert len(open_client.attribute(images[0], "before-keys", tenant_id="early").credits) == 10
            # The first key closes it, within seconds, on the running server.
            key_a = gmv_keys(data_dir, "create", "--tenant", "a", "--role", "attribute", "--role", "read")
            outcomes = []  # the calls that still got in, before the server saw the key, are recorded
            waited = eventually(lambda: outcomes.append(code_of(lambda: open_client.attribute(
                images[0], f"after-keys-{len(outcomes)}"))) or outcomes[-1] == grpc.StatusCode.UNAUTHENTICATED)
            open_generations = 1 + outcomes.count(None)
            print(f"a new first key applied after {waited:.1f} s")
        key_b = gmv_keys(data_dir, "create", "--tenant", "b", "--role", "attribute", "--role", "read")
        admin = gmv_keys(data_dir, "create", "--tenant", "ops", "--role", "admin")
        reader = gmv_keys(data_dir, "create", "--tenant", "a", "--role", "read")
        assert key_a.startswith("gmv_") and len({key_a, key_b, admin, reader}) == 4
        with GMVClient(target, retries=0, api_key="gmv_0000_not-a-key") as forged:
            assert code_of(lambda: forged.attribute(images[0], "x")) == grpc.StatusCode.UNAUTHENTICATED
        with GMVClient(target, retries=0, api_key=key_a) as a, GMVClient(target, retries=0, api_key=key_b) as b, \
                GMVClient(target, retries=0, api_key=admin) as ops, GMVClient(target, retries=0, api_key=reader) as r:
            # The same generation_id from two tenants: two generations, each its own credits.
            first_a, first_b = a.attribute(images[1], "shared-1"), b.attribute(images[2], "shared-1")
            assert (first_a.ledger, first_b.ledger) == ("recorded", "recorded")
            assert [c.training_id for c in first_a.credits] != [c.training_id for c in first_b.credits]
            again_a, again_b = a.attribute(images[1], "shared-1"), b.attribute(images[2], "shared-1")
            assert (again_a.ledger, again_b.ledger) == ("replayed", "replayed")
            assert again_a.credits == first_a.credits and again_b.credits == first_b.credits
            b.attribute(images[3], "b-only")
            # Reading: each tenant its own; another's is refused; an admin sees any or all.
            assert b.top_contributors(limit=0).generations == 2
            assert a.top_contributors(limit=0).generations == 1
            assert code_of(lambda: b.top_contributors(tenant_id="a")) == grpc.StatusCode.PERMISSION_DENIED
            assert code_of(lambda: b.valuation(tenant_id="a")) == grpc.StatusCode.PERMISSION_DENIED
            assert ops.top_contributors(limit=0, tenant_id="a").generations == 1
            assert ops.top_contributors(limit=0).generations == 1 + 2 + open_generations  # a, b, the open server's
            # Writing as another tenant, or without the role, is refused.
            assert code_of(lambda: b.attribute(images[4], "as-a", tenant_id="a")) == grpc.StatusCode.PERMISSION_DENIED
            assert code_of(lambda: r.attribute(images[4], "reader")) == grpc.StatusCode.PERMISSION_DENIED
            assert r.top_contributors(limit=0).generations == 1
            assert b.attribute(images[4], "own", tenant_id="b").ledger == "recorded"  # repeating its own tenant is fine
            # Revoked on the running server: refused within seconds.
            gmv_keys(data_dir, "revoke", key_a)
            waited = eventually(lambda: code_of(lambda: a.index_info()) == grpc.StatusCode.UNAUTHENTICATED)
            print(f"a revocation applied after {waited:.1f} s")
            assert b.index_info().collection == digits_collection[0]
        expiring = gmv_keys(data_dir, "create", "--tenant", "c", "--role", "read", "--expires-in", "1s")
        with GMVClient(target, retries=0, api_key=expiring) as c:
            eventually(lambda: code_of(lambda: c.index_info()) == grpc.StatusCode.UNAUTHENTICATED)
        listing = gmv_keys(data_dir, "list")
        assert key_a not in listing and key_a.split("_")[1] in listing  # ids only, never a secret
    finally:
        stop_server(server)
    log = server["log"].read_text()
    assert key_a not in log and key_b not in log and admin not in log


def write_certificates(directory: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1/localhost, made here with `cryptography`."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject: str, key, issuer_name, issuer_key, ca: bool, names=()):
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gmv test CA")])
    ca_cert = certificate("gmv test CA", ca_key, ca_name, ca_key, True)
    server_cert = certificate("localhost", server_key, ca_name, ca_key, False,
                              [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = certificate("studio-7", client_key, ca_name, ca_key, False)  # its common name: its tenant
    paths = {"ca": directory / "ca.pem", "cert": directory / "server.pem", "key": directory / "server-key.pem",
             "client_cert": directory / "client.pem", "client_key": directory / "client-key.pem"}
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for name, cert, key in (("", server_cert, server_key), ("client_", client_cert, client_key)):
        paths[f"{name}cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{name}key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    return paths


def test_tls_with_a_key_from_python_and_from_a_node_client_built_from_the_proto(milvus, digits_collection, images,
                                                                             tmp_path):
    data_dir = tmp_path / "tls"
    data_dir.mkdir()
    pem = write_certificates(tmp_path)
    key = gmv_keys(data_dir, "create", "--tenant", "node", "--role", "attribute", "--role", "read")
    from gmv_engine.milvus.embedded import free_port
    from gmv_server.healthcheck import check

    health_port = free_port()
    server = start_server(milvus, digits_collection[0], data_dir / "server.log", "--tls-cert", str(pem["cert"]),
                          "--tls-key", str(pem["key"]), "--health-port", str(health_port), health_tls_ca=pem["ca"])
    try:
        assert check(f"127.0.0.1:{health_port}") == "SERVING"  # plaintext, health alone, for probes
        with GMVClient(server["target"], retries=0, tls_ca=str(pem["ca"]), api_key=key) as client:
            assert client.attribute(images[0], "tls-python").ledger == "recorded"
        with GMVClient(server["target"], retries=0, tls_ca=str(pem["ca"])) as keyless:
            assert code_of(lambda: keyless.index_info()) == grpc.StatusCode.UNAUTHENTICATED
        with GMVClient(server["target"], retries=0, timeout_s=3, api_key=key) as plaintext:
            assert code_of(lambda: plaintext.index_info()) == grpc.StatusCode.UNAVAILABLE  # the port speaks TLS only
        if shutil.which("node") is None:
            pytest.skip("Node.js is not installed")
        if not (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir():
            pytest.fail("client/node/node_modules is missing: `make test` installs it with npm ci")
        paths = []
        for n, image in enumerate(images[:3]):
            path = tmp_path / f"tls-{n}.png"
            path.write_bytes(image)
            paths.append(str(path))
        run = subprocess.run(["node", str(NODE_CLIENT / "gmv_client.js"), f"localhost:{server['port']}", *paths],
                             capture_output=True, text=True, timeout=120,
                             env={"PATH": shutil.os.environ["PATH"], "GMV_TLS_CA": str(pem["ca"]), "GMV_API_KEY": key})
        assert run.returncode == 0, run.stderr
        reply = json.loads(run.stdout)
        assert len(reply["credits"]) == 5 and reply["invalid"] == "INVALID_ARGUMENT"
        assert reply["top"]["generations"] >= 4  # tls-python and the Node client's, all tenant "node"
    finally:
        stop_server(server)


def test_mutual_tls_the_client_certificate_is_the_callers_tenant(milvus, digits_collection, images, tmp_path):
    data_dir = tmp_path / "mtls"
    data_dir.mkdir()
    pem = write_certificates(tmp_path)
    server = start_server(milvus, digits_collection[0], data_dir / "server.log", "--tls-cert", str(pem["cert"]),
                          "--tls-key", str(pem["key"]), "--tls-client-ca", str(pem["ca"]),
                          health_port_flag=True)
    try:
        with GMVClient(server["target"], retries=0, tls_ca=str(pem["ca"]), tls_cert=str(pem["client_cert"]),
                       tls_key=str(pem["client_key"])) as client:
            assert client.attribute(images[0], "mtls-1").ledger == "recorded"
            assert client.top_contributors(limit=0).generations == 1  # tenant studio-7's own
            assert code_of(lambda: client.top_contributors(tenant_id="other")) == grpc.StatusCode.PERMISSION_DENIED
        with GMVClient(server["target"], retries=0, timeout_s=3, tls_ca=str(pem["ca"])) as anonymous:
            assert code_of(lambda: anonymous.index_info()) == grpc.StatusCode.UNAVAILABLE  # the handshake fails
    finally:
        stop_server(server)
    from gmv_engine.ledger import open_ledger

    with open_ledger(str(data_dir / "ledger.sqlite3")) as ledger:
        assert ledger.get("mtls-1", "studio-7") is not None


def test_a_non_loopback_bind_without_authentication_is_refused(milvus, digits_collection, tmp_path):
    run = subprocess.run([sys.executable, "-m", "gmv_server.cli", "serve", "--collection", digits_collection[0],
                          "--host", "0.0.0.0", "--port", "0", "--milvus-uri", milvus.uri, "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "refusing to serve 0.0.0.0 with no authentication" in run.stderr


def test_a_tenant_past_its_rate_is_refused_while_another_is_served(milvus, digits_collection, images, tmp_path):
    data_dir = tmp_path / "rates"
    data_dir.mkdir()
    server = start_server(milvus, digits_collection[0], data_dir / "server.log", "--tenant-rate-limit", "2")
    try:
        with GMVClient(server["target"], retries=0) as client:
            codes = [code_of(lambda n=n: client.attribute(images[n % len(images)], f"burst-{n}", tenant_id="busy",
                                                          record=False)) for n in range(8)]
            assert codes[:2] == [None, None] and grpc.StatusCode.RESOURCE_EXHAUSTED in codes, codes
            assert code_of(lambda: client.attribute(images[0], "calm-1", tenant_id="calm", record=False)) is None
        with GMVClient(server["target"], timeout_s=30) as patient:  # the SDK's backoff rides it out
            assert all(patient.attribute(images[0], f"later-{n}", tenant_id="busy", record=False).credits
                       for n in range(4))
    finally:
        stop_server(server)


def test_missing_or_non_pem_tls_files_are_refused_before_anything_starts(tmp_path):
    not_pem = tmp_path / "cert.pem"
    not_pem.write_text("not a certificate")
    for key, message in ((tmp_path / "missing.pem", "tls_key .*No such file"), (not_pem, "tls_key .* is not a PEM file")):
        run = subprocess.run([sys.executable, "-m", "gmv_server.cli", "serve", "--collection", "c", "--tls-cert",
                              str(not_pem), "--tls-key", str(key), "--data-dir", str(tmp_path / "data")],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        assert re.search(message, run.stderr), run.stderr
    assert not (tmp_path / "data" / "milvus").exists()  # refused before Milvus started
