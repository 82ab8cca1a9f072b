"""The Cluster slot map (service/broker/redis_topology.py), in-process: `parse_cluster_nodes` on literal
`CLUSTER NODES` output and `ClusterTopology` refreshed from scripted node clients (answers, failures), no Redis.

What a user cares about: every channel's commands and subscription go to the primary that owns its slot now; a
failed primary owns nothing; after a failover the promoted replica wins even when a node that has not heard of it
is asked too; a map that cannot be read keeps the last good one. tests/test_cluster_failover.py drives the same
map against a real Cluster.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from redis.crc import key_slot

from service.broker.redis_connect import RedisTarget
from service.broker.redis_topology import SLOTS, ClusterTopology, Node, parse_cluster_nodes

pytestmark = pytest.mark.timeout(10)

# Three primaries and three replicas, as Redis 7 prints them (`ip:port@cport,hostname`, then flags, the primary a
# replica follows, ping sent, pong received, config epoch, link state, slots).
HEALTHY = """\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004,redis-4 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 1 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002,redis-2 master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003,redis-3 master - 0 1426238318243 3 connected 10923-16383
6ec23923021cf3ffec47632106199cb7f496ce01 127.0.0.1:30005@31005,redis-5 slave 67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 0 1426238316232 2 connected
824fe116063bc5fcf9f4ffd895bc17aee7731ac3 127.0.0.1:30006@31006,redis-6 slave 292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 0 1426238317741 3 connected
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001,redis-1 myself,master - 0 0 1 connected 0-5460
"""

# The same cluster after 30001 died and its replica 30004 was promoted (configEpoch 7), seen by a node that knows.
FAILED_OVER = """\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004,redis-4 master - 0 1426238317239 7 connected 0-5460
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002,redis-2 myself,master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003,redis-3 master - 0 1426238318243 3 connected 10923-16383
6ec23923021cf3ffec47632106199cb7f496ce01 127.0.0.1:30005@31005,redis-5 slave 67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 0 1426238316232 2 connected
824fe116063bc5fcf9f4ffd895bc17aee7731ac3 127.0.0.1:30006@31006,redis-6 slave 292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 0 1426238317741 3 connected
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001,redis-1 master,fail - 1426238316000 1426238315000 1 disconnected
"""

# 30001 has failed, no replica promoted yet: it is still listed with its slots.
FAILING = """\
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 master,fail - 1426238316000 1426238315000 1 disconnected 0-5460
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 myself,master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003 master - 0 1426238318243 3 connected 10923-16383
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 1 connected
"""

N1, N2, N3, N4 = (Node("127.0.0.1", 30000 + i) for i in (1, 2, 3, 4))


# -- parse_cluster_nodes ---------------------------------------------------------------------------------------------


def test_parse_three_primaries_and_three_replicas() -> None:
    rows = {node.port: (flags, epoch, ranges, failing) for node, flags, epoch, ranges, failing in
            parse_cluster_nodes(HEALTHY)}
    assert len(rows) == 6
    assert rows[30001] == ("myself,master", 1, [(0, 5460)], False)
    assert rows[30002] == ("master", 2, [(5461, 10922)], False)
    assert rows[30003] == ("master", 3, [(10923, 16383)], False)
    for port in (30004, 30005, 30006):
        assert rows[port][0] == "slave" and rows[port][2] == [], "a replica owns no slots"
    assert all(node.host == "127.0.0.1" for node, *_ in parse_cluster_nodes(HEALTHY)), "the IP, not the hostname"


def test_parse_a_failed_primary_is_failing_and_a_suspected_one_is_not() -> None:
    text = (
        "aaa 10.0.0.1:7001@17001 master,fail - 0 0 4 disconnected 0-100\n"
        "bbb 10.0.0.2:7001@17001 master,fail? - 0 0 5 connected 101-200\n"
    )
    (failed, suspected) = parse_cluster_nodes(text)
    assert failed[4] is True and failed[3] == [(0, 100)]
    assert suspected[4] is False, "`fail?` (only suspected by one node) still owns its slots"


def test_parse_single_slots_and_ranges_mixed() -> None:
    ((node, _, _, ranges, _),) = parse_cluster_nodes(
        "ccc 10.0.0.3:7000@17000 master - 0 0 9 connected 0-10 42 100-101 16383\n")
    assert node == Node("10.0.0.3", 7000)
    assert ranges == [(0, 10), (42, 42), (100, 101), (16383, 16383)]


def test_parse_importing_and_migrating_markers_leave_the_slot_with_its_listed_owner() -> None:
    text = (
        "src 10.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5000 [5000->-dst000000000000000000000000000000000000]\n"
        "dst 10.0.0.2:7000@17000 master - 0 0 2 connected 5001-16383 [5000-<-src000000000000000000000000000000000000]\n"
    )
    (source, destination) = parse_cluster_nodes(text)
    assert source[3] == [(0, 5000)]
    assert destination[3] == [(5001, 16383)]


@pytest.mark.parametrize(("address", "node"), [
    ("127.0.0.1:30001@31001,redis-1", Node("127.0.0.1", 30001)),  # Redis 7: hostname after the bus port
    ("127.0.0.1:30001@31001,", Node("127.0.0.1", 30001)),  # Redis 7, no hostname announced
    ("127.0.0.1:30001@31001", Node("127.0.0.1", 30001)),  # Redis 4..6
    ("127.0.0.1:30001", Node("127.0.0.1", 30001)),  # Redis 3: no bus port
    ("redis-1.cluster.local:7001@17001", Node("redis-1.cluster.local", 7001)),  # announced as a name
    ("2001:db8::1:7001@17001", Node("2001:db8::1", 7001)),  # IPv6, printed without brackets
    ("::1:30001@31001,redis-1", Node("::1", 30001)),
])
def test_parse_address_forms(address: str, node: Node) -> None:
    ((parsed, *_),) = parse_cluster_nodes(f"abc {address} master - 0 0 1 connected 0-16383\n")
    assert parsed == node


@pytest.mark.parametrize("line", [
    "abc :0@0 master,noaddr - 0 0 1 disconnected 0-100",  # address not known yet
    "abc 127.0.0.1:@31001 master - 0 0 1 connected 0-100",  # no port
    "abc 127.0.0.1:port@31001 master - 0 0 1 connected 0-100",
    "abc 127.0.0.1:30001@31001 master - 0 0",  # truncated
    "ERR This instance has cluster support disabled",
    "",
])
def test_parse_skips_lines_it_cannot_route_to(line: str) -> None:
    assert parse_cluster_nodes(line + "\n") == []


def test_parse_empty_output_is_no_nodes() -> None:
    assert parse_cluster_nodes("") == []
    assert parse_cluster_nodes("\n\n") == []


def test_parse_crlf_line_ends_and_an_unreadable_epoch() -> None:
    rows = parse_cluster_nodes("a 10.0.0.1:1@2 master - 0 0 x connected 0-1\r\nb 10.0.0.2:1@2 master - 0 0 3 connected 2\r\n")
    assert [(n.host, epoch, ranges) for n, _, epoch, ranges, _ in rows] == [
        ("10.0.0.1", 0, [(0, 1)]), ("10.0.0.2", 3, [(2, 2)])]


# -- ClusterTopology -----------------------------------------------------------------------------------------------


class FakeNodeClient:
    """One node's command client: answers CLUSTER NODES with the text it was given (bytes, as redis-py returns it
    with decode_responses off), or fails."""

    def __init__(self, answer: str | bytes | Exception) -> None:
        self.answer = answer
        self.calls = 0

    async def execute_command(self, *args: Any) -> Any:
        assert args == ("CLUSTER", "NODES")
        self.calls += 1
        await asyncio.sleep(0)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


class Nodes:
    def __init__(self, answers: dict[Node, str | bytes | Exception]) -> None:
        self.clients = {node: FakeNodeClient(answer) for node, answer in answers.items()}

    def __call__(self, node: Node) -> Any:
        client = self.clients.get(node)
        if client is None:
            return FakeNodeClient(ConnectionRefusedError(f"nothing at {node.name}"))
        return client

    @property
    def asked(self) -> int:
        return sum(c.calls for c in self.clients.values())


def _owners(topology: ClusterTopology) -> dict[tuple[int, int], Node | None]:
    """The map as (first slot, last slot) -> owner runs."""
    runs: dict[tuple[int, int], Node | None] = {}
    start = 0
    owner = topology._owner
    for slot in range(1, SLOTS + 1):
        if slot == SLOTS or owner[slot] != owner[start]:
            runs[(start, slot - 1)] = owner[start]
            start = slot
    return runs


async def test_before_any_refresh_nothing_is_owned_and_the_seeds_are_known() -> None:
    topology = ClusterTopology([N1, N2], Nodes({}))
    assert not topology.ready
    assert topology.owner_of_key("sse:{room}:live") is None
    assert topology.known == [N1, N2] and topology.primaries() == {}


async def test_refresh_maps_every_slot_to_its_primary() -> None:
    nodes = Nodes({N1: HEALTHY.encode()})
    topology = ClusterTopology([N1], nodes)
    await topology.refresh()
    assert topology.ready
    assert _owners(topology) == {(0, 5460): N1, (5461, 10922): N2, (10923, 16383): N3}
    assert set(topology.primaries()) == {"127.0.0.1:30001", "127.0.0.1:30002", "127.0.0.1:30003"}
    assert {n.port for n in topology.known} == {30001, 30002, 30003, 30004, 30005, 30006}, "replicas are known too"


async def test_refresh_accepts_a_str_answer() -> None:
    topology = ClusterTopology([N1], Nodes({N1: HEALTHY}))
    await topology.refresh()
    assert _owners(topology) == {(0, 5460): N1, (5461, 10922): N2, (10923, 16383): N3}


@pytest.mark.parametrize("key", ["sse:{room}:log", "sse:{room}:live", "sse:{room}:meta", "{room}"])
async def test_owner_of_key_uses_the_hash_tag_like_redis_py(key: str) -> None:
    topology = ClusterTopology([N1], Nodes({N1: HEALTHY}))
    await topology.refresh()
    slot = key_slot(key.encode())
    assert slot == key_slot(b"room"), "only the hash tag is hashed"
    assert topology.owner_of_key(key) == topology._owner[slot]
    assert topology.owner_of_key(key) == topology.owner_of_key("sse:{room}:log"), "a channel's keys share a node"


@pytest.mark.parametrize(("key", "slot"), [
    ("somekey", 11058),  # CLUSTER KEYSLOT examples of the Redis documentation
    ("foo{hash_tag}", 2515),
    ("bar{hash_tag}", 2515),
    ("foo", 12182),
])
async def test_owner_of_key_agrees_with_cluster_keyslot(key: str, slot: int) -> None:
    topology = ClusterTopology([N1], Nodes({N1: HEALTHY}))
    await topology.refresh()
    assert key_slot(key.encode()) == slot
    expected = N1 if slot <= 5460 else N2 if slot <= 10922 else N3
    assert topology.owner_of_key(key) == expected


async def test_a_failed_primary_owns_nothing_until_a_replica_is_promoted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="service.broker.redis")
    topology = ClusterTopology([N2], Nodes({N2: FAILING}))
    await topology.refresh()
    assert _owners(topology) == {(0, 5460): None, (5461, 10922): N2, (10923, 16383): N3}
    assert topology.owner_of_key("somekey") == N3
    assert topology.owner_of_key("foo{hash_tag}") is None, "no live primary for slot 2515: nothing to send to"
    assert "127.0.0.1:30001" not in topology.primaries()
    assert [getattr(r, "uncovered_slots", None) for r in caplog.records] == [5461]


@pytest.mark.parametrize("order", ["stale first", "fresh first"])
async def test_the_promoted_replica_wins_over_a_view_that_has_not_heard_of_the_failover(order: str) -> None:
    """Two nodes claim slots 0-5460: the old primary (epoch 1) in the view of a node that missed the failover,
    the promoted replica (epoch 7) in the view of one that knows. The newest epoch wins, whichever is read first."""
    answers: dict[Node, str | bytes | Exception] = {N3: HEALTHY, N2: FAILED_OVER}
    seeds = [N3, N2] if order == "stale first" else [N2, N3]
    nodes = Nodes(answers)
    topology = ClusterTopology(seeds, nodes)
    for _ in range(5):  # the nodes are asked in a random order
        await topology.refresh()
        assert _owners(topology) == {(0, 5460): N4, (5461, 10922): N2, (10923, 16383): N3}
        assert N1.name not in topology.primaries()


async def test_a_resharded_slot_goes_to_the_node_with_the_newer_epoch() -> None:
    before = (
        "a 10.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-8191\n"
        "b 10.0.0.2:7000@17000 master - 0 0 2 connected 8192-16383\n"
    )
    after = (  # slot 100 moved to b, which bumped its epoch
        "a 10.0.0.1:7000@17000 master - 0 0 1 connected 0-99 101-8191\n"
        "b 10.0.0.2:7000@17000 myself,master - 0 0 5 connected 100 8192-16383\n"
    )
    a, b = Node("10.0.0.1", 7000), Node("10.0.0.2", 7000)
    topology = ClusterTopology([a, b], Nodes({a: before, b: after}))
    await topology.refresh()
    assert topology._owner[100] == b and topology._owner[99] == a and topology._owner[101] == a


async def test_refresh_asks_the_next_node_when_one_fails() -> None:
    nodes = Nodes({N1: ConnectionRefusedError("refused"), N2: HEALTHY})
    topology = ClusterTopology([N1, N2], nodes)
    await topology.refresh()
    assert topology.ready and topology.owner_of_key("foo") == N3


async def test_refresh_reads_at_most_three_views() -> None:
    seeds = [Node("10.0.0.9", 7000 + i) for i in range(6)]
    nodes = Nodes({n: HEALTHY for n in seeds})
    topology = ClusterTopology(seeds, nodes)
    await topology.refresh()
    assert nodes.asked == 3


async def test_refresh_then_asks_the_nodes_the_cluster_listed() -> None:
    """After the first refresh the known nodes are the ones the cluster lists: a seed that is gone does not stop
    the next refresh."""
    seed = Node("10.0.0.100", 7000)
    nodes = Nodes({seed: HEALTHY, N2: FAILED_OVER})
    topology = ClusterTopology([seed], nodes)
    await topology.refresh()
    nodes.clients[seed].answer = ConnectionRefusedError("the seed is gone")
    for node in (N1, N3, N4):
        nodes.clients[node] = FakeNodeClient(ConnectionRefusedError("down"))
    await topology.refresh()
    assert topology.owner_of_key("foo{hash_tag}") == N4


async def test_no_node_answering_raises_the_last_error_and_keeps_the_old_map() -> None:
    nodes = Nodes({N1: HEALTHY})
    topology = ClusterTopology([N1], nodes)
    await topology.refresh()
    before = list(topology._owner)
    for node in [N1, N2, N3, Node("127.0.0.1", 30004), Node("127.0.0.1", 30005), Node("127.0.0.1", 30006)]:
        nodes.clients[node] = FakeNodeClient(ConnectionRefusedError(f"{node.name} down"))
    with pytest.raises(ConnectionRefusedError):
        await topology.refresh()
    assert topology._owner == before and topology.ready


async def test_no_node_answering_before_the_first_map_leaves_it_not_ready() -> None:
    topology = ClusterTopology([N1], Nodes({N1: TimeoutError("connect timed out")}))
    with pytest.raises(TimeoutError):
        await topology.refresh()
    assert not topology.ready and topology.owner_of_key("foo") is None


async def test_an_empty_answer_maps_nothing_and_keeps_the_known_nodes() -> None:
    topology = ClusterTopology([N1], Nodes({N1: ""}))
    await topology.refresh()
    assert topology.ready and topology.primaries() == {}
    assert topology.known == [N1]


def test_a_primary_parsed_from_an_ipv6_line_gets_a_client_for_its_address() -> None:
    """CLUSTER NODES gives IPv6 addresses bare; the node's URL needs them in brackets (a bug found here: the
    client could not be made, `Port could not be cast to integer value`)."""
    ((node, *_),) = parse_cluster_nodes("abc 2001:db8::1:7001@17001 master - 0 0 1 connected 0-16383\n")
    pool = RedisTarget("redis+cluster://[2001:db8::1]:7001").command_pool(node.host, node.port)
    kwargs = pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"]) == ("2001:db8::1", 7001)
