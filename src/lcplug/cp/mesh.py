"""Process groups of context parallelism: a dp x cp `DeviceMesh`, and the ulysses x ring split of cp.

Ranks are laid out with context parallelism innermost, as `lcplug.data.pipeline.dp_coordinates` reads
data: global rank = dp_index * degree + cp_rank, so ranks r with the same r // degree share a sequence.
Inside a cp group of degree P = ring * ulysses, cp_rank = ring_index * ulysses + ulysses_index: a
Ulysses group is `ulysses` consecutive ranks (the fast all-to-all stays close), the ring runs across them.

Every rank must build the same groups in the same order (`new_group` is collective), so meshes are
built once per (world, degree, ulysses, timeout) and cached for the life of the default process group.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .comm import Comm, CommStats
from .errors import CPConfigError


@dataclass
class CPMesh:
    """One rank's view: the dp x cp DeviceMesh and a `Comm` per group it belongs to (sharing one counter)."""

    device_mesh: object  # torch.distributed.device_mesh.DeviceMesh with dims ("dp", "cp")
    cp: Comm
    ring: Comm
    ulysses: Comm
    stats: CommStats

    @property
    def degree(self) -> int:
        return self.cp.size

    @property
    def rank(self) -> int:
        """This rank's index in its cp group: which part of each sequence it holds."""
        return self.cp.rank


_MESHES: dict[tuple, CPMesh] = {}


def check_degree(degree: int, world: int) -> None:
    if degree < 1 or world % degree:
        divisors = [d for d in range(1, world + 1) if world % d == 0]
        raise CPConfigError(
            f"cp degree {degree} does not divide the world size {world}; valid: {', '.join(map(str, divisors))}"
        )


def cp_mesh(degree: int, ulysses: int = 1, timeout_s: float = 300.0) -> CPMesh:
    """This rank's mesh for context parallelism of `degree` (`ulysses` of it by all-to-all, the rest by ring)."""
    if not dist.is_available() or not dist.is_initialized():
        raise CPConfigError(
            f"cp degree {degree} needs torch.distributed initialised (accelerate launch, torchrun, or "
            "init_process_group); valid without it: no cp patch"
        )
    world = dist.get_world_size()
    check_degree(degree, world)
    if degree % ulysses:
        raise CPConfigError(f"cp ulysses size {ulysses} does not divide the cp degree {degree}")
    key = (id(dist.group.WORLD), world, degree, ulysses, timeout_s)
    if key not in _MESHES:
        _MESHES[key] = _build(world, degree, ulysses, timeout_s)
    return _MESHES[key]


def _build(world: int, degree: int, ulysses: int, timeout_s: float) -> CPMesh:
    from torch.distributed.device_mesh import DeviceMesh

    timeout = timedelta(seconds=timeout_s)
    # explicit CPU: a pre-flight may patch under `torch.device("meta")`
    layout = torch.arange(world, device="cpu").view(world // degree, degree // ulysses, ulysses)  # (dp, ring, ulysses)
    me = dist.get_rank()

    def groups_along(parts: torch.Tensor):
        """Create one group per row of `parts` (every rank creates all of them); return the one holding me."""
        mine = None
        for row in parts.tolist():
            group = dist.new_group(row, timeout=timeout)
            if me in row:
                mine = group
        return mine

    cp_group = groups_along(layout.reshape(-1, degree))
    dp_group = groups_along(layout.reshape(-1, degree).T)
    ring_group = groups_along(layout.permute(0, 2, 1).reshape(-1, degree // ulysses))
    uly_group = groups_along(layout.reshape(-1, ulysses))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = DeviceMesh.from_group(
        [dp_group, cp_group], device, mesh=layout.reshape(-1, degree), mesh_dim_names=("dp", "cp")
    )
    stats = CommStats()
    return CPMesh(
        mesh,
        Comm(cp_group, stats, timeout_s),
        Comm(ring_group, stats, timeout_s),
        Comm(uly_group, stats, timeout_s),
        stats,
    )
