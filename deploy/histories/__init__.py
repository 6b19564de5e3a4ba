"""Users' history stores as the serving stack keeps them: LaMP profile items on disk, Records in use.

A bundle and a snapshot hold every user's records in `histories.jsonl`, one user per line:

    {"user":"<user id>","records":[<LaMP profile items {id, date?, <task fields>}>]}

A server reads the whole file at start, on reload and on adopting a snapshot, but a request touches one user.
So `HistoryStore` keeps each user's line as the text it read and parses and converts it into Records the first
time that user is read; writing a store back passes the unread users' lines through untouched. Loading costs
one pass over the lines and the memory of the file's text (at 100,000 users with 10 records each, parsing
every line up front took 3.6 s and about 4x the file's size in Python objects).

Older bundles and snapshots hold `histories.json` ({user_id: [items]}, one JSON document); they still load
(the whole document is parsed, then each user converted when first read). Writers only write JSON lines.

The price of reading lazily is when a malformed item is found: a hand-edited file with a bad record fails the
first request for that user (HistoryError naming the file, line, user, record and field) instead of the
server's start. Files tapper writes come from Records, which are valid by construction. What load itself
checks: every line names its user (a line that does not start the way tapper writes it is parsed whole and
checked then), and no user appears twice.

Kept as text, the unread lines still cost about the file's size in anonymous memory (1.7 GB at 1,000,000 users
with 10 records each). With a spool dir (the server's scratch dir, `--scratch-dir`), `HistoryStore.read` copies
the lines into one scratch file there instead and keeps per user only where its line is; the line is read back
(os.pread) when the user is first read or the store is written. The spool file is unlinked as soon as it is
open, like the paged user table's (tapper.model.paged_table): a crash leaves nothing behind, and its disk space
is freed when the last store that shares its unread users is gone. Its pages are page cache, which the kernel
writes back and reclaims under pressure, not anonymous memory.
"""

from deploy.histories.files import (
    HISTORIES_FILE,
    LEGACY_HISTORIES_FILE,
    histories_file,
    read_histories_dir,
    write_histories,
)
from deploy.histories.records import HistoryError, histories_from_json, record_from_json
from deploy.histories.spool import HistorySpoolError
from deploy.histories.store import HistoryStore, histories_to_json, merge_histories

__all__ = [
    "HISTORIES_FILE",
    "LEGACY_HISTORIES_FILE",
    "HistoryError",
    "HistorySpoolError",
    "HistoryStore",
    "histories_file",
    "histories_from_json",
    "histories_to_json",
    "merge_histories",
    "read_histories_dir",
    "record_from_json",
    "write_histories",
]
