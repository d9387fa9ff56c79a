"""How the backends' checkpoint saves are planned with torch.distributed.checkpoint (DCP), so that what rank 0
does per save stays the same from 8 ranks to 512 once the first save is made.

DCP plans every save collectively: each rank sends the coordinator (rank 0) its write items, one per tensor
shard, and rank 0 deduplicates them, builds the checkpoint's metadata and sends each rank its final plan. With
FSDP2 every rank holds a shard of every tensor: for Llama-2-70B's weights and Adam moments that is ~2,900 items
per rank, ~1.5 million on rank 0 at 512 ranks, pickled, gathered and planned at every save although nothing in
them changes while the state's structure stays the same. `CachingSavePlanner` turns DCP's own plan caching on
(DefaultSavePlanner's `enable_plan_caching`): from the second save on, a rank whose plan is unchanged sends an
empty one and rank 0 reuses the global plan and metadata it cached. DCP keeps these caches in class-level
dicts keyed by a name; each save stream (a backend) has a key of its own (`new_cache_key`), so two runs in one
process (tests, benchmarks) never share plans, and drops its entries when done (`drop_cache`). A state whose
structure changed is planned again (DCP compares each rank's plan with its cached one).

What rank 0 still does in proportion to the ranks, because DCP's format needs it: it gathers every rank's
write results (where each shard lies in which file) and writes them into the metadata file. DCP then
broadcasts that metadata object to every rank, which nothing here reads: `LeanMetadataWriter` writes it and
then empties the object DCP broadcasts (a copy, `CachingSavePlanner.create_global_plan`: the cached one stays
whole), so no rank unpickles millions of entries in its background thread while it trains.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import List, Tuple

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner

# DCP's class-level plan caches (torch.distributed.checkpoint.planner.SavePlanner)
_CACHES = (
    "_cached_save_plan",
    "_cached_final_save_plan",
    "_cached_all_plans",
    "_cached_global_plan",
    "_cached_metadata",
)


def new_cache_key() -> str:
    """A key for one save stream's cached plans, unique in this process (each rank draws its own: DCP's caches
    are per process and the key never leaves it)."""
    return f"lemur-save-{uuid.uuid4().hex}"


def drop_cache(key: str) -> None:
    """Free what DCP cached under `key` (on rank 0, every rank's plans)."""
    for name in _CACHES:
        getattr(SavePlanner, name, {}).pop(key, None)


class CachingSavePlanner(DefaultSavePlanner):
    """DCP's default save planner with its plan caching on, under `key`."""

    def __init__(self, key: str):
        super().__init__(enable_plan_caching=True)
        self._cached_plans_key = key

    def create_global_plan(self, all_plans: List[SavePlan]) -> Tuple[List[SavePlan], Metadata]:
        plans, metadata = super().create_global_plan(all_plans)
        # a copy of the (possibly cached) metadata: LeanMetadataWriter empties the one it was given once written
        return plans, dataclasses.replace(metadata)


class LeanMetadataWriter(FileSystemWriter):
    """DCP's file system writer (the one `checkpoint_id=path` chooses, with its defaults: one file per rank,
    each fsynced) whose coordinator, once the metadata file is written, empties the object DCP goes on to
    broadcast to every rank. Use with CachingSavePlanner only, which hands it a copy."""

    def finish(self, metadata: Metadata, results) -> None:
        super().finish(metadata, results)
        metadata.state_dict_metadata, metadata.storage_data, metadata.planner_data = {}, {}, {}
