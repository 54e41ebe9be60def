"""Which part of a build this process is: from `--shard I/N`, torchrun or SLURM.

featstore has no scheduler of its own; it reads what the launcher already set:

- `--shard I/N` (job arrays, machines without a shared launcher): process I of N,
  doing exactly its own part (no stealing), so that N invocations split the work
  however they are run (one after another, or at once).
- torchrun: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`.
- SLURM (`srun featstore build ...`): `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`
  and the tasks per node (`SLURM_NTASKS_PER_NODE`, else the first count of
  `SLURM_TASKS_PER_NODE`, "8(x4)" -> 8). A batch script's own shell has
  `SLURM_PROCID` set too but no job step (`SLURM_STEP_ID`): it counts as one process.

Under torchrun and SLURM the processes share the work dynamically: each starts with
its own block of units and then takes units nobody has claimed (stragglers do not hold
the job). The split never decides correctness: the work is recorded per unit in the
store, so any number of processes, in any order, completes exactly what is missing.
Each process uses the GPU of its local rank and a share of the host's cores.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from featstore.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Share:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    launcher: str = "single"  # single | shard | torchrun | slurm | resume (one process, a distributed build's plan)
    steal: bool = True  # take other processes' unclaimed units when done with one's own

    @property
    def distributed(self) -> bool:
        return self.launcher != "single"

    def describe(self) -> str:
        if self.launcher == "resume":
            return "one process, resuming a distributed build"
        return f"process {self.rank + 1} of {self.world} ({self.launcher})"


def parse_shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise ConfigError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. --shard 0/4")
    return int(m.group(1)), int(m.group(2))


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} in the environment is not a number") from None


def _slurm_tasks_per_node(env: Mapping[str, str]) -> int | None:
    n = _int(env, "SLURM_NTASKS_PER_NODE")
    if n is not None:
        return n
    m = re.match(r"\s*(\d+)", env.get("SLURM_TASKS_PER_NODE", ""))
    return int(m.group(1)) if m else None


def detect_share(shard: str | None = None, env: Mapping[str, str] | None = None) -> Share:
    """This process's share of the build: `--shard` first, then torchrun's, then SLURM's
    variables; otherwise a single process."""
    env = os.environ if env is None else env
    if shard is not None:
        index, count = parse_shard(shard)
        return Share(index, count, 0, 1, "shard", steal=False)
    size, rank = _int(env, "WORLD_SIZE"), _int(env, "RANK")
    if size is not None and rank is not None and size > 1:
        local = _int(env, "LOCAL_RANK") or 0
        return _checked(Share(rank, size, local, _int(env, "LOCAL_WORLD_SIZE") or size, "torchrun"))
    ntasks, procid = _int(env, "SLURM_NTASKS"), _int(env, "SLURM_PROCID")
    in_step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", "")) != ""
    if ntasks is not None and procid is not None and ntasks > 1 and in_step:
        local = _int(env, "SLURM_LOCALID") or 0
        per_node = _slurm_tasks_per_node(env) or 1
        return _checked(Share(procid, ntasks, local, max(per_node, local + 1), "slurm"))
    return Share()


def _checked(share: Share) -> Share:
    if not 0 <= share.rank < share.world or not 0 <= share.local_rank < share.local_world:
        raise ConfigError(
            f"{share.launcher}: rank {share.rank} of {share.world} (local {share.local_rank} of "
            f"{share.local_world}) is not a valid process number"
        )
    return share


def host_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def process_cpus(share: Share) -> int:
    """The cores this process may use: the host's divided among its processes, unless the
    launcher already bound this process to its own (SLURM with --cpus-per-task, taskset)."""
    usable, total = host_cpus(), os.cpu_count() or 1
    if usable < total:  # bound: these are already this process's share
        return usable
    return max(1, usable // max(1, share.local_world))


def cuda_device_for(share: Share, device_count: int) -> str:
    """The GPU of this process: its local rank (modulo the GPUs visible)."""
    if device_count < 1:
        raise ConfigError("no CUDA device visible to this process")
    return f"cuda:{share.local_rank % device_count}"


def workers_for(share: Share, on_cuda: bool) -> int:
    """Decode workers of this process: its share of the host's cores, one left for the
    process itself (on CPU the model needs the cores: one worker)."""
    if not on_cuda:
        return 1
    return max(1, min(process_cpus(share) - 1, 16))
