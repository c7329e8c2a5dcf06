"""Request ids stay 64 random bits each, across a refill of the pool and in a forked worker."""
import os
import re

from relay import request_ids
from relay.request_ids import new_request_id

ID = re.compile(r"req_[0-9a-f]{16}")


def test_ids_are_well_formed_and_distinct_across_refills():
    ids = [new_request_id() for _ in range(request_ids._IDS_PER_READ * 3 + 7)]
    assert all(ID.fullmatch(i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_worker_never_repeats_its_parents_ids():
    new_request_id()  # the pool holds ids the child must not reuse
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, then out without pytest's teardown
        try:
            os.write(write, " ".join(new_request_id() for _ in range(20)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as fh:
        child = fh.read().split()
    os.waitpid(pid, 0)
    parent = [new_request_id() for _ in range(20)]
    assert len(child) == 20 and all(ID.fullmatch(i) for i in child)
    assert not set(child) & set(parent)
