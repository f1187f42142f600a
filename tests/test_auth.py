"""Authentication and ownership over real gRPC on 127.0.0.1: bearer tokens on the orchestrator (no token, wrong
token, another principal's job, admin), the service token on the scene and guidance servers, open health checks,
the v1 -> v2 job-table migration, and TLS with a certificate made here."""

from __future__ import annotations

import datetime
import sqlite3
import time
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from magic3d.v1 import orchestrator_pb2, orchestrator_pb2_grpc, scene_pb2, scene_pb2_grpc

from services.guidance import standalone
from services.guidance.config import GuidanceConfig, PriorSpec
from services.orchestrator import server as orchestrator_server
from services.orchestrator.jobs import CheckpointRef, JobStore
from services.scene import server as scene_server
from shared.guidance_api import PriorKind
from shared.auth import (
    AuthConfig,
    AuthNotConfigured,
    ClientTlsConfig,
    Principal,
    TlsConfig,
    TokenTable,
    bearer_token,
    server_tokens,
)
from shared.errors import Unauthenticated
from shared.grpcio import free_port, insecure_channel
from shared.guidance_client import GuidanceClient
from shared.registry import Registry
from shared.store import ArtifactNotFound, LocalStore, S3Settings

CONFIG_DIR = Path(__file__).resolve().parent.parent / "deploy" / "config"
ALICE, BOB, ADMIN = "alice-token-0123456789", "bob-token-0123456789ab", "admin-token-0123456789"
SERVICE_TOKEN = "service-token-0123456789"


class NoPriorCheck:
    def check_prompt(self, *args, **kwargs):
        return None


def _tokens_file(root: Path) -> Path:
    path = root / "tokens.yaml"
    path.write_text(yaml.safe_dump({
        ALICE: {"principal": "alice"}, BOB: {"principal": "bob"}, ADMIN: {"principal": "ops", "admin": True},
    }))
    return path


@pytest.fixture(scope="module")
def orchestrator(tmp_path_factory):
    """An orchestrator with client tokens; its scene replica is a closed port, so jobs stay unfinished."""
    root = tmp_path_factory.mktemp("auth")
    config = orchestrator_server.OrchestratorConfig(
        port=0, database_path=root / "jobs.db", store_uri=str(root / "store"),
        scene_replicas=[f"127.0.0.1:{free_port()}"], presets_path=CONFIG_DIR / "presets.yaml",
        auth=AuthConfig(tokens_file=_tokens_file(root)),
    )
    running = orchestrator_server.start(config, priors=NoPriorCheck())
    channel = insecure_channel(running.address)
    yield running, orchestrator_pb2_grpc.OrchestratorServiceStub(channel), channel
    channel.close()
    running.stop(grace=None)


def _as(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _submit(stub, token: str, prompt: str = "a red torus", request_id: str = "") -> orchestrator_pb2.Job:
    request = orchestrator_pb2.SubmitJobRequest(
        spec=orchestrator_pb2.JobSpec(text=orchestrator_pb2.TextInput(prompt=prompt)), request_id=request_id
    )
    return stub.SubmitJob(request, timeout=30, metadata=_as(token)).job


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "DESCRIPTOR"):
            list(result)
    return caught.value.code(), caught.value.details() or ""


# -- tokens -----------------------------------------------------------------------------------------------------

def test_token_table_lookup_and_no_token_in_repr(tmp_path):
    table = TokenTable.load(_tokens_file(tmp_path))
    assert table.lookup(ALICE) == Principal("alice")
    assert table.lookup(ADMIN) == Principal("ops", admin=True)
    assert table.lookup(ALICE[:-1]) is None and table.lookup("") is None
    assert ALICE not in repr(table)
    (tmp_path / "short.yaml").write_text(yaml.safe_dump({"short": {"principal": "x"}}))
    with pytest.raises(ValueError, match="at least 16"):
        TokenTable.load(tmp_path / "short.yaml")


def test_bearer_token_parsing():
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("Authorization", "bearer  abc ")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) is None
    assert bearer_token([("x-other", "Bearer abc")]) is None
    assert bearer_token(None) is None


