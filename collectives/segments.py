"""One exchange-and-reduce step, pipelined in segments (used by ring, recursive doubling
and recursive halving).

    send  ──seg0──seg1──seg2──▶ peer            all segment sends posted at once (Isend)
    recv  ◀─seg0──seg1──seg2──  peer            DEPTH receives in flight (Irecv)
    reduce        seg0  seg1  seg2              target[k] = recv[k] op own[k] while
                                                segment k+1 is still moving

A step sends the array `send` to `dest` while receiving, from `source`, a partner array
as long as `own`, and leaves `target = received op own`. Blocks below SEGMENT_MIN bytes
move as one MPI_Sendrecv (fewest calls, lowest latency); larger ones in SEGMENT_BYTES
pieces, so the reduction of one piece overlaps the transfer of the next and reads a piece
that is still in cache, and the scratch memory is DEPTH pieces instead of a whole block.
Sender and receiver cut a message into the same pieces because both derive them from
the size of the array being moved (Patarasuk & Yuan 2009, section 4, pipelined ring).

Cost of a step moving m bytes: alpha + m beta + m gamma unpipelined; pipelined about
k alpha + m max(beta, gamma) for k segments when transfer and reduction overlap.
"""
SEGMENT_BYTES = 1 << 20
SEGMENT_MIN = 8 << 20
DEPTH = 2


def pieces(n, itemsize):
    """(start, stop) pieces an array of n elements travels in."""
    if n * itemsize < SEGMENT_MIN:
        return ((0, n),)
    seg = max(1, SEGMENT_BYTES // itemsize)
    return tuple((s, min(s + seg, n)) for s in range(0, n, seg))


def exchange_reduce(t, send, dest, own, source, target, reduce, target_is_send=False):
    """Send `send` to dest, receive an array like `own` from source; target = received op own.
    target_is_send: target is the array being sent (recursive doubling), so a piece is only
    overwritten once its send has completed."""
    recv_pieces = pieces(own.size, own.itemsize)
    send_pieces = pieces(send.size, send.itemsize)
    if len(recv_pieces) == 1 and len(send_pieces) == 1:
        tmp = t.scratch(own.size, own.dtype)
        yield t.sendrecv(send, dest, tmp, source)
        reduce(tmp, own, target)
        return
    sends = [t.isend(send[a:b], dest) for a, b in send_pieces]
    seg = recv_pieces[0][1]
    bufs = [t.scratch(seg, own.dtype) for _ in range(min(DEPTH, len(recv_pieces)))]
    depth = len(bufs)
    recvs = [t.irecv(bufs[k][:b - a], source) for k, (a, b) in enumerate(recv_pieces[:depth])]
    for k, (a, b) in enumerate(recv_pieces):
        slot = k % depth
        yield (recvs[slot], sends[k]) if target_is_send else (recvs[slot],)
        reduce(bufs[slot][:b - a], own[a:b], target[a:b])
        nxt = k + depth
        if nxt < len(recv_pieces):
            a2, b2 = recv_pieces[nxt]
            recvs[slot] = t.irecv(bufs[slot][:b2 - a2], source)
    yield sends
