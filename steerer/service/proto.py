"""The generated protobuf/gRPC modules, built from `proto/steerer/v1/steerer.proto` on first import.

Generated code is never committed, so it cannot go stale: it is rebuilt whenever the .proto (or the
grpcio-tools version) changes, detected by a hash stamp rather than mtimes (a git checkout resets those).
Concurrent first imports (a server and its test both starting) take a file lock, generate into a temp
folder and rename each file into place, so nobody imports a half-written module.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import os
import shutil
import tempfile
from pathlib import Path
from types import ModuleType

from steerer.policy import POLICY_KINDS

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"
PROTO_FILE = "steerer/v1/steerer.proto"
GEN = Path(__file__).resolve().parent / "_gen"
PACKAGE = "steerer.service._gen.steerer.v1"
STAMP = ".stamp"


def _fingerprint(proto: Path) -> str:
    import grpc_tools

    version = getattr(grpc_tools, "__version__", "") or _dist_version("grpcio-tools")
    return hashlib.sha256(proto.read_bytes() + version.encode()).hexdigest()


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return ""


def ensure_generated(proto_root: Path = PROTO_ROOT, gen: Path = GEN, package: str = PACKAGE) -> Path:
    """Generate the modules into `gen` if missing or stale; returns the folder that holds them."""
    proto = proto_root / PROTO_FILE
    out = gen / "steerer" / "v1"
    if not proto.is_file():
        if (out / "steerer_pb2.py").is_file():  # a non-editable install: use what was generated
            return out
        raise RuntimeError(f"cannot find {proto}; install steerer from its repository (pip install -e .)")
    stamp = _fingerprint(proto)
    if _fresh(out, stamp):
        return out
    gen.mkdir(parents=True, exist_ok=True)
    with open(gen / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _fresh(out, stamp):  # another process generated it while we waited
            return out
        _generate(proto_root, proto, gen, package, stamp)
    return out


def _fresh(out: Path, stamp: str) -> bool:
    try:
        return (out / STAMP).read_text() == stamp and all(
            (out / name).is_file() for name in ("steerer_pb2.py", "steerer_pb2_grpc.py"))
    except OSError:
        return False


def _generate(proto_root: Path, proto: Path, gen: Path, package: str, stamp: str) -> None:
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out = gen / "steerer" / "v1"
    tmp = Path(tempfile.mkdtemp(prefix=".gen-", dir=gen))
    try:
        code = protoc.main(["grpc_tools.protoc", f"-I{proto_root}", f"-I{well_known}",
                            f"--python_out={tmp}", f"--grpc_python_out={tmp}", str(proto)])
        if code != 0:
            raise RuntimeError(f"protoc failed on {proto} (exit {code})")
        made = tmp / "steerer" / "v1"
        # protoc writes `from steerer.v1 import steerer_pb2`, which would resolve inside our own `steerer`
        # package; point it at the generated module's real home.
        grpc_file = made / "steerer_pb2_grpc.py"
        grpc_file.write_text(grpc_file.read_text().replace(
            "from steerer.v1 import steerer_pb2", f"from {package} import steerer_pb2"))
        (made / STAMP).write_text(stamp)
        out.mkdir(parents=True, exist_ok=True)
        for folder in (gen, gen / "steerer", out):
            init = folder / "__init__.py"
            if not init.exists():
                init.write_text("")
        for name in ("steerer_pb2.py", "steerer_pb2_grpc.py", STAMP):  # the stamp last: it marks completion
            os.replace(made / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    importlib.invalidate_caches()


def modules() -> tuple[ModuleType, ModuleType]:
    """(steerer_pb2, steerer_pb2_grpc), generated first if needed."""
    ensure_generated()
    pb2 = importlib.import_module(f"{PACKAGE}.steerer_pb2")
    pb2_grpc = importlib.import_module(f"{PACKAGE}.steerer_pb2_grpc")
    return pb2, pb2_grpc


pb2, pb2_grpc = modules()
SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["Steerer"].full_name
# The proto's PolicyKind value for each name of the one policy vocabulary (`steerer.policy.POLICY_KINDS`);
# the conversion and the client both use it. POLICY_KIND_UNSPECIFIED (0) reads as "off".
POLICY_KIND_CODES: dict[str, int] = {name: pb2.PolicyKind.Value(f"POLICY_KIND_{name.upper()}")
                                     for name in POLICY_KINDS}