def test_no_tokens_is_refused_beyond_loopback_unless_allowed():
    empty = TokenTable({})
    assert server_tokens(empty, "127.0.0.1", False, "t") is None
    assert server_tokens(empty, "localhost", False, "t") is None
    for host in ("0.0.0.0", "10.1.2.3", "orchestrator.magic3d.svc", "::"):
        with pytest.raises(AuthNotConfigured, match="allow_unauthenticated"):
            server_tokens(empty, host, False, "t")
    assert server_tokens(empty, "0.0.0.0", True, "t") is None


def test_orchestrator_on_all_interfaces_without_tokens_does_not_start(tmp_path):
    config = orchestrator_server.OrchestratorConfig(
        host="0.0.0.0", port=0, database_path=tmp_path / "jobs.db", store_uri=str(tmp_path / "store"),
        presets_path=CONFIG_DIR / "presets.yaml",
    )
    with pytest.raises(AuthNotConfigured):
        orchestrator_server.start(config, priors=NoPriorCheck())


# -- the orchestrator's edge ------------------------------------------------------------------------------------

def test_no_token_is_unauthenticated(orchestrator):
    _, stub, _ = orchestrator
    calls = [
        lambda: stub.ListJobs(orchestrator_pb2.ListJobsRequest(), timeout=10),
        lambda: stub.GetJob(orchestrator_pb2.GetJobRequest(name="jobs/x"), timeout=10),
        lambda: stub.SubmitJob(orchestrator_pb2.SubmitJobRequest(), timeout=10),
        lambda: stub.WatchJob(orchestrator_pb2.WatchJobRequest(name="jobs/x"), timeout=10),
    ]
    for call in calls:
        code, message = _code(call)
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "Bearer" in message


def test_wrong_token_is_unauthenticated_and_not_echoed(orchestrator):
    _, stub, _ = orchestrator
    wrong = "not-a-token-but-long-enough"
    code, message = _code(lambda: stub.ListJobs(orchestrator_pb2.ListJobsRequest(), timeout=10, metadata=_as(wrong)))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert wrong not in message
    code, _ = _code(lambda: stub.ListJobs(
        orchestrator_pb2.ListJobsRequest(), timeout=10, metadata=(("authorization", f"Basic {ALICE}"),)
    ))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_health_needs_no_token(orchestrator):
    _, _, channel = orchestrator
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_another_principals_job_is_permission_denied_and_not_listed(orchestrator):
    _, stub, _ = orchestrator
    job = _submit(stub, ALICE, "alice's torus")
    name = job.name
    assert stub.GetJob(orchestrator_pb2.GetJobRequest(name=name), timeout=10, metadata=_as(ALICE)).job.name == name
    calls = {
        "get": lambda: stub.GetJob(orchestrator_pb2.GetJobRequest(name=name), timeout=10, metadata=_as(BOB)),
        "watch": lambda: stub.WatchJob(orchestrator_pb2.WatchJobRequest(name=name), timeout=10, metadata=_as(BOB)),
        "cancel": lambda: stub.CancelJob(orchestrator_pb2.CancelJobRequest(name=name), timeout=10, metadata=_as(BOB)),
        "delete": lambda: stub.DeleteJob(orchestrator_pb2.DeleteJobRequest(name=name), timeout=10, metadata=_as(BOB)),
    }
    for what, call in calls.items():
        code, message = _code(call)
        assert code == grpc.StatusCode.PERMISSION_DENIED, what
        assert "another principal" in message
    bob_sees = stub.ListJobs(orchestrator_pb2.ListJobsRequest(), timeout=10, metadata=_as(BOB)).jobs
    assert name not in [j.name for j in bob_sees]
    alice_sees = stub.ListJobs(orchestrator_pb2.ListJobsRequest(), timeout=10, metadata=_as(ALICE)).jobs
    assert name in [j.name for j in alice_sees]
    # Bob cannot start an edit of Alice's job either (it would read her scene).
    edit = orchestrator_pb2.JobSpec(edit=orchestrator_pb2.EditInput(source_job_id=name, prompt="mine now"))
    code, _ = _code(lambda: stub.SubmitJob(orchestrator_pb2.SubmitJobRequest(spec=edit), timeout=10, metadata=_as(BOB)))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    # Not cancelled by Bob's attempt.
    state = stub.GetJob(orchestrator_pb2.GetJobRequest(name=name), timeout=10, metadata=_as(ALICE)).job.state
    assert state != orchestrator_pb2.JOB_STATE_CANCELLED


