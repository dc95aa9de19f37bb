"""pipeline.storage against a real S3 server (SeaweedFS on 127.0.0.1, the `s3` fixture)."""
import pytest

from pipeline import storage


def test_objects_round_trip(s3):
    url = s3.url("storage", "a.bin")
    storage.write_bytes(url, b"0123456789")
    assert storage.read_bytes(url) == b"0123456789"
    assert storage.read_range(url, 3, 4) == b"3456"
    assert storage.head(url)["size"] == 10
    assert storage.listing(s3.url("storage")) == {"a.bin": 10}
    storage.delete(url)
    assert not storage.exists(url)


def test_conditional_put_refuses_a_second_writer(s3):
    url = s3.url("storage", "lock")
    storage.write_bytes(url, b"first", create=True)
    with pytest.raises(FileExistsError):
        storage.write_bytes(url, b"second", create=True)
    assert storage.read_bytes(url) == b"first"
