"""What a node advertises about its machine (``NodeMeta``), detected without importing torch.

``basic_meta()`` is instant (hostname, CPU count, memory, the configured tags) and is what a
node starts with.
After startup the runtime adds the torch version (package metadata, no import), the CUDA
version torch was built for (read from ``torch/version.py`` as text; ``torch_versions()``)
and the GPUs (``nvidia-smi --query-gpu`` with a short timeout, when present;
``detect_gpus_async()``), then gossips them as a metadata update. ``detect_meta()`` is
the blocking all-in-one for scripts.
"""

from __future__ import annotations

import asyncio
import builtins
import importlib.metadata
import importlib.util
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

from protocol.messages.gossip import GpuInfo, NodeMeta

_CUDA_LINE = re.compile(r"""^cuda\s*(?::[^=]*)?=\s*['"]([0-9][0-9.]*)['"]""", re.MULTILINE)
_MAX_GPUS = 16


def _memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def basic_meta(*, tags: tuple[str, ...] = ()) -> NodeMeta:
    """Hostname, logical CPUs and physical memory, and the node's ``tags`` (``NodeConfig.tags``):
    cheap enough for startup."""
    return NodeMeta(
        hostname=socket.gethostname()[:128],
        cpus=min(os.cpu_count() or 0, 65535),
        memory_bytes=_memory_bytes(),
        tags=tags,
    )


def torch_versions() -> tuple[str, str]:
    """(torch version, CUDA version torch was built with) without importing torch; "" if none."""
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "", ""
    cuda = ""
    try:
        spec = importlib.util.find_spec("torch")
        if spec is not None and spec.origin is not None:
            text = (Path(spec.origin).parent / "version.py").read_text(encoding="utf-8", errors="replace")
            match = _CUDA_LINE.search(text)
            cuda = match.group(1) if match else ""
    except (OSError, ImportError, ValueError):
        cuda = ""
    return version[:64], cuda[:64]


def parse_nvidia_smi(text: str) -> tuple[GpuInfo, ...]:
    """Parse ``nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits``."""
    gpus = []
    for line in text.splitlines():
        name, sep, mib = line.rpartition(",")
        if not sep or not mib.strip().isdigit() or not name.strip():
            continue
        gpus.append(GpuInfo(name=name.strip()[:128], memory_bytes=int(mib.strip()) * 1024 * 1024))
    return tuple(gpus[:_MAX_GPUS])


def detect_gpus(*, timeout: float = 2.0) -> tuple[GpuInfo, ...]:
    """GPUs per ``nvidia-smi`` (empty when absent, failing or slower than ``timeout`` s)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ()
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ()
    return parse_nvidia_smi(out.stdout) if out.returncode == 0 else ()


async def detect_gpus_async(*, timeout: float = 2.0) -> tuple[GpuInfo, ...]:
    """``detect_gpus`` as a subprocess of the event loop: killed on timeout or cancellation."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ()
    try:
        proc = await asyncio.create_subprocess_exec(
            exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError:
        return ()
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    except builtins.TimeoutError:
        return ()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return parse_nvidia_smi(out.decode(errors="replace")) if proc.returncode == 0 else ()


def detect_meta(base: NodeMeta, *, timeout: float = 2.0) -> NodeMeta:
    """``base`` plus torch/CUDA versions and GPUs. Blocking: call it in a worker thread."""
    torch_version, cuda_version = torch_versions()
    return NodeMeta(
        protocol_version=base.protocol_version,
        hostname=base.hostname,
        cpus=base.cpus,
        memory_bytes=base.memory_bytes,
        gpus=detect_gpus(timeout=timeout),
        torch_version=torch_version,
        cuda_version=cuda_version,
        load=base.load,
        tags=base.tags,
    )
