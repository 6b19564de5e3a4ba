"""An opt-in paged user table: the table's rows live in a shared mapping of a scratch file.

Why: the user table is one row of L*d floats per user (18 KB with SmolLM2), and every serving replica holds
all of it. In anonymous memory that is resident (or in swap) whether or not a user is ever asked about. Mapped
from a file with MAP_SHARED, the table is page cache instead: only the pages of rows that are read or written
are resident, and under memory pressure the kernel writes dirty pages back to the file and drops them rather
than killing the process. Reads and writes are ordinary tensor indexing, so no other code has to know.

The scratch file is unlinked as soon as it is mapped: the mapping keeps the inode alive until the tensor is
freed, so a crashed replica leaves no file behind, and replacing the table (growth, a reload) frees its disk
space with the old tensor. The directory must be on a local disk: on a network volume, page-cache writeback
would become network traffic and the mapping could be invalidated by the server (e.g. other replicas cleaning
the directory); tapper.scratch checks that. Core module: no ZenML, no deploy.
"""

from __future__ import annotations

import errno
import logging
import os
import uuid
from pathlib import Path

import torch
from torch import nn

from tapper.scratch import ScratchDirError, prepare_scratch_dir

log = logging.getLogger(__name__)

TABLE_KEY = "prefix.user_table.weight"
# Rows copied per step when filling a table from a file: bounds the anonymous memory a load needs
# (4096 rows x 18 KB = 75 MB with SmolLM2) instead of a second full copy of the table.
CHUNK_ROWS = 4096


class TableDirError(ScratchDirError):
    """The table directory cannot hold a paged table (not creatable, not writable, a network filesystem, full)."""


def prepare_table_dir(directory: str | Path) -> Path:
    """Create `directory` if missing and check that it can hold a paged table (tapper.scratch); errors name the path."""
    return prepare_scratch_dir(directory, "table dir", TableDirError)


def paged_tensor(directory: str | Path, rows: int, width: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A zero-filled [rows, width] CPU tensor backed by a shared mapping of an (already unlinked) file in
    `directory`."""
    directory = Path(directory)
    numel = rows * width
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    path = directory / f"tapper-user-table-{uuid.uuid4().hex}.bin"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, nbytes)
            # Reserve the blocks now: a sparse file would only find out that the disk is full when a page of the
            # mapping is first written back or faulted in for writing, and a mapping reports that as SIGBUS (the
            # replica dies). posix_fallocate fails here, with ENOSPC, instead. It writes no data (ext4/xfs mark the
            # extents unwritten; reads give zeros), so no page of the table becomes resident.
            if nbytes:
                os.posix_fallocate(fd, 0, nbytes)
        finally:
            os.close(fd)
        # size=0 would not map; an empty table is never paged anyway (row 0 always exists), but keep it correct.
        flat = (
            torch.from_file(str(path), shared=True, size=numel, dtype=dtype) if numel else torch.zeros(0, dtype=dtype)
        )
        # Rows are looked up at random: without MADV_RANDOM a fault maps (and after eviction reads back) the whole
        # large folio or readahead window around it, up to MBs for one 18 KB row; measured on Linux 6.18/ext4,
        # 200 random row reads then mapped 197 MB instead of 16 MB.
        _madvise(flat, MADV_RANDOM)
    except OSError as err:
        hint = " (disk full)" if err.errno == errno.ENOSPC else ""
        raise TableDirError(
            f"table dir {directory}: cannot create a {nbytes / 2**20:.1f} MiB paged user table "
            f"({err.strerror or err}){hint}"
        ) from err
    finally:
        # The mapping (if made) keeps the inode alive; the name is not needed any more.
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return flat.view(rows, width)


MADV_RANDOM, MADV_DONTNEED = 1, 4  # <sys/mman.h> on Linux


def _madvise(view: torch.Tensor, advice: int) -> None:
    """madvise(2) over the bytes of `view` (a contiguous piece of a paged tensor). Best effort: a failure (not Linux,
    no libc) only loses the optimisation, never data."""
    if view.numel() == 0:
        return
    try:
        import ctypes
        import mmap

        libc = ctypes.CDLL(None, use_errno=True)
        start = view.data_ptr()
        aligned = start - start % mmap.PAGESIZE  # the range may start mid-page; the advice then covers that page too
        length = start + view.numel() * view.element_size() - aligned
        if libc.madvise(ctypes.c_void_p(aligned), ctypes.c_size_t(length), advice) != 0:
            log.debug("madvise(%d) on the paged table failed: %s", advice, os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as err:
        log.debug("madvise(%d) on the paged table failed: %s", advice, err)


def release_resident(view: torch.Tensor) -> None:
    """Drop this process's page mappings of (a contiguous piece of) a paged tensor after a bulk fill.

    Filling writes every page, which leaves them all mapped into the process (RssFile = the whole table) although
    almost none will be used soon. madvise(MADV_DONTNEED) on a *shared* file mapping loses nothing: the data stays
    in the page cache (dirty pages are written back to the scratch file by the kernel) and a later access maps the
    page again. Then RssFile counts only rows actually read or written since, and the rest is ordinary page cache
    the kernel can write back and reclaim. Fills release chunk by chunk, so they never map the whole table at once."""
    if is_paged(view) and view.is_contiguous():
        _madvise(view, MADV_DONTNEED)


def fill_in_chunks(table: torch.Tensor, source, rows: int) -> None:
    """Copy rows [0, rows) of `source` (a tensor, or a safetensors slice: anything sliced by rows) into the paged
    `table`, CHUNK_ROWS at a time, releasing each chunk's mappings as it goes: a fill never holds a second full copy
    of the table in memory, nor the whole table mapped into the process. Every fill (paging, loading, growth) uses
    it."""
    with torch.no_grad():
        for a in range(0, rows, CHUNK_ROWS):
            b = min(a + CHUNK_ROWS, rows)
            table[a:b].copy_(source[a:b])
            release_resident(table[a:b])


def is_paged(tensor: torch.Tensor) -> bool:
    """Whether `tensor` lives in a file mapping made by `paged_tensor` (its storage cannot be resized).

    An ordinary CPU tensor's storage is resizable; torch.from_file's is not."""
    return tensor.device.type == "cpu" and not tensor.untyped_storage().resizable()


def _embedding(weight: torch.Tensor, requires_grad: bool) -> nn.Embedding:
    # _weight: nn.Embedding wraps this tensor (same storage) instead of allocating and initialising its own.
    emb = nn.Embedding(weight.shape[0], weight.shape[1], _weight=weight)
    emb.weight.requires_grad_(requires_grad)
    return emb


def page_user_table(model, directory: str | Path) -> nn.Module:
    """Move `model.prefix.user_table` (a TapPer) into a paged tensor in `directory`, same values and requires_grad.

    Remembers `directory` on the model (`model.table_dir`), so growth (tapper.online.update.add_users) and reloads
    allocate the new table there too. Returns the model."""
    directory = prepare_table_dir(directory)
    old = model.prefix.user_table
    if old.weight.device.type != "cpu":
        raise ValueError(f"the paged user table is CPU memory; this table is on {old.weight.device}")
    weight = paged_tensor(directory, old.num_embeddings, old.embedding_dim, old.weight.dtype)
    fill_in_chunks(weight, old.weight, old.num_embeddings)
    model.prefix.user_table = _embedding(weight, old.weight.requires_grad)
    model.table_dir = directory
    return model


def load_paged_table(
    path: str | Path, directory: str | Path, dtype: torch.dtype = torch.float32, key: str = TABLE_KEY
) -> torch.Tensor:
    """Read the [rows, width] tensor `key` of the safetensors file `path` into a paged tensor in `directory`.

    Reads CHUNK_ROWS rows at a time, so the load never holds a second full copy of the table in anonymous memory."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        if key not in f.keys():
            raise ValueError(f"{path}: no tensor {key!r}")
        part = f.get_slice(key)
        shape = part.get_shape()
        if len(shape) != 2:
            raise ValueError(f"{path}: {key} has shape {shape}, expected [rows, width]")
        rows, width = shape
        table = paged_tensor(directory, rows, width, dtype)
        fill_in_chunks(table, part, rows)
    return table


def read_tensors_except(path: str | Path, skip: str = TABLE_KEY) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file `path` but `skip` (the small ones, next to a table loaded paged)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k != skip}


