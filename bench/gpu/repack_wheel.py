"""Repack a wheel without the parts the GPU machine never imports, so the wheel set fits one device transfer.

Used by bench/gpu/wheels.sh. The result is still a valid wheel: its RECORD is rebuilt with the hashes and sizes
of what remains, so `pip install --no-deps` takes it like the original.

  python bench/gpu/repack_wheel.py SRC.whl OUT_DIR [--drop GLOB ...] [--keep-only DIR=a,b,c ...] [--strip]

--drop GLOB           removes every file whose path matches GLOB (fnmatch; `ray/jars/*`).
--keep-only DIR=a,b   removes every sub-directory of DIR except a, b (files directly in DIR stay).
--strip               runs `strip --strip-unneeded` on shared objects and other ELF files (debug symbols only).
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import hashlib
import os
import shutil
import subprocess
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

ELF_MAGIC = b"\x7fELF"


@dataclass(frozen=True)
class KeepOnly:
    """Sub-directories of `parent` to keep; every other one goes."""

    parent: str
    names: frozenset[str]

    @classmethod
    def parse(cls, text: str) -> KeepOnly:
        parent, _, names = text.partition("=")
        if not parent or not names:
            raise argparse.ArgumentTypeError(f"--keep-only wants DIR=a,b,c, got {text!r}")
        return cls(parent.rstrip("/"), frozenset(n for n in names.split(",") if n))

    def drops(self, path: str) -> bool:
        prefix = self.parent + "/"
        if not path.startswith(prefix):
            return False
        rest = path[len(prefix):]
        return "/" in rest and rest.split("/", 1)[0] not in self.names


def is_dropped(path: str, drop_globs: list[str], keep_only: list[KeepOnly]) -> bool:
    return any(fnmatch.fnmatch(path, g) for g in drop_globs) or any(k.drops(path) for k in keep_only)


def strip_elf(path: Path) -> None:
    with path.open("rb") as handle:
        if handle.read(4) != ELF_MAGIC:
            return
    subprocess.run(["strip", "--strip-unneeded", str(path)], check=True)


def record_line(root: Path, rel: str) -> str:
    data = (root / rel).read_bytes()
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{rel},sha256={digest},{len(data)}"


def repack(src: Path, out_dir: Path, drop_globs: list[str], keep_only: list[KeepOnly], strip: bool) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with zipfile.ZipFile(src) as wheel:
            names = [n for n in wheel.namelist() if not n.endswith("/")]
            record = next(n for n in names if n.endswith(".dist-info/RECORD"))
            kept = [n for n in names if n != record and not is_dropped(n, drop_globs, keep_only)]
            for name in kept:
                wheel.extract(name, root)
                mode = (wheel.getinfo(name).external_attr >> 16) & 0o777
                if mode:
                    os.chmod(root / name, mode)
        if strip:
            for name in kept:
                strip_elf(root / name)
        lines = [record_line(root, n) for n in kept] + [f"{record},,"]
        (root / record).write_text("\n".join(lines) + "\n")
        out_dir.mkdir(parents=True, exist_ok=True)
        staged = root.parent / f"{src.name}.repacked"
        with zipfile.ZipFile(staged, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out:
            for name in kept + [record]:  # RECORD last, as wheels put it
                out.write(root / name, name)
        target = out_dir / src.name
        shutil.move(staged, target)
        return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--drop", action="append", default=[], metavar="GLOB")
    parser.add_argument("--keep-only", action="append", default=[], type=KeepOnly.parse, metavar="DIR=a,b")
    parser.add_argument("--strip", action="store_true")
    args = parser.parse_args()
    before = args.src.stat().st_size
    target = repack(args.src, args.out_dir, args.drop, args.keep_only, args.strip)
    print(f"{target.name}: {before / 2**20:.1f} MiB -> {target.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
