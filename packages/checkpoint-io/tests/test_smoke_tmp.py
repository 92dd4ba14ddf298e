import asyncio, os
def test_rt(store):
    f = store.file("a/b.bin")
    data = os.urandom(store.part_size * 2 + 123)
    with f.open_sync("wb") as w:
        w.write(data)
    assert f.exists_sync()
    with f.open_sync("rb") as r:
        assert r.read() == data
    small = store.file("s.bin")
    with small.open_sync("wb") as w:
        w.write(b"hi")
    with small.open_sync("rb") as r:
        assert r.read() == b"hi"
    assert not store.file("nope").exists_sync()
