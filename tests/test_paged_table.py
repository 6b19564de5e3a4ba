"""The paged user table (tapper.model.paged_table): a shared mapping of an unlinked scratch file.

Real tensors, real files, real /proc/self/maps: the table holds the same values as an in-memory one (paged from
a model, loaded from safetensors), predictions and Online-Emb updates are bit-identical, growth keeps it paged,
and a bad table dir is an error naming the path.
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import pytest
import torch

from model_fixtures import TASK, tiny_examples
from tapper.config import Stage2Config
from tapper.eval.predict import generate_texts
from tapper.model.backbone import load_backbone_dir
from tapper.model.paged_table import (
    TableDirError,
    is_paged,
    load_paged_table,
    page_user_table,
    paged_tensor,
    prepare_table_dir,
    release_resident,
)
from tapper.model.tapper import STATE_FILE, TapPer
from tapper.online import add_users, update_users
from tapper.online.update import MIN_GROWTH_ROWS
from tapper.train.stage2 import encoder_for


def mapped_files(directory: Path) -> list[str]:
    """Lines of /proc/self/maps for files mapped from `directory` (one per mapping)."""
    prefix = str(directory.resolve()) + "/"
    return [line.rstrip("\n") for line in open("/proc/self/maps") if prefix in line]


@pytest.fixture(scope="module")
def data():
    return tiny_examples(n_users=6, n_hist=4)


@pytest.fixture(scope="module")
def saved(backbone, data, tmp_path_factory):
    """A TapPer state on disk whose rows are not all zero (random init), with a bridge that does something."""
    _, _, users = data
    torch.manual_seed(0)
    model = TapPer(load_backbone_dir(backbone.path).model, users, Stage2Config(lr=1e-2, batch_size=4))
    with torch.no_grad():
        for p in model.bridge_parameters():
            p.normal_(std=0.02)
    return model.save(tmp_path_factory.mktemp("state"))


def load(backbone, saved, table_dir=None) -> TapPer:
    return TapPer.load(saved, load_backbone_dir(backbone.path).model, table_dir=table_dir)


def test_paged_tensor_is_a_shared_mapping_of_a_deleted_file(tmp_path):
    t = paged_tensor(tmp_path, 10, 4)
    assert t.shape == (10, 4) and t.dtype == torch.float32 and not t.any()  # zero-filled
    assert list(tmp_path.iterdir()) == []  # unlinked right away: a crash leaves nothing behind
    maps = mapped_files(tmp_path)
    assert len(maps) == 1 and maps[0].endswith("(deleted)") and " rw-s " in maps[0]  # shared, writable, file-backed
    t[3] = torch.arange(4.0)
    assert torch.equal(t[3], torch.arange(4.0)) and not t[[0, 1, 2, 4]].any()
    assert is_paged(t) and is_paged(t[2:5]) and not is_paged(torch.zeros(10, 4))
    del t
    gc.collect()
    assert mapped_files(tmp_path) == []  # freeing the tensor unmaps it (and frees the disk space)


def rss_file_kb() -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssFile:"))


def test_after_a_bulk_fill_only_rows_used_since_stay_resident(tmp_path):
    """release_resident: the pages a fill wrote leave the process (RssFile) but keep their values (page cache)."""
    t = paged_tensor(tmp_path, 4096, 1024)  # 16 MiB
    values = torch.randn(4096, 1024)
    base = rss_file_kb()
    t.copy_(values)
    filled = rss_file_kb()
    assert filled - base >= 15 * 1024  # every page mapped in
    release_resident(t)
    released = rss_file_kb()
    assert filled - released >= 15 * 1024
    _ = t[1000].clone()  # one row: one 4 KiB page
    assert rss_file_kb() - released < 1024
    assert torch.equal(t, values)  # nothing lost


def test_a_table_dir_that_cannot_hold_a_table_is_an_error_naming_it(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(TableDirError, match=f"table dir {afile}: not a directory"):
        prepare_table_dir(afile)
    with pytest.raises(TableDirError, match=f"table dir {afile / 'sub'}: cannot create it"):
        prepare_table_dir(afile / "sub")
    with pytest.raises(TableDirError, match=f"table dir {tmp_path / 'missing'}: cannot create a"):
        paged_tensor(tmp_path / "missing", 4, 4)
    created = prepare_table_dir(tmp_path / "a" / "b")  # created when missing
    assert created.is_dir()


def test_paged_tables_hold_the_same_values_and_predict_the_same(backbone, saved, cache, data, tmp_path):
    _, evals, _ = data
    plain = load(backbone, saved)
    loaded = load(backbone, saved, table_dir=tmp_path / "loaded")  # filled from safetensors in chunks
    paged = page_user_table(load(backbone, saved), tmp_path / "paged")  # an in-memory table moved into a file
    assert not is_paged(plain.prefix.user_table.weight) and plain.table_dir is None
    for m, d in ((loaded, tmp_path / "loaded"), (paged, tmp_path / "paged")):
        w = m.prefix.user_table.weight
        assert is_paged(w) and m.table_dir == d and len(mapped_files(d)) == 1
        assert (
            torch.equal(w, plain.prefix.user_table.weight)
            and w.requires_grad == plain.prefix.user_table.weight.requires_grad
        )
        assert plain.prefix.user_table.weight[1:].any()  # not trivially equal zeros
        assert all(torch.equal(v, plain.state_dict()[k]) for k, v in m.state_dict().items())
    # A table's chunked load across several chunks (CHUNK_ROWS is 4096; force small ones).
    import tapper.model.paged_table as pt

    old_chunk, pt.CHUNK_ROWS = pt.CHUNK_ROWS, 2
    try:
        small = load_paged_table(saved / STATE_FILE, tmp_path)
    finally:
        pt.CHUNK_ROWS = old_chunk
    assert torch.equal(small, plain.prefix.user_table.weight.detach())

    examples = evals + [dataclasses.replace(ex, id="q-unknown", user_id="stranger") for ex in evals[:1]]
    preds, prefixes = [], []
    for m in (plain, loaded, paged):
        enc = encoder_for(m, TASK, backbone.tokenizer, cache).encode(
            examples, m.user_rows, progress=False, unknown_users="pq_only"
        )
        with torch.no_grad():
            prefixes.append(m.prefix_for(enc.items, enc.vectors)[0])
        preds.append(generate_texts(m, enc, backbone.tokenizer, TASK, batch_size=4, progress=False))
    assert torch.equal(prefixes[0], prefixes[1]) and torch.equal(prefixes[0], prefixes[2])
    assert preds[0] == preds[1] == preds[2] and len(preds[0]) == len(examples)

    # The saved state of a paged model is the same file content.
    a, b = plain.state_tensors(), loaded.state_tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_online_emb_updates_are_bit_identical_and_growth_stays_paged(backbone, saved, cache, data, tmp_path):
    train, _, users = data
    plain = load(backbone, saved)
    paged = load(backbone, saved, table_dir=tmp_path)
    assert plain.prefix.user_table.num_embeddings == paged.prefix.user_table.num_embeddings == len(users) + 1
    # Known users and a new one (their examples re-labelled as a user the table has not seen).
    batch = [ex for ex in train if ex.user_id in ("user1", "user4")]
    batch += [dataclasses.replace(ex, user_id="newbie") for ex in train if ex.user_id == "user2"]
    reports = [update_users(m, TASK, backbone.tokenizer, cache, batch, "emb", epochs=2, seed=7) for m in (plain, paged)]
    assert reports[0].losses == reports[1].losses and reports[1].new_users == ["newbie"]
    changed = [paged.user_rows[u] for u in ("user1", "user4", "newbie")]
    assert all(
        paged.prefix.user_table.weight[r].any() for r in changed
    )  # the update did write (newbie started at zero)
    assert not torch.equal(
        paged.user_table_in_use()[changed[:2]], load(backbone, saved).user_table_in_use()[changed[:2]]
    )
    w = paged.prefix.user_table.weight
    assert is_paged(w) and torch.equal(w, plain.prefix.user_table.weight)  # spare rows included
    assert paged.prefix.user_table.num_embeddings > len(users) + 2  # it grew (with spare rows), still paged
    assert len(mapped_files(tmp_path)) == 1 and list(tmp_path.iterdir()) == []  # the old table's file is gone
    assert torch.equal(plain.user_table_in_use(), paged.user_table_in_use())

    # Growth past the spare rows: a new paged table in the same dir, existing rows kept, new rows zero.
    before = paged.user_table_in_use().detach().clone()
    capacity = paged.prefix.user_table.num_embeddings
    new = add_users(paged, [f"grow{i}" for i in range(capacity + MIN_GROWTH_ROWS)])
    gc.collect()
    w = paged.prefix.user_table.weight
    assert len(new) == capacity + MIN_GROWTH_ROWS and paged.prefix.user_table.num_embeddings > capacity
    assert is_paged(w) and w.requires_grad and len(mapped_files(tmp_path)) == 1
    assert torch.equal(w[: before.shape[0]], before) and not w[before.shape[0] :].any()
    # Updates after growth still write into the paged table.
    grown_user = new[-1]
    extra = [dataclasses.replace(ex, user_id=grown_user) for ex in train if ex.user_id == "user0"]
    update_users(paged, TASK, backbone.tokenizer, cache, extra, "emb", steps=1, seed=1)
    assert paged.prefix.user_table.weight is w and w[paged.user_rows[grown_user]].any()