def load_user_table_paged(model, state_file: str | Path, directory: str | Path) -> None:
    """Replace `model.prefix.user_table` (a TapPer) with the table saved in `state_file`, paged in `directory`.

    The table takes the saved number of rows (a snapshot may have more users than the model had) and the model's
    dtype and requires_grad; the old table is freed with its scratch file when nothing else refers to it."""
    old = model.prefix.user_table
    table = load_paged_table(state_file, directory, old.weight.dtype)
    if table.shape[1] != old.embedding_dim:
        raise ValueError(
            f"{state_file}: {TABLE_KEY} rows hold {table.shape[1]} numbers, the model's {old.embedding_dim}"
        )
    model.prefix.user_table = _embedding(table, old.weight.requires_grad)
    model.table_dir = Path(directory)


def load_prefix_paged(model, state_file: str | Path, directory: str | Path) -> dict[str, torch.Tensor]:
    """Load a TapPer's prefix state from `state_file` with the user table paged in `directory`.

    The table is filled in chunks (load_user_table_paged); every other prefix tensor must be in the file, as in a
    strict load_state_dict. Returns the file's tensors other than the table (the caller loads the bridge's)."""
    load_user_table_paged(model, state_file, directory)
    tensors = read_tensors_except(state_file, TABLE_KEY)
    prefix_sd = {k[len("prefix.") :]: v for k, v in tensors.items() if k.startswith("prefix.")}
    result = model.prefix.load_state_dict(prefix_sd, strict=False)
    from tapper.model.prefix import INPUT_STATS

    # A state saved before inputs were standardized has no input statistics (it reads them unit-RMS only).
    old = model.prefix.cfg.input_norm == "unit_rms"
    missing = [k for k in result.missing_keys if k != "user_table.weight" and not (old and k in INPUT_STATS)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{state_file}: missing prefix tensors {missing[:5]}, unexpected {list(result.unexpected_keys)[:5]}"
        )
    return tensors
