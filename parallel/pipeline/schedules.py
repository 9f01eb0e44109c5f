"""Pipeline schedules as data: pure functions returning each rank's ordered list of actions.

A schedule for p ranks and m micro-batches is ``lists[r]``, the actions rank r executes in
order (parallel/pipeline/executor.py runs any such list; nothing else differs between schedules):

    F(i, c)       forward of micro-batch i through model chunk c of this rank
    B(i, c)       backward: the gradient w.r.t. the chunk's input (and, unless the schedule
                  has W actions, its weight gradients too)
    W(i, c)       the weight-gradient part of B, deferred (zero-bubble schedules only)
    recv_f/send_f activation into / out of F, from / to the previous / next stage
    recv_b/send_b gradient into / out of B, from / to the next / previous stage

Chunks (interleaved schedule): rank r holds v chunks; chunk c is virtual stage s = c p + r,
so activations travel rank 0 -> 1 -> ... -> p-1 -> 0 (next chunk) -> ... (Narayanan et al.
2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM").
Communication semantics (what the executor does and ``simulate`` checks): sends never
block; a recv blocks until the matching send was issued. Messages are matched by
(micro-batch, chunk, direction), never by order.

Schedules (phases named as in the papers), bubble fraction idle / total with t_F, t_B, t_W:

    gpipe        all m forwards, then all m backwards (Huang et al. 2019).
                 bubble (p-1)/(m+p-1); holds m micro-batches of activations.
    1f1b         warm-up p-1-r forwards, steady state one forward + one backward, cool-down
                 backwards (PipeDream-Flush, Narayanan et al. 2019/2021). Same bubble,
                 holds at most min(p-r, m) micro-batches.
    interleaved  1F1B over v chunks per rank (Megatron-LM's order; m a multiple of p):
                 warm-up 2(p-1-r) + (v-1)p chunk-forwards. bubble (p-1)/(v m + p-1).
    zb-h1        ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism", arXiv 2401.10241):
                 backward split into B (input gradient, on the critical path) and W (weight
                 gradient, no one waits for it); rank r postpones r W's to fill the cool-down,
                 at most p micro-batches in flight (1F1B's peak). Bubble (m >= p)
                 (p-1)(t_F+t_B-t_W) against 1F1B's (p-1)(t_F+t_B+t_W): a third at equal costs.
"""
from collections import namedtuple

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")
COMPUTE = ("F", "B", "W")


class Action(namedtuple("Action", "kind mb chunk peer")):
    """kind in F B W send_f recv_f send_b recv_b; mb micro-batch; chunk local chunk; peer rank."""
    __slots__ = ()

    def __str__(self):
        c = f".{self.chunk}" if self.chunk else ""
        return f"{self.kind}{self.mb}{c}" + (f"@{self.peer}" if self.peer is not None else "")


class Deadlock(RuntimeError):
    """simulate() found ranks all waiting on receives nobody will send."""


# -- compute orders, one per schedule ---------------------------------------------------------
def _gpipe(p, m):
    return [[("F", i, 0) for i in range(m)] + [("B", i, 0) for i in range(m)] for _ in range(p)]


def _one_f_one_b(p, m):
    out = []
    for r in range(p):
        warm = min(p - 1 - r, m)                                  # warm-up
        acts = [("F", i, 0) for i in range(warm)]
        for i in range(m - warm):                                 # steady 1F1B
            acts += [("F", warm + i, 0), ("B", i, 0)]
        acts += [("B", i, 0) for i in range(m - warm, m)]         # cool-down
        out.append(acts)
    return out


