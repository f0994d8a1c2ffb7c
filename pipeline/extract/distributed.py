"""Extraction by several processes into one store: torchrun's ranks, one per device.

A launcher (torchrun, or anything that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT as torchrun does) starts the same ``satdifuser extract`` once per device. For each
split, every rank's settings are compared with rank 0's; rank 0 then checks or creates the store
under its writer lock, held until every rank is done, and names the shards not done; rank r
writes the shards r, r + W, r + 2W, ... of that list. The cache writes and marks whole shards, so
each shard has exactly one writer, a killed rank loses only the shard it was writing, and a run
with another world size resumes from the done marks. Only rank 0 writes the store's attributes:
its own shards' work per shard, as a single process does, and the other ranks' sums once at the
end of the split.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from ..cache.layout import ordered_tiers
from ..cache.lock import WriterLock
from ..cache.store import flatten, normalise
from ..cache.writer import CacheWriter
from ..device import auto_device
from ..errors import UserError
from .run import Extraction, ExtractResult, _run, add_unrecorded, record_size, usable_cores

log = logging.getLogger(__name__)

# A rank that has written its shards waits at the end of the split for the slowest, which may be
# hours; a dead rank is the launcher's to detect (torchrun stops the others), not a timeout's.
COLLECTIVE_TIMEOUT = dt.timedelta(days=7)
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


class RankStopped(UserError):
    """Rank 0 stopped the run and has said why; the other ranks exit without repeating it."""

    quiet = True


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    local_rank: int
    local_world: int

    @classmethod
    def from_env(cls, env=os.environ) -> Ranks | None:
        """The ranks a launcher describes in the environment; None for a single process."""
        values = {}
        for name in RANK_VARIABLES:
            text = env.get(name)
            if text is None:
                continue
            try:
                values[name] = int(text)
            except ValueError:
                raise UserError(f"environment variable {name}={text!r} is not a whole number; start the ranks "
                                "with torchrun, which sets it") from None
        world = values.get("WORLD_SIZE", 1)
        if world <= 1:
            return None
        rank = values.get("RANK")
        if rank is None or not 0 <= rank < world:
            raise UserError(f"WORLD_SIZE is {world} but RANK is {env.get('RANK', 'not set')}: each rank needs RANK "
                            f"0..{world - 1}; start the ranks with torchrun, which sets both")
        local_world = values.get("LOCAL_WORLD_SIZE", world)
        return cls(rank, world, values.get("LOCAL_RANK", 0), local_world)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def share(self, shards: list[int]) -> list[int]:
        """This rank's part of the shards not done: every W-th, from its rank on."""
        return shards[self.rank::self.world]


def rank_device(asked: str, ranks: Ranks, cuda_devices: int) -> str:
    """The device of a rank: ``cuda`` (and ``auto`` with CUDA present) becomes ``cuda:LOCAL_RANK``,
    wrapped round the visible devices (one visible device per rank, as srun's --gpus-per-task gives,
    is ``cuda:0``); a device with an index, ``cpu`` and ``mps`` are kept."""
    if asked == "auto":
        asked = auto_device(cuda_devices)
    if asked != "cuda" or not cuda_devices:
        return asked
    return f"cuda:{ranks.local_rank % cuda_devices}"


def _device_identity(device: torch.device) -> str | None:
    """The host and UUID of a CUDA device (two ranks may see one GPU under different indices)."""
    if device.type != "cuda":
        return None
    return f"{socket.gethostname()}/{torch.cuda.get_device_properties(device).uuid}"


class RankGroup:
    """The process group of the ranks; its collectives carry small Python objects only."""

    def __init__(self, ranks: Ranks, device: torch.device):
        import torch.distributed as dist

        self.ranks, self.dist = ranks, dist
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # Objects travel through gloo even on CUDA ranks ("cpu:gloo"), so that two ranks on one GPU,
        # which NCCL refuses, still run; tensors on the GPU would go through NCCL.
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
        except ValueError as err:  # torch names the variable missing from the env:// rendezvous
            raise UserError(f"rank {ranks.rank} of {ranks.world} cannot reach the others ({err}); start the ranks "
                            "with torchrun, which sets MASTER_ADDR and MASTER_PORT") from None

    @property
    def leader(self) -> bool:
        return self.ranks.leader

    def all_gather(self, value) -> list:
        out = [None] * self.ranks.world
        self.dist.all_gather_object(out, value)
        return out

    def broadcast(self, value):
        """Rank 0's ``value``, on every rank."""
        box = [value]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


def setting_differences(settings: list[dict]) -> list[str]:
    """For every rank whose settings are not rank 0's, the dotted keys that differ, both sides shown."""
    first, out = flatten(normalise(settings[0])), []
    for rank, other in enumerate(settings[1:], start=1):
        other = flatten(normalise(other))
        for key in sorted(set(first) | set(other)):
            a, b = first.get(key, "<absent>"), other.get(key, "<absent>")
            if a != b:
                out.append(f"{key}: rank 0 {a!r}, rank {rank} {b!r}")
    return out