def test_request_ids_are_per_principal(orchestrator):
    _, stub, _ = orchestrator
    alice_job = _submit(stub, ALICE, "same words", request_id="req-shared")
    assert _submit(stub, ALICE, "same words", request_id="req-shared").name == alice_job.name  # idempotent retry
    bob_job = _submit(stub, BOB, "same words", request_id="req-shared")
    assert bob_job.name != alice_job.name  # Bob neither gets nor learns Alice's job


def test_admin_sees_and_manages_every_job(orchestrator):
    _, stub, _ = orchestrator
    alice_job = _submit(stub, ALICE, "for the admin")
    bob_job = _submit(stub, BOB, "also for the admin")
    listed = [j.name for j in stub.ListJobs(orchestrator_pb2.ListJobsRequest(page_size=1000), timeout=10, metadata=_as(ADMIN)).jobs]
    assert alice_job.name in listed and bob_job.name in listed
    assert stub.GetJob(orchestrator_pb2.GetJobRequest(name=bob_job.name), timeout=10, metadata=_as(ADMIN)).job.name == bob_job.name
    stub.CancelJob(orchestrator_pb2.CancelJobRequest(name=alice_job.name), timeout=10, metadata=_as(ADMIN))
    deadline = time.monotonic() + 30
    while True:  # a running job stops at its next step
        job = stub.GetJob(orchestrator_pb2.GetJobRequest(name=alice_job.name), timeout=10, metadata=_as(ADMIN)).job
        if job.state == orchestrator_pb2.JOB_STATE_CANCELLED or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert job.state == orchestrator_pb2.JOB_STATE_CANCELLED
    stub.DeleteJob(orchestrator_pb2.DeleteJobRequest(name=alice_job.name), timeout=10, metadata=_as(ADMIN))
    code, _ = _code(lambda: stub.GetJob(orchestrator_pb2.GetJobRequest(name=alice_job.name), timeout=10, metadata=_as(ALICE)))
    assert code == grpc.StatusCode.NOT_FOUND


# -- the job table ----------------------------------------------------------------------------------------------

