"""`magic3d generate` against a hostile orchestrator (an in-process gRPC server on 127.0.0.1): whatever job name and
artifact names it answers, files land only inside ./out/<job>/; and the CLI finds its bearer token by itself."""

from __future__ import annotations

import argparse
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from magic3d.v1 import orchestrator_pb2, orchestrator_pb2_grpc

from services.cli import UnsafeName, client_token, download, main, safe_name
from shared.auth import bearer_token


class Hostile(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    def __init__(self, job_name: str, artifacts: list[tuple[str, str]]) -> None:
        self.job_name = job_name
        self.artifacts = artifacts
        self.tokens: list[str | None] = []

    def Generate(self, request, context):
        self.tokens.append(bearer_token(context.invocation_metadata()))
        done = orchestrator_pb2.JobDone(artifacts=[orchestrator_pb2.Artifact(kind=k, uri=u) for k, u in self.artifacts])
        yield orchestrator_pb2.GenerateResponse(event=orchestrator_pb2.JobEvent(job_name=self.job_name, done=done))


def _serve(servicer) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", ["../../evil", "/tmp/x", "..", ".", "", ".hidden", "a/b", "a\\b", "x" * 200, "a..b"])
def test_unsafe_names_are_refused(name):
    with pytest.raises(UnsafeName):
        safe_name(name, "artifact name")


@pytest.mark.parametrize("name", ["model.glb", "coarse.ckpt", "provenance.json", "turntable.gif", "job-0123abcd"])
def test_plain_names_pass(name):
    assert safe_name(name, "artifact name") == name


def test_hostile_artifact_names_write_nothing_outside_the_job_folder(tmp_path, capsys):
    source = tmp_path / "store" / "model.glb"
    source.parent.mkdir()
    source.write_bytes(b"glb")
    link = source.as_uri()
    artifacts = [("../../evil", link), ("/tmp/x-magic3d-test", link), ("..", link), ("", link), (".bashrc", link),
                 ("sub/../../up", link), ("model.glb", link)]
    hostile = Hostile("jobs/job-1", artifacts)
    server, address = _serve(hostile)
    root = tmp_path / "work"
    out = root / "out"
    try:
        code = main(["generate", "a red torus", "--address", address, "--out", str(out), "--token", "tok-123"])
    finally:
        server.stop(None)
    assert code == 0, capsys.readouterr().err
    assert hostile.tokens == ["tok-123"]
    assert _files(tmp_path / "work") == {"out/job-1/model.glb"}
    assert not Path("/tmp/x-magic3d-test").exists()
    assert "refusing the artifact name '../../evil'" in capsys.readouterr().err


@pytest.mark.parametrize("job_name", ["jobs/../../escape", "jobs//tmp/abs", "jobs/..", "jobs/"])
def test_hostile_job_name_is_refused(tmp_path, job_name, capsys):
    server, address = _serve(Hostile(job_name, [("model.glb", "file:///etc/hostname")]))
    out = tmp_path / "a" / "b" / "out"
    try:
        code = main(["generate", "p", "--address", address, "--out", str(out), "--token", "t"])
    finally:
        server.stop(None)
    assert code == 2
    assert "refusing the job name" in capsys.readouterr().err
    assert _files(tmp_path) == set()


def test_file_links_are_copied_only_from_a_local_orchestrator(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("private key")
    artifact = orchestrator_pb2.Artifact(kind="model.glb", uri=secret.as_uri())
    assert download([artifact], tmp_path / "remote", local_files=False) == []
    assert not (tmp_path / "remote" / "model.glb").exists()
    assert download([artifact], tmp_path / "local", local_files=True) == [("model.glb", tmp_path / "local" / "model.glb")]


def test_download_does_not_write_through_a_planted_symlink(tmp_path):
    folder = tmp_path / "job"
    folder.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (folder / "model.glb").symlink_to(victim)
    source = tmp_path / "src.glb"
    source.write_bytes(b"new")
    download([orchestrator_pb2.Artifact(kind="model.glb", uri=source.as_uri())], folder)
    assert victim.read_text() == "keep" and (folder / "model.glb").read_bytes() == b"new"


def test_token_from_flag_env_or_local_state_dir_loopback_only(tmp_path, monkeypatch):
    monkeypatch.delenv("MAGIC3D_TOKEN", raising=False)
    state = tmp_path / "local"
    state.mkdir()
    (state / "client-token").write_text("local-token\n")
    args = argparse.Namespace(token=None, state_dir=str(state))
    assert client_token(args, "127.0.0.1:50071") == "local-token"
    assert client_token(args, "orchestrator.example:50071") is None  # never sent to another machine
    monkeypatch.setenv("MAGIC3D_TOKEN", "env-token")
    assert client_token(args, "orchestrator.example:50071") == "env-token"
    assert client_token(argparse.Namespace(token="flag", state_dir=str(state)), "127.0.0.1:1") == "flag"
