"""Peer book: bounded, newest first, survives restarts, a corrupt file does not stop the node."""

from hyphae.protocol.peerbook import PeerBook


def test_record_merges_addresses_newest_first(tmp_path) -> None:
    book = PeerBook()
    book.record("p1", ["/ip4/1.1.1.1/tcp/1"], source="bootstrap", now=1)
    book.record("p1", ["/ip4/2.2.2.2/tcp/2"], source="dht", now=2)
    rec = book.get("p1")
    assert rec.addrs == ["/ip4/2.2.2.2/tcp/2", "/ip4/1.1.1.1/tcp/1"]
    assert rec.sources == ["bootstrap", "dht"] and rec.last_seen == 2


def test_eviction_keeps_the_most_recently_seen() -> None:
    book = PeerBook(max_peers=3)
    for i in range(5):
        book.record(f"p{i}", [f"/ip4/10.0.0.{i}/tcp/1"], source="dht", now=i)
    assert len(book) == 3
    assert [r.peer_id for r in book.most_recent(10)] == ["p4", "p3", "p2"]
    assert [r.peer_id for r in book.most_recent(10, exclude={"p4"})] == ["p3", "p2"]


def test_save_and_load_round_trip(tmp_path) -> None:
    path = tmp_path / "peers.json"
    book = PeerBook()
    book.record("p1", ["/ip4/1.1.1.1/tcp/1"], source="mdns", now=5)
    book.save(path)
    assert not book.dirty
    again = PeerBook.load(path)
    assert again.get("p1").addrs == ["/ip4/1.1.1.1/tcp/1"]


def test_corrupt_file_is_moved_aside(tmp_path) -> None:
    path = tmp_path / "peers.json"
    path.write_text("{broken")
    book = PeerBook.load(path)
    assert len(book) == 0
    assert (tmp_path / "peers.json.corrupt").exists()
