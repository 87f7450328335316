"""Remote reads and data workers fail fast with the real message (issue 29, item 7): a stalled HTTP server
times out with bounded retries, a server without byte ranges is refused when the stream opens, and a worker's
exception comes out unwrapped from torch's "Caught ... in DataLoader worker" text, without a hang at exit."""
from __future__ import annotations

import functools
import http.server
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error

import pytest

from smat_dist.data.reader import ShardError, check_byte_ranges
from smat_dist.data.remote import RemotePolicy, request
from smat_dist.data.spec import load_spec
from smat_dist.data.worker_errors import original_message
from tests.data_fixture import make_dataset


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Python's file server (200 to a Range request: no byte ranges); `stall` makes every GET hang."""
    stall = False
    hits = 0

    def do_GET(self):
        type(self).hits += 1
        if self.stall:
            time.sleep(5)
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def served(tmp_path):
    make_dataset(tmp_path, "kanji", images=6, size=16)
    handler = type("H", (_Handler,), {"stall": False, "hits": 0})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(tmp_path)))
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/kanji", handler
    srv.shutdown()
    srv.server_close()


def test_server_without_byte_ranges_is_refused_before_any_episode(served):
    url, _ = served
    spec = load_spec(url)
    with pytest.raises(ShardError, match=r"answered 200 to a Range request; it must support byte ranges"):
        check_byte_ranges(spec)


def test_stalled_server_times_out_after_bounded_retries(served):
    url, handler = served
    handler.stall = True
    policy = RemotePolicy(timeout_s=0.3, retries=2, backoff_s=0.05)
    t0 = time.monotonic()
    with pytest.raises(urllib.error.URLError, match=r"3 tries, timeout 0.3 s each"):
        request(f"{url}/spec.json", lambda r: r.read(), policy=policy)
    assert time.monotonic() - t0 < 4.0
    assert handler.hits == 3


def test_client_error_is_not_retried(served):
    url, handler = served
    with pytest.raises(urllib.error.HTTPError):
        request(f"{url}/no-such-file", lambda r: r.read(), policy=RemotePolicy(retries=3, backoff_s=1.0))
    assert handler.hits == 1


def test_worker_message_is_extracted_from_torchs_wrapper():
    text = ("Caught ShardError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
            '  File "/x/worker.py", line 375, in _worker_loop\n    data = fetcher.fetch(index)\n'
            "           ^^^^^^^^^^^^^^^^^^^^\n"
            "smat_dist.data.reader.ShardError: shard http://h/s.tar: server answered 200\n")
    assert original_message(text) == "shard http://h/s.tar: server answered 200"
    assert original_message("plain error") is None


WORKER_SCRIPT = textwrap.dedent("""
    import sys, torch
    from smat_dist.data.episodes import _worker_init
    from smat_dist.data.reader import ShardError
    from smat_dist.data.worker_errors import guarded

    class Bad(torch.utils.data.Dataset):
        def __len__(self):
            return 100
        def __getitem__(self, i):
            raise ShardError(f"shard s{i}.tar: the real message")

    class Holder:   # _worker_init closes the dataset's stream when a worker exits
        def close(self):
            pass
    ds = Bad()
    ds.stream = Holder()
    it = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True,
                                          worker_init_fn=_worker_init))
    other = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1, worker_init_fn=_worker_init))
    keep = guarded(other)   # a loader still alive at exit (a command failing elsewhere)
    try:
        next(guarded(it))
    except ShardError as e:
        print(type(e).__name__, str(e), flush=True)
        sys.exit(2)
""")


def test_worker_error_is_unwrapped_and_the_process_exits():
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", WORKER_SCRIPT], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stdout.strip() == "ShardError shard s0.tar: the real message"
    assert time.monotonic() - t0 < 30
