"""Mesh(dp, pp, sp, tp): the process grid, one Communicator per parallel axis, built once.

Axes: dp data parallel (and ZeRO), pp pipeline stages, sp sequence parallel (ring
attention, Ulysses), tp tensor parallel. World ranks are laid out with tp varying fastest,
then sp, then dp, then pp (Megatron-LM's order: the most talkative axis on the nearest
ranks):

    world = ((pp_rank * dp + dp_rank) * sp + sp_rank) * tp + tp_rank

    Mesh(dp=2, pp=2, sp=1, tp=2), 8 ranks:
        world  0 1 2 3 4 5 6 7
        tp     0 1 0 1 0 1 0 1       tp groups {0,1} {2,3} {4,5} {6,7}
        dp     0 0 1 1 0 0 1 1       dp groups {0,2} {1,3} {4,6} {5,7}
        pp     0 0 0 0 1 1 1 1       pp groups {0,4} {1,5} {2,6} {3,7}

Every axis `a` gives, on each rank (declared below; names carry their axis):
    a_comm    the Communicator of this rank's group along a (ranks ordered by coordinate)
    a_rank, a_size
    a_prev, a_next            neighbour ranks in a_comm, None past either end (pipelines)
    a_ring_prev, a_ring_next  the same, wrapping around (rings)
    a_first, a_last           whether this rank is at either end of the axis

Combined groups are built here too, by name, once (cached), so no other module splits the
world: ``group("dp", "sp")`` is this rank's dp x sp group (the ranks that share its pp and
tp coordinates), ordered by the named axes with the first slowest (rank dp_rank * sp +
sp_rank); ``pp_ends()`` is the pair of the first and the last pipeline stage at this rank's
(dp, sp, tp) coordinates (the tied embedding's group; None on the stages between). Building
one is a collective over the world the first time: every rank asks for it in the same order.

The product dp * pp * sp * tp must equal the world size; otherwise every rank raises the
same MeshError before any communication, so the job stops cleanly instead of hanging.
"""
from mpi4py import MPI

from .communicator import Communicator

AXES = ("pp", "dp", "sp", "tp")         # slowest to fastest varying


class MeshError(ValueError):
    """The mesh does not fit the job."""


class Axis:
    """One axis of the mesh as seen from this rank."""

    def __init__(self, name, comm, world_ranks):
        self.name, self.comm = name, comm
        self.rank, self.size = comm.rank, comm.size
        self.world_ranks = world_ranks          # world rank of each member, by axis rank
        r, n = self.rank, self.size
        self.prev = r - 1 if r > 0 else None
        self.next = r + 1 if r < n - 1 else None
        self.ring_prev, self.ring_next = (r - 1) % n, (r + 1) % n
        self.first, self.last = r == 0, r == n - 1

    def __repr__(self):
        return f"Axis({self.name}, rank={self.rank}/{self.size}, world={self.world_ranks})"


class _AxisField:
    """mesh.<axis>_<field>: read from the Axis (a declared, read-only attribute)."""

    def __init__(self, axis, field):
        self.axis, self.field = axis, field

    def __get__(self, mesh, owner=None):
        return self if mesh is None else getattr(mesh.axes[self.axis], self.field)


FIELDS = ("comm", "rank", "size", "prev", "next", "ring_prev", "ring_next", "first", "last")


def _fields(axis):
    return tuple(_AxisField(axis, f) for f in FIELDS)


class Mesh:
    dp_comm, dp_rank, dp_size, dp_prev, dp_next, dp_ring_prev, dp_ring_next, dp_first, dp_last = _fields("dp")
    pp_comm, pp_rank, pp_size, pp_prev, pp_next, pp_ring_prev, pp_ring_next, pp_first, pp_last = _fields("pp")
    sp_comm, sp_rank, sp_size, sp_prev, sp_next, sp_ring_prev, sp_ring_next, sp_first, sp_last = _fields("sp")
    tp_comm, tp_rank, tp_size, tp_prev, tp_next, tp_ring_prev, tp_ring_next, tp_first, tp_last = _fields("tp")

    def __init__(self, dp=1, pp=1, sp=1, tp=1, world=None):
        if world is None or isinstance(world, MPI.Comm):
            world = Communicator(world)
        self.world = world
        self.shape = {"dp": dp, "pp": pp, "sp": sp, "tp": tp}
        for name, size in self.shape.items():
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise MeshError(f"Mesh: {name} must be a positive integer, got {size!r}")
        product = dp * pp * sp * tp
        if product != world.size:
            raise MeshError(f"Mesh(dp={dp}, pp={pp}, sp={sp}, tp={tp}) needs dp*pp*sp*tp = {product} ranks, "
                            f"but the job has {world.size}; launch with mpiexec -n {product} or change the "
                            f"layout")
        self.coords = self.coords_of(world.rank)
        self._groups = {}
        self.axes = {}
        for name in AXES:
            comm = self.group(name)
            members = [self.rank_of(**{**self.coords, name: i}) for i in range(self.shape[name])]
            self.axes[name] = Axis(name, comm, members)

    def group(self, *axes):
        """This rank's Communicator over the named axes (ranks sharing every other coordinate),
        ordered by the axes as named, the first slowest: group("dp", "sp") has rank
        dp_rank * sp + sp_rank. Built once (a collective over the world), then cached."""
        if not axes or len(set(axes)) != len(axes) or any(a not in self.shape for a in axes):
            raise MeshError(f"Mesh.group: name distinct axes among {', '.join(AXES)}, got {axes}")
        if axes not in self._groups:
            rest = [a for a in AXES if a not in axes]
            color = 0
            for a in rest:
                color = color * self.shape[a] + self.coords[a]
            key = 0
            for a in axes:
                key = key * self.shape[a] + self.coords[a]
            self._groups[axes] = self.world.split(color, key=key, label=" x ".join(axes))
        return self._groups[axes]

    def pp_ends(self):
        """The first and last pipeline stage at this rank's (dp, sp, tp) coordinates, as one
        Communicator (rank 0: the first stage); None on the stages between and when pp = 1.
        A collective over the world the first time, then cached."""
        if "pp ends" not in self._groups:
            pp, c = self.shape["pp"], self.coords
            end = pp > 1 and c["pp"] in (0, pp - 1)
            color = (c["dp"] * self.shape["sp"] + c["sp"]) * self.shape["tp"] + c["tp"]
            self._groups["pp ends"] = self.world.split(color if end else None, key=c["pp"], label="pp ends")
        return self._groups["pp ends"]

    def communicators(self):
        """Every Communicator this mesh has built so far, the world first, each once (for
        counting the bytes a rank sends: Communicator.bytes_by_kind)."""
        out = [self.world]
        for c in self._groups.values():
            if c is not None and all(c is not o for o in out):
                out.append(c)
        return out

    def rank_of(self, dp=0, pp=0, sp=0, tp=0):
        """World rank at the given coordinates."""
        s = self.shape
        return ((pp * s["dp"] + dp) * s["sp"] + sp) * s["tp"] + tp

    def coords_of(self, rank):
        """{axis: coordinate} of a world rank."""
        coords = {}
        for name in reversed(AXES):
            rank, coords[name] = divmod(rank, self.shape[name])
        return {name: coords[name] for name in ("dp", "pp", "sp", "tp")}

    def axis(self, name):
        return self.axes[name]

    def __repr__(self):
        c = ", ".join(f"{a}={self.coords[a]}/{self.shape[a]}" for a in ("dp", "pp", "sp", "tp"))
        return f"Mesh(rank {self.world.rank}: {c})"
