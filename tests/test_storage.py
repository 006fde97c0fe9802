"""The storage layer waits out an object store's outage (backoff with jitter, bounded) and fails at
once, in one line, on errors that waiting cannot mend."""

from __future__ import annotations

import io
import os

import pytest
from conftest import BUCKET

from raystudy.errors import RaystudyError
from raystudy.persist import storage

REFUSED = OSError(
    "When reading information for key 'p/x': AWS Error NETWORK_CONNECTION during HeadObject: "
    "curlCode: 7, Couldn't connect to server"
)
DENIED = OSError("When reading information for key 'p/x': AWS Error ACCESS_DENIED during HeadObject operation")


class FlakyStore:
    """Fails the first `failures` operations with `error`, then answers."""

    def __init__(self, failures: int, error: OSError) -> None:
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "answer"


@pytest.fixture
def no_sleep(monkeypatch):
    slept = []
    monkeypatch.setattr(storage.time, "sleep", slept.append)
    return slept


def test_an_outage_is_waited_out_with_growing_jittered_delays(no_sleep):
    store = FlakyStore(6, REFUSED)
    assert storage._retrying("read", "s3://b/p/x", store) == "answer" and store.calls == 7
    assert len(no_sleep) == 6 and all(0.25 <= d <= 45 for d in no_sleep)
    assert no_sleep[-1] > no_sleep[0]  # exponential backoff (jitter keeps the order at these steps)


def test_an_outage_longer_than_the_patience_is_one_line_error(no_sleep, monkeypatch):
    clock = iter(range(0, 10_000, 7))
    monkeypatch.setattr(storage.time, "monotonic", lambda: next(clock))
    with pytest.raises(RaystudyError, match="cannot read 's3://b/p/x': .*Couldn't connect"):
        storage._retrying("read", "s3://b/p/x", FlakyStore(10_000, REFUSED), seconds=60)


@pytest.mark.parametrize(
    "location, error",
    [("s3://b/p/x", DENIED), ("/local/folder/x", REFUSED), ("s3://b/p/x", FileNotFoundError("no such key"))],
)
def test_errors_that_waiting_cannot_mend_fail_at_once(no_sleep, location, error):
    store = FlakyStore(1, error)
    with pytest.raises(RaystudyError, match="cannot write"):
        storage._retrying("write", location, store)
    assert store.calls == 1 and no_sleep == []


def test_every_remote_operation_goes_through_the_retries(monkeypatch, no_sleep):
    class Down:
        def __getattr__(self, name):
            def fail(*args, **kwargs):
                raise REFUSED

            return fail

    monkeypatch.setattr(storage, "_resolve", lambda location: (Down(), "b/p"))
    monkeypatch.setattr(storage, "_object_reader", lambda location: None)  # pyarrow's reads: Down
    monkeypatch.setenv("RAYSTUDY_STORAGE_OUTAGE_S", "0")
    for operation in (
        lambda: storage.read_bytes("s3://b/p"),
        lambda: storage.write_bytes("s3://b/p", b"x"),
        lambda: storage.exists("s3://b/p"),
        lambda: storage.list_files("s3://b/p"),
        lambda: storage.list_dirs("s3://b/p"),
        lambda: storage.list_tree("s3://b/p"),
    ):
        with pytest.raises(RaystudyError, match="Couldn't connect"):
            operation()


def test_a_one_get_reader_fails_like_pyarrow_does(monkeypatch, no_sleep):
    """boto3's errors become the OSErrors the retries judge: an outage is retried, a missing object
    and a refusal fail at once, each in one line."""
    pytest.importorskip("botocore")
    from botocore.exceptions import ClientError, EndpointConnectionError

    class Store:
        class exceptions:
            NoSuchKey = type("NoSuchKey", (Exception,), {})

        def __init__(self, errors):
            self.errors, self.calls = list(errors), 0

        def get_object(self, Bucket, Key):
            self.calls += 1
            if self.errors:
                raise self.errors.pop(0)
            return {"Body": io.BytesIO(f"{Bucket}:{Key}".encode())}

    refused = EndpointConnectionError(endpoint_url="http://store:9000/b/p")
    monkeypatch.setattr(storage, "_resolve", lambda location: (None, "b/p/x"))
    store = Store([refused] * 3)
    monkeypatch.setattr(storage, "_s3_client", lambda settings: store)
    assert storage.read_bytes("s3://b/p/x") == b"b:p/x" and store.calls == 4 and len(no_sleep) == 3
    for error, message in (
        (Store.exceptions.NoSuchKey(), "no such object: s3://b/p/x"),
        (ClientError({"Error": {"Code": "AccessDenied"}}, "GetObject"), "AccessDenied"),
    ):
        store = Store([error])
        monkeypatch.setattr(storage, "_s3_client", lambda settings: store)
        with pytest.raises(RaystudyError, match=f"cannot read 's3://b/p/x': .*{message}"):
            storage.read_bytes("s3://b/p/x")
        assert store.calls == 1
    assert storage.is_transient(OSError(str(ClientError({"Error": {"Code": "503"}}, "GetObject"))))


def test_s3_objects_are_read_with_one_request_each(s3, monkeypatch):
    """pyarrow sends a HEAD before each GET; with boto3 installed a read is one GetObject, and both
    clients read the same bytes."""
    pytest.importorskip("boto3")
    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3["RAYSTUDY_S3_ENDPOINT"])
    location = f"s3://{BUCKET}/one-request/result.json"
    payload = b'{"final": 1}\n' * 1000
    storage.write_bytes(location, payload)
    sent = []
    client = storage._s3_client(tuple(os.environ.get(k) for k in storage._FILESYSTEM_SETTINGS))
    client.meta.events.register("before-send.s3", lambda request, **kw: sent.append(request.method))
    assert storage.read_bytes(location) == payload and sent == ["GET"]
    with pytest.raises(RaystudyError, match="cannot read .*no such object"):
        storage.read_bytes(location + ".absent")
    assert storage.read_bytes(location + ".absent", missing_ok=True) is None
    monkeypatch.setattr(storage, "_object_reader", lambda location: None)
    assert storage.read_bytes(location) == payload
    assert storage.read_bytes(location + ".absent", missing_ok=True) is None
