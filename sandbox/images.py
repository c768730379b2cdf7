"""The one local image of the sandbox: an (almost) empty root that borrows the host's files.

No registry can be reached, so nothing is pulled. ``proxilion-dr/hostfs`` is made by
``docker import`` of a tiny tar holding only empty directories and, where the host
has merged ``/usr`` (Debian 12: ``/bin -> usr/bin``, ``/lib -> usr/lib``...), the same
symlinks. Containers run from it with the host's ``/usr`` and ``/etc`` bind-mounted
read-only (plus any of ``/bin``, ``/lib``... that are real directories on the host),
so the host's ``/usr/bin/redis-server`` or ``/usr/bin/python3`` run inside.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import docker
import docker.errors
from docker.types import Mount

from sandbox.constants import HOSTFS_IMAGE, SANDBOX_LABEL

# Always mounted read-only from the host.
HOST_DIRS: tuple[str, ...] = ("/usr", "/etc")
# Symlinks into /usr on a merged-/usr host; mounted read-only when real directories.
ROOT_LINKS: tuple[str, ...] = ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
# Empty directories the image provides (mode). /tmp is world-writable as usual.
IMAGE_DIRS: dict[str, int] = {"/tmp": 0o1777, "/usr": 0o755, "/etc": 0o755}
LAYOUT_LABEL = "proxilion-dr.hostfs-layout"


def host_layout(root: str = "/") -> dict[str, str]:
    """Map each root entry in ROOT_LINKS present on the host to ``link:<target>`` or ``dir``."""
    layout: dict[str, str] = {}
    for entry in ROOT_LINKS:
        path = Path(root) / entry.lstrip("/")
        if path.is_symlink():
            layout[entry] = "link:" + os.readlink(path)
        elif path.is_dir():
            layout[entry] = "dir"
    return layout


def layout_signature(layout: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()[:16]


def build_rootfs_tar(layout: dict[str, str]) -> bytes:
    """A tar holding the empty directories and the /usr symlinks of ``layout``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        dirs = dict(IMAGE_DIRS)
        for entry, kind in layout.items():
            if kind == "dir":
                dirs[entry] = 0o755
        for name, mode in sorted(dirs.items()):
            info = tarfile.TarInfo(name.lstrip("/"))
            info.type = tarfile.DIRTYPE
            info.mode = mode
            tar.addfile(info)
        for entry, kind in sorted(layout.items()):
            if kind.startswith("link:"):
                info = tarfile.TarInfo(entry.lstrip("/"))
                info.type = tarfile.SYMTYPE
                info.linkname = kind.removeprefix("link:")
                info.mode = 0o777
                tar.addfile(info)
    return buf.getvalue()


def host_mounts(layout: dict[str, str] | None = None) -> list[Mount]:
    """Read-only bind mounts that give a hostfs container the host's programs and libraries."""
    layout = host_layout() if layout is None else layout
    sources = list(HOST_DIRS) + [entry for entry, kind in layout.items() if kind == "dir"]
    return [Mount(target=p, source=p, type="bind", read_only=True) for p in sources]


def ensure_hostfs_image(client: docker.DockerClient, *, rebuild: bool = False) -> str:
    """Build ``proxilion-dr/hostfs:latest`` unless an image for this host's layout exists.

    Returns the image id.
    """
    layout = host_layout()
    signature = layout_signature(layout)
    if not rebuild:
        try:
            image = client.images.get(HOSTFS_IMAGE)
        except docker.errors.ImageNotFound:
            image = None
        if image is not None and (image.labels or {}).get(LAYOUT_LABEL) == signature:
            return str(image.id)
    repository, tag = HOSTFS_IMAGE.rsplit(":", 1)
    client.api.import_image_from_data(
        build_rootfs_tar(layout),
        repository=repository,
        tag=tag,
        changes=[
            f'LABEL {SANDBOX_LABEL}="hostfs" {LAYOUT_LABEL}="{signature}"',
            'ENV PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"',
            "WORKDIR /",
        ],
    )
    return str(client.images.get(HOSTFS_IMAGE).id)
