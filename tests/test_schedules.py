"""Pipeline schedules as data (parallel/pipeline/schedules.py), tested on the lists alone: every forward
before its backward (and W after B), each action exactly once, sends matched by receives,
no deadlock when replayed with the executor's semantics, activations held within the
schedule's promise, and the replayed bubble equal to the papers' formula at unit costs."""
import pytest

from parallel.pipeline.schedules import (COMPUTE, SCHEDULES, Action, Deadlock, activation_bound, bubble_of,
                                bubble_theory, build, held, simulate)

GRID = [(p, m) for p in (1, 2, 3, 4, 8) for m in (1, 2, 3, 4, 8, 12, 16)]


def cases():
    for name in SCHEDULES:
        for p, m in GRID:
            for v in ((2, 3) if name == "interleaved" else (1,)):
                if name == "interleaved" and m % p:
                    continue
                yield name, p, m, v


@pytest.mark.parametrize("name,p,m,v", list(cases()))
def test_lists_are_complete_ordered_matched_and_bounded(name, p, m, v):
    lists = build(name, p, m, v)
    split = name == "zb-h1"
    last = p * v - 1
    sends, recvs = set(), set()
    for r, acts in enumerate(lists):
        seen = {}
        for k, a in enumerate(acts):
            assert isinstance(a, Action)
            s = a.chunk * p + r
            if a.kind in COMPUTE:
                key = (a.kind, a.mb, a.chunk)
                assert key not in seen, f"rank {r}: {a} twice"
                seen[key] = k
                if a.kind == "B":
                    assert ("F", a.mb, a.chunk) in seen, f"rank {r}: {a} before its forward"
                if a.kind == "W":
                    assert ("B", a.mb, a.chunk) in seen, f"rank {r}: {a} before its B"
            elif a.kind.startswith("send"):
                to = s + (1 if a.kind == "send_f" else -1)
                assert 0 <= to <= last and a.peer == to % p
                sends.add((a.kind[-1], a.mb, to))
            else:
                frm = s + (-1 if a.kind == "recv_f" else 1)
                assert 0 <= frm <= last and a.peer == frm % p
                recvs.add((a.kind[-1], a.mb, s))
        kinds = ("F", "B", "W") if split else ("F", "B")
        assert sorted(seen) == sorted((k, i, c) for k in kinds for i in range(m) for c in range(v))
        assert held(acts) <= activation_bound(name, p, m, v, r)
    assert sends == recvs                                   # every message sent is received, and only those
    assert len(sends) == 2 * m * (p * v - 1)
    simulate(lists)                                         # raises Deadlock if the lists can hang


@pytest.mark.parametrize("name", SCHEDULES)
def test_replayed_bubble_is_the_papers(name):
    for p in (2, 4, 8):
        for m in (p, 2 * p, 4 * p):
            v = 2 if name == "interleaved" else 1

            def cost(a, r):
                if a.kind not in COMPUTE:
                    return 0.0
                per = 1.0 / v                                # a chunk is 1/v of a stage
                return 2 * per if a.kind == "B" and name != "zb-h1" else per   # B+W fused unless split
            got = bubble_of(simulate(build(name, p, m, v), cost))
            assert got == pytest.approx(bubble_theory(name, p, m, v), abs=1e-9), (p, m)


def test_promises_between_schedules():
    p, m = 4, 16
    assert max(held(a) for a in build("1f1b", p, m)) == p            # 1F1B holds p, GPipe m
    assert max(held(a) for a in build("gpipe", p, m)) == m
    assert max(held(a) for a in build("zb-h1", p, m)) <= p           # ZB-H1: 1F1B's peak
    assert bubble_theory("zb-h1", p, m) <= 0.4 * bubble_theory("1f1b", p, m)


def test_a_bad_order_is_caught_as_a_deadlock():
    lists = build("1f1b", 2, 2)
    # rank 0 sends micro-batch 1's activation only at the very end (after waiting for gradients),
    # while rank 1 now waits for micro-batch 1's activation first: a cycle
    r1 = lists[1]
    i0 = r1.index(Action("recv_f", 0, 0, 0))
    i1 = r1.index(Action("recv_f", 1, 0, 0))
    lists[0] = [a for a in lists[0] if not (a.kind == "send_f" and a.mb == 1)] + [Action("send_f", 1, 0, 1)]
    r1[i0], r1[i1] = r1[i1], r1[i0]
    with pytest.raises(Deadlock):
        simulate(lists)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown pipeline schedule"):
        build("pipedream", 2, 2)
