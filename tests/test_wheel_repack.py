"""bench/gpu/repack_wheel.py and bench/gpu/wheel_set.py on tiny wheels built here (no download)."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

from bench.gpu.repack_wheel import KeepOnly, repack
from bench.gpu.wheel_set import check


def make_wheel(directory: Path, name: str, version: str, files: dict[str, bytes], requires: list[str]) -> Path:
    dist_info = f"{name}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    files = {**files, f"{dist_info}/METADATA": meta.encode()}
    path = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for rel, data in files.items():
            wheel.writestr(rel, data)
        wheel.writestr(f"{dist_info}/RECORD", "".join(f"{rel},,\n" for rel in files))
    return path


def test_repack_drops_and_keeps_only_and_records_what_remains(tmp_path: Path) -> None:
    src = make_wheel(tmp_path, "pkg", "1.0", {
        "pkg/__init__.py": b"x = 1\n",
        "pkg/jars/big.jar": b"j" * 100,
        "pkg/models/__init__.py": b"",
        "pkg/models/clip/m.py": b"clip\n",
        "pkg/models/bloom/m.py": b"bloom\n",
        "pkg/models/llama/m.py": b"llama\n",
    }, [])
    out = repack(src, tmp_path / "out", ["pkg/jars/*"], [KeepOnly.parse("pkg/models=clip,bloom")], strip=False)
    with zipfile.ZipFile(out) as wheel:
        names = set(wheel.namelist())
        record = wheel.read("pkg-1.0.dist-info/RECORD").decode().splitlines()
        payload = {n: wheel.read(n) for n in names}
    assert "pkg/jars/big.jar" not in names and "pkg/models/llama/m.py" not in names
    assert {"pkg/__init__.py", "pkg/models/__init__.py", "pkg/models/clip/m.py", "pkg/models/bloom/m.py"} <= names
    recorded = {line.split(",")[0]: line.split(",")[1:] for line in record}
    assert set(recorded) == names
    for rel, (digest, size) in recorded.items():
        if rel.endswith("RECORD"):
            assert digest == size == ""
            continue
        expected = base64.urlsafe_b64encode(hashlib.sha256(payload[rel]).digest()).rstrip(b"=").decode()
        assert digest == f"sha256={expected}" and int(size) == len(payload[rel])


def test_wheel_set_check_flags_duplicates_missing_and_conflicting_requirements(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    make_wheel(a, "app", "1.0", {}, ["lib>=2", "torch>=2.10", "numpy>=3", "nowhere", "extra-only; extra == 'x'"])
    make_wheel(b, "lib", "2.1", {}, [])
    problems = check([a, b])
    assert any("numpy>=3" in p and "2.5.2" in p for p in problems)  # the GPU machine's numpy is older
    assert any("nowhere" in p for p in problems)
    assert not any("lib" in p or "torch" in p or "extra-only" in p for p in problems)
    make_wheel(a, "lib", "1.0", {}, [])
    assert any("two versions of lib" in p for p in check([a, b]))