def shared_devices(identities: list[str | None]) -> list[str]:
    """One line per GPU that more than one rank uses."""
    ranks = defaultdict(list)
    for rank, identity in enumerate(identities):
        if identity is not None:
            ranks[identity].append(rank)
    return [f"ranks {', '.join(map(str, r))} share the GPU {identity}" for identity, r in ranks.items() if len(r) > 1]


class RankExtraction(Extraction):
    """One rank of an extraction by several processes; the single-process ``Extraction`` otherwise."""

    def __init__(self, cfg, ranks: Ranks, device: str | None = None, storage_options: dict | None = None):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        super().__init__(cfg, rank_device(device or cfg.device, ranks, count), storage_options)
        self.ranks = ranks
        self.group = RankGroup(ranks, self.device)
        for line in shared_devices(self.group.all_gather(_device_identity(self.device))):
            if ranks.leader:
                log.warning("%s: they compete for its memory and compute; start one rank per GPU "
                            "(--nproc_per_node = the GPUs of a node)", line)

    def run(self, split: str, path: str | None = None, overwrite: bool = False,
            replace_mismatched: bool = False, progress: bool = True, repair: bool = False,
            wait: bool = False) -> ExtractResult:
        """``Extraction.run`` by every rank at once; rank 0's result counts the work of all ranks."""
        path, dataset, request = self.split_request(split, path)
        self._check_same({"cache": path, "store": list(ordered_tiers(self.cfg.store)), "overwrite": overwrite,
                          "repair": repair, "replace_mismatched": replace_mismatched, **request})
        if self.ranks.leader:
            return self._lead(path, dataset, request, overwrite, replace_mismatched, progress, repair, wait)
        return self._follow(path, dataset, request)

    def close(self) -> None:
        self.group.close()

    def _check_same(self, settings: dict) -> None:
        diffs = setting_differences(self.group.all_gather(settings))
        if diffs:
            shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
            error = RankStopped if not self.ranks.leader else UserError
            raise error(f"the ranks were started with other settings than rank 0 ({shown}); start every rank with "
                        "the same config, --set values, backbone files and data")

    def _lead(self, path, dataset, request, overwrite, replace_mismatched, progress, repair, wait) -> ExtractResult:
        with ExitStack() as stack:
            try:
                writer, lock = None, None
                if self.needs_writing(path, dataset, request, overwrite, replace_mismatched, repair):
                    lock = stack.enter_context(WriterLock(path, self.storage_options, wait=wait))
                    writer = self.open_writer(path, dataset, request, overwrite, replace_mismatched, repair)
            except UserError as err:
                self.group.broadcast({"error": str(err)})
                raise
            pending = writer.pending_shards() if writer is not None else []
            self.group.broadcast({"pending": pending, "holder": lock.holder if lock else None})
            if not pending:
                return ExtractResult(path, len(dataset), 0, 0.0, 0, 0)
            own = self._extract(writer, dataset, pending, lock, progress, record=True)
            results = self.group.all_gather(own)
            unrecorded = {}
            for result in results[1:]:
                add_unrecorded(unrecorded, result.unrecorded)
            writer.add_work(unrecorded.get("work", {}), unrecorded.get("map_error", {}))
            record_size(writer)
        # The slowest rank's time: the ranks extract side by side (each one's backbone load left out).
        return ExtractResult(path, len(dataset), sum(r.extracted for r in results), max(r.seconds for r in results),
                             sum(r.unet_passes for r in results), sum(r.vae_passes for r in results),
                             sum(r.write_seconds for r in results), sum(r.write_wait_seconds for r in results))

    def _follow(self, path, dataset, request) -> ExtractResult:
        status = self.group.broadcast(None)
        if "error" in status:
            raise RankStopped(f"rank 0 stopped: {status['error']}")
        if not status["pending"]:
            return ExtractResult(path, len(dataset), 0, 0.0, 0, 0)
        writer = CacheWriter.reopen(path, request, self.storage_options, "r+")
        # Rank 0 holds the claim; on an object store every shard checks it is still rank 0's.
        claim = WriterLock(path, self.storage_options)
        claim.holder = status["holder"]
        own = self._extract(writer, dataset, status["pending"], claim, progress=False, record=False)
        self.group.all_gather(own)
        return own

    def _extract(self, writer, dataset, pending, lock, progress, record) -> ExtractResult:
        mine = self.ranks.share(pending)
        if not mine:
            log.info("rank %d of %d: no shard of %s left to it (%d pending)", self.ranks.rank, self.ranks.world,
                     writer.path, len(pending))
            return ExtractResult(writer.path, writer.plan.num_samples, 0, 0.0, 0, 0)
        return _run(self.cfg, dataset, self.extractor, writer, progress, lock, mine, record)


def strip_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N``: what each launched rank is given."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``python -m cli <argv>`` as ``nproc`` ranks on this machine through torchrun's launcher
    (no shell); returns the exit status of the first rank that failed, or 0."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun gives every rank one thread when unset; on a CPU that leaves the other cores idle.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // nproc)))
    args = parse_args(["--standalone", "--nproc_per_node", str(nproc), "--module", "cli", *argv])
    try:
        run(args)
    except ChildFailedError as err:
        first = err.get_first_failure()[1]
        code = first.exitcode
        return code if isinstance(code, int) and code > 0 else 1
    return 0