_V1_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
INSERT INTO schema_version (version) VALUES (1);
CREATE TABLE jobs (
    job_id TEXT PRIMARY KEY, request_id TEXT NOT NULL DEFAULT '', spec BLOB NOT NULL, spec_digest TEXT NOT NULL,
    state TEXT NOT NULL, stage TEXT NOT NULL DEFAULT '', step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0, checkpoint_uri TEXT NOT NULL DEFAULT '',
    checkpoint_stage TEXT NOT NULL DEFAULT '', scene_replica TEXT NOT NULL DEFAULT '',
    artifacts TEXT NOT NULL DEFAULT '{}', provenance_uri TEXT NOT NULL DEFAULT '', error TEXT NOT NULL DEFAULT '',
    cancel_requested INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,
    create_time REAL NOT NULL, update_time REAL NOT NULL
);
CREATE UNIQUE INDEX jobs_request_id ON jobs (request_id) WHERE request_id != '';
INSERT INTO jobs (job_id, request_id, spec, spec_digest, state, create_time, update_time)
    VALUES ('job-old', 'req-1', x'', 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855', 'queued', 1.0, 1.0);
"""


def test_v1_job_table_is_migrated(tmp_path):
    path = tmp_path / "jobs.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(_V1_SCHEMA)
    conn.close()
    with JobStore(path) as store:
        old = store.get("job-old")
        assert old.owner == ""  # made before owners existed: only admins see it
        assert [r.job_id for r in store.list(owner="alice")[0]] == []
        assert [r.job_id for r in store.list()[0]] == ["job-old"]
        new, created = store.create(b"", "req-1", owner="alice")  # the same request id, another owner
        assert created and new.owner == "alice"
        assert store.create(b"", "req-1", owner="alice") == (new, False)
        assert old.checkpoints == ()  # and recorded checkpoints, none for the old jobs
        ref = CheckpointRef("coarse", 4, "file:///x.ckpt", "ab" * 32)
        assert store.update("job-old", checkpoints=[ref]).checkpoints == (ref,)
    with JobStore(path) as reopened:  # the migration ran once
        assert reopened.get(new.job_id).owner == "alice"
        assert reopened.get("job-old").checkpoints == (ref,)


# -- service token: scene and guidance --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scene_with_token(tmp_path_factory):
    root = tmp_path_factory.mktemp("scene-auth")
    token_file = root / "service-token"
    token_file.write_text(SERVICE_TOKEN + "\n")
    running = scene_server.start(
        scene_server.SceneServiceConfig(port=0, device="cpu", store_uri=str(root / "store"),
                                        auth=AuthConfig(service_token_file=token_file)),
        guidance=NoPriorCheck(),
    )
    yield running
    running.stop(grace=None)


def test_scene_service_needs_the_service_token(scene_with_token):
    request = scene_pb2.CreateSceneRequest(
        job_id="job-victim", init_checkpoint_uri="file:///nowhere.ckpt", init_checkpoint_sha256="0" * 64
    )
    for token in (None, "wrong-service-token-xxxx"):
        channel = insecure_channel(scene_with_token.address, token=token)
        stub = scene_pb2_grpc.SceneServiceStub(channel)
        code, _ = _code(lambda: stub.CreateScene(request, timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        code, _ = _code(lambda: stub.SaveCheckpoint(scene_pb2.SaveCheckpointRequest(scene_id="s"), timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        channel.close()
    with insecure_channel(scene_with_token.address, token=SERVICE_TOKEN) as channel:
        code, _ = _code(lambda: scene_pb2_grpc.SceneServiceStub(channel).CreateScene(request, timeout=10))
        assert code == grpc.StatusCode.NOT_FOUND  # past authentication: the checkpoint does not exist


def test_standalone_guidance_needs_the_service_token(tmp_path, monkeypatch):
    monkeypatch.setenv("MAGIC3D_TEST_SERVICE_TOKEN", SERVICE_TOKEN)
    config = GuidanceConfig(
        priors=[PriorSpec(name="analytic", kind=PriorKind.ANALYTIC, resolution=16)], port=0,
        auth=AuthConfig(service_token_env="MAGIC3D_TEST_SERVICE_TOKEN"),
    )
    running = standalone.start(config, warm=False)
    try:
        routes = {"priors": {"analytic": {"kind": "standalone", "address": running.address}}}
        registry = Registry.model_validate({**routes, "client": {"outage_window_s": 0}})
        with GuidanceClient(registry, token="") as anonymous:  # "" : send none (not the environment's)
            with pytest.raises(Unauthenticated):
                anonymous.list_priors("analytic", timeout_s=10)
        env_registry = Registry.model_validate(
            {**routes, "client": {"outage_window_s": 0, "service_token_env": "MAGIC3D_TEST_SERVICE_TOKEN"}}
        )
        with GuidanceClient(env_registry) as client:
            assert [p.name for p in client.list_priors("analytic", timeout_s=10)] == ["analytic"]
    finally:
        running.stop(grace=None)


# -- TLS --------------------------------------------------------------------------------------------------------

def _self_signed(root: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    import ipaddress

    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = root / "server.crt", root / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    return cert_file, key_file


def test_tls_round_trip_with_a_token(tmp_path):
    cert_file, key_file = _self_signed(tmp_path)
    config = orchestrator_server.OrchestratorConfig(
        port=0, database_path=tmp_path / "jobs.db", store_uri=str(tmp_path / "store"),
        scene_replicas=[f"127.0.0.1:{free_port()}"], presets_path=CONFIG_DIR / "presets.yaml",
        auth=AuthConfig(tokens_file=_tokens_file(tmp_path)), tls=TlsConfig(cert_file=cert_file, key_file=key_file),
    )
    running = orchestrator_server.start(config, priors=NoPriorCheck())
    try:
        with insecure_channel(running.address, token=ALICE, tls=ClientTlsConfig(ca_file=cert_file)) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            job = _submit(stub, ALICE, "over tls")
            listed = stub.ListJobs(orchestrator_pb2.ListJobsRequest(), timeout=10).jobs  # token from the channel
            assert [j.name for j in listed] == [job.name]
        with insecure_channel(running.address, token=ALICE) as plaintext:  # a plaintext client gets nowhere
            code, _ = _code(lambda: orchestrator_pb2_grpc.OrchestratorServiceStub(plaintext).ListJobs(
                orchestrator_pb2.ListJobsRequest(), timeout=5))
            assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop(grace=None)


# -- links ------------------------------------------------------------------------------------------------------

class LinkingStore(LocalStore):
    """A local store whose links differ from its stable names, like S3's presigned URLs."""

    minted = 0

    def canonical_uri(self, key: str) -> str:
        return f"s3://bucket/{self.check_key(key)}"

    def key_from_uri(self, uri: str) -> str:
        if uri.startswith("s3://bucket/"):
            return self.check_key(uri[len("s3://bucket/"):])
        if uri.startswith("https://links/"):
            return self.check_key(uri[len("https://links/"):].split("?")[0])
        raise ArtifactNotFound(uri)

    def uri(self, key: str) -> str:
        LinkingStore.minted += 1
        return f"https://links/{self.check_key(key)}?sig={LinkingStore.minted}"


def test_links_are_minted_per_request_and_never_stored(tmp_path):
    assert S3Settings(endpoint="127.0.0.1:9").link_expiry_s == 3600  # short-lived by default
    store = LinkingStore(tmp_path / "store")
    config = orchestrator_server.OrchestratorConfig(
        port=0, database_path=tmp_path / "jobs.db", store_uri=str(tmp_path / "store"),
        scene_replicas=[f"127.0.0.1:{free_port()}"], presets_path=CONFIG_DIR / "presets.yaml",
    )
    running = orchestrator_server.start(config, priors=NoPriorCheck(), store=store)
    try:
        with insecure_channel(running.address) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            job = _submit(stub, "unused-without-auth")
            job_id = job.name.removeprefix("jobs/")
            jobs = running.servicer.runner.jobs
            deadline = time.monotonic() + 30
            while not jobs.get(job_id).provenance_uri and time.monotonic() < deadline:
                time.sleep(0.1)
            assert jobs.get(job_id).provenance_uri == f"s3://bucket/jobs/{job_id}/provenance.json"
            first = stub.GetJob(orchestrator_pb2.GetJobRequest(name=job.name), timeout=10).job.artifacts
            second = stub.GetJob(orchestrator_pb2.GetJobRequest(name=job.name), timeout=10).job.artifacts
            (a,), (b,) = first, second
            assert a.uri.startswith(f"https://links/jobs/{job_id}/provenance.json?sig=") and a.uri != b.uri
            listed = stub.ListJobs(orchestrator_pb2.ListJobsRequest(), timeout=10).jobs[0].artifacts[0].uri
            assert listed.startswith("https://links/")
            assert all(v.startswith("s3://") for v in jobs.get(job_id).artifacts.values())
    finally:
        running.stop(grace=None)


def test_cli_lists_jobs_over_tls_with_a_token(tmp_path, capsys, monkeypatch):
    from services.cli import main

    monkeypatch.delenv("MAGIC3D_TOKEN", raising=False)
    cert_file, key_file = _self_signed(tmp_path)
    config = orchestrator_server.OrchestratorConfig(
        port=0, database_path=tmp_path / "jobs.db", store_uri=str(tmp_path / "store"),
        scene_replicas=[f"127.0.0.1:{free_port()}"], presets_path=CONFIG_DIR / "presets.yaml",
        auth=AuthConfig(tokens_file=_tokens_file(tmp_path)), tls=TlsConfig(cert_file=cert_file, key_file=key_file),
    )
    running = orchestrator_server.start(config, priors=NoPriorCheck())
    try:
        with insecure_channel(running.address, token=BOB, tls=ClientTlsConfig(ca_file=cert_file)) as channel:
            job = _submit(orchestrator_pb2_grpc.OrchestratorServiceStub(channel), BOB, "bob over tls")
        base = ["jobs", "list", "--address", running.address, "--ca-file", str(cert_file),
                "--state-dir", str(tmp_path / "none")]
        assert main(base + ["--token", BOB]) == 0
        assert job.name in capsys.readouterr().out
        assert main(base + ["--token", ALICE]) == 0
        assert job.name not in capsys.readouterr().out
        assert main(base) == 2  # no token at all
        assert "UNAUTHENTICATED" in capsys.readouterr().err
    finally:
        running.stop(grace=None)


def test_local_stack_tokens_are_private_and_reused(tmp_path):
    from services.local_stack import local_auth

    token, auth = local_auth(tmp_path)
    for name in ("client-token", "service-token", "tokens.yaml"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600
    assert auth.client_tokens().lookup(token) == Principal("local", admin=True)
    assert auth.service_token() and auth.service_token() != token
    again, _ = local_auth(tmp_path)
    assert again == token
    (tmp_path / "client-token").write_text("replaced-by-hand-0123456789")
    replaced, auth = local_auth(tmp_path)
    assert auth.client_tokens().lookup(replaced) == Principal("local", admin=True)
