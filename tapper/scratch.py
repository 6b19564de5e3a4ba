"""Local scratch directories for per-user state that is too large to keep in anonymous memory.

The serving stack can keep its user table (tapper.model.paged_table) and its history stores (deploy.histories)
in files in a scratch directory. Those files are unlinked as soon as they are open, so the directory must be a
local disk: on a network filesystem, page-cache writeback would become network traffic, and an open-but-unlinked
file or a shared mapping is not safe there (another client may clean the directory, the server may invalidate
the file). Core module: no ZenML, no deploy.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# Filesystems where a scratch file means network I/O or cross-client invalidation.
NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "lustre", "9p", "afs", "gpfs", "beegfs"}


class ScratchDirError(ValueError):
    """A scratch directory cannot hold scratch files (not creatable, not writable, a network filesystem, full)."""


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem holding `path` (longest mount point prefix in /proc/self/mounts); None off Linux."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    best, fstype = "", None
    resolved = str(path.resolve())
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")
        if (resolved == mount or resolved.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, fstype = mount, parts[2]
    return fstype


def prepare_scratch_dir(
    directory: str | Path, what: str = "scratch dir", error: type[ScratchDirError] = ScratchDirError
) -> Path:
    """Create `directory` if missing and check that it can hold scratch files; errors (`error`) start with
    "<what> <directory>:", so the caller's own name for the directory shows (e.g. "table dir")."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise error(f"{what} {directory}: not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise error(f"{what} {directory}: cannot create it ({err.strerror or err})") from err
    if not os.access(directory, os.W_OK | os.X_OK):
        raise error(f"{what} {directory}: not writable by uid {os.getuid()}")
    fstype = filesystem_type(directory)
    if fstype is not None and (fstype in NETWORK_FS or fstype.startswith("fuse.")):
        raise error(
            f"{what} {directory}: on a {fstype} filesystem; scratch files need a local disk "
            "(page-cache writeback would go over the network, and unlinked or mapped files are not safe there)"
        )
    if fstype == "tmpfs":
        # Works, but tmpfs pages are memory (shmem), never written back to a disk: nothing is saved.
        log.warning(
            "%s %s is on tmpfs: its scratch files use memory as before, not evictable page cache", what, directory
        )
    return directory