def _interleaved(p, m, v):
    """Megatron-LM's interleaved 1F1B (schedules.py, forward_backward_pipelining_with_interleaving):
    chunk-step k runs micro-batch (k // (p v)) p + k % p on chunk (k // p) % v forward, and
    chunk v-1-(k // p) % v backward."""
    total = m * v

    def mb(k):
        return (k // (p * v)) * p + k % p

    out = []
    for r in range(p):
        warm = total if m == p else min((p - r - 1) * 2 + (v - 1) * p, total)     # warm-up
        acts = [("F", mb(k), (k // p) % v) for k in range(warm)]
        for k in range(total - warm):                                           # steady 1F1B
            j = k + warm
            acts += [("F", mb(j), (j // p) % v), ("B", mb(k), v - 1 - (k // p) % v)]
        acts += [("B", mb(k), v - 1 - (k // p) % v) for k in range(total - warm, total)]   # cool-down
        out.append(acts)
    return out


def _zb_h1(p, m):
    """ZB-H1's handcrafted order (Qi et al. 2023, section 3.1; as in the authors' code): rank r
    runs p-r warm-up forwards (one more than 1F1B, filling its wait for the first gradient),
    then r B-F pairs whose W's it postpones, then B-W-F steady state, then B-W cool-down, then
    the r postponed W's, which fill the cool-down bubble. At most p micro-batches in flight."""
    out = []
    for r in range(p):
        n = {"F": 0, "B": 0, "W": 0}
        acts = []

        def run(*kinds):
            for k in kinds:
                acts.append((k, n[k], 0))
                n[k] += 1
        for _ in range(min(p - r, m)):                    # warm-up
            run("F")
        for _ in range(min(r, m - n["F"])):               # W postponed r times
            run("B", "F")
        while n["F"] < m:                                 # steady: B, W, F
            run("B", "W", "F")
        while n["B"] < m:                                 # cool-down
            run("B", "W")
        while n["W"] < m:                                 # the postponed W's fill the bubble
            run("W")
        out.append(acts)
    return out


# -- adding the communication -------------------------------------------------------------------
def _with_comm(orders, p, v):
    """Insert recv_f before each F whose input comes from another stage, send_f after each F
    whose output goes on, and likewise recv_b / send_b around B."""
    last = p * v - 1
    out = []
    for r, order in enumerate(orders):
        acts = []
        for kind, i, c in order:
            s = c * p + r                                          # virtual stage
            if kind == "F" and s > 0:
                acts.append(Action("recv_f", i, c, (s - 1) % p))
            if kind == "B" and s < last:
                acts.append(Action("recv_b", i, c, (s + 1) % p))
            acts.append(Action(kind, i, c, None))
            if kind == "F" and s < last:
                acts.append(Action("send_f", i, c, (s + 1) % p))
            if kind == "B" and s > 0:
                acts.append(Action("send_b", i, c, (s - 1) % p))
        out.append(acts)
    return out


def build(name, p, m, v=1):
    """Each rank's action list for schedule ``name`` with p ranks, m micro-batches, v chunks
    per rank (interleaved only; 1 otherwise). Arguments are checked by parallel/pipeline/executor.py."""
    if name == "gpipe":
        orders = _gpipe(p, m)
    elif name == "1f1b":
        orders = _one_f_one_b(p, m)
    elif name == "interleaved":
        orders = _interleaved(p, m, v)
    elif name == "zb-h1":
        orders = _zb_h1(p, m)
    else:
        raise ValueError(f"unknown pipeline schedule {name!r}; choose from {', '.join(SCHEDULES)}")
    return _with_comm(orders, p, v if name == "interleaved" else 1)


def activation_bound(name, p, m, v, r):
    """The most chunk-activations rank r holds at once, as the schedule promises."""
    if name == "gpipe":
        return m
    if name == "1f1b":
        return min(p - r, m)
    if name == "interleaved":
        return m * v if m == p else min((p - r - 1) * 2 + (v - 1) * p + 1, m * v)
    return min(p, m)                                               # zb-h1


def bubble_theory(name, p, m, v=1, t_f=1.0, t_b=1.0, t_w=1.0):
    """Idle fraction of the step time (bubble / (work + bubble)) the papers give; t_b is the
    input-gradient part, t_w the weight-gradient part of a backward."""
    work = m * (t_f + t_b + t_w)
    if name in ("gpipe", "1f1b"):
        bubble = (p - 1) * (t_f + t_b + t_w)
    elif name == "interleaved":
        bubble = (p - 1) * (t_f + t_b + t_w) / v
    else:
        bubble = (p - 1) * max(t_f + t_b - t_w, 0.0)
    return bubble / (work + bubble)


# -- checking and replaying lists -----------------------------------------------------------------
def held(actions):
    """Max number of (micro-batch, chunk) activations alive on one rank: from F until the
    backward that frees them (W when the list has W's, else B)."""
    frees = "W" if any(a.kind == "W" for a in actions) else "B"
    live = peak = 0
    for a in actions:
        if a.kind == "F":
            live += 1
            peak = max(peak, live)
        elif a.kind == frees:
            live -= 1
    return peak


def simulate(lists, cost=None, comm=0.0):
    """Replay the lists with the executor's semantics (sends never block, a recv waits for
    its send): returns, per rank, [(action, start, end)] for compute and recv actions.
    ``cost(action, rank) -> seconds`` (default 1 per F, B, W; 0 for communication);
    ``comm`` is added to every message's flight time. Raises Deadlock naming stuck ranks."""
    cost = cost or (lambda a, r: 1.0 if a.kind in COMPUTE else 0.0)
    p = len(lists)
    sent = {}                                   # (dir, mb, chunk-of-receiver, dst) -> arrival time
    pos, clock, timeline = [0] * p, [0.0] * p, [[] for _ in range(p)]
    while True:
        moved = False
        for r in range(p):
            while pos[r] < len(lists[r]):
                a = lists[r][pos[r]]
                if a.kind in ("send_f", "send_b"):
                    # the receiver's chunk: next virtual stage for send_f, previous for send_b
                    s = a.chunk * p + r + (1 if a.kind == "send_f" else -1)
                    sent[(a.kind[-1], a.mb, s // p, a.peer)] = clock[r] + comm
                elif a.kind in ("recv_f", "recv_b"):
                    key = (a.kind[-1], a.mb, a.chunk, r)
                    if key not in sent:
                        break
                    start = clock[r]
                    clock[r] = max(clock[r], sent.pop(key))
                    timeline[r].append((a, start, clock[r]))
                else:
                    start = clock[r]
                    clock[r] += cost(a, r)
                    timeline[r].append((a, start, clock[r]))
                pos[r] += 1
                moved = True
        if all(pos[r] == len(lists[r]) for r in range(p)):
            if sent:
                raise Deadlock(f"{len(sent)} messages sent but never received, e.g. {next(iter(sent))}")
            return timeline
        if not moved:
            stuck = ", ".join(f"rank {r} at {lists[r][pos[r]]}" for r in range(p) if pos[r] < len(lists[r]))
            raise Deadlock(f"no rank can move: {stuck}")


def bubble_of(timeline):
    """1 - busy / (ranks * makespan) over the compute actions of a timeline."""
    end = max((e for tl in timeline for _, _, e in tl), default=0.0)
    busy = sum(e - s for tl in timeline for a, s, e in tl if a.kind in COMPUTE)
    return 1.0 - busy / (len(timeline) * end) if end > 0 else 0.0
