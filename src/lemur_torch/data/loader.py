"""The packed code/text mixture loader: per-rank sharding, workers, the lanes' positions (gathered at saves
only) and exact resume (the loader contract is in lemur_torch/batch.py; the rows themselves come from
stream.py, the state's identity checks from resume.py).

The global stream (independent of the world size) is a sequence of packed rows g = 0, 1, 2, ...:
- row g comes from source `schedule.source_at(g)` (mixture.py: token ratio within 2 rows of exact at every
  prefix, arithmetic in g);
- row g belongs to lane l = g mod L (L = `data.lanes`, fixed for a run); each lane has one packer per source
  that reads that lane's share of the source in each epoch (a contiguous part of its bytes or rows, or every
  L-th document of a one-document-per-file source; data/sources/) and cuts it into rows (packing.py); row g is
  the next row of packer (l, source_at(g)).
So every row is a deterministic function of (seed, config, data, g), and a lane's position is a few integers
that its readers seek to: resuming late in a run costs what resuming at its start costs.

Who reads what: a micro-step takes the next micro_batch_size * dp_size rows of the global stream; rank r takes
every dp_size-th of them (global rows G0 + r + dp_size*j for its local rows j = 0, 1, ..., where G0 is the
row the iteration started from), and within a rank, local row j is made by worker j mod num_workers (the order
torch's DataLoader returns items in). A worker therefore owns the rows g == c (mod dp_size*workers), which fall
in lanes l == c (mod gcd(dp_size*workers, L)): when dp_size*workers divides L (choose L so: e.g. 12 covers
1, 2, 3, 4, 6 readers) every lane is read by exactly one worker and nobody tokenizes anything twice; otherwise
a worker also runs the rows of its lanes that other workers own, and drops them (correct, just slower).

State: the number of global rows consumed G and every lane's packer positions (a few integers per lane and
source). A rank only makes the rows of its own lanes and keeps their positions to itself: iterating involves no
communication at all. `state_dict()` collects them: one all_gather_object of the ranks' `local_state_dict()`s
on a gloo group of the loader's own (CPU only, created when the loader is built; no GPU sync), merged by
`merge_states` (resume.py). It is a collective - every data-parallel rank calls it at the same point, as the
checkpointer does at every save - and its result is identical on every rank and says nothing about the world
size. `load_state_dict` on any number of ranks and workers continues the global stream at row G. Without
torch.distributed (ranks simulated in one process, as the tests do), combine the ranks' `local_state_dict()`s
with `merge_states` yourself.

The state carries a fingerprint of everything that gives positions their meaning - lanes, seq_len, seed,
weights, the tokenizer, and per source its kind, path, files (names and sizes), text field, shuffle and held-out
fraction (resume.py) - and `load_state_dict` refuses a state whose fingerprint differs, naming the setting,
unless `data.resume_stream` is `restart` (the model and optimizer resume; the data stream starts at its
beginning).

Start-up and failures: the sources' file listings are resolved once, on rank 0, and broadcast on the
loader's gloo group (config errors then fail on every rank alike). A reader that fails for good mid-run (a
`DataReadError` after retries, or bad input in strict mode) - in a DataLoader worker, its prefetch thread or
inline - hands the failure on as an item, and the loader raises it on its own rank. The other ranks learn of it
from the trainer's per-step agreement, taken before any collective of the step (lemur_torch/trainer.py): every
rank stops at the same step, the last completed one is checkpointed (`mark`/`rewind`) and every rank raises the
failure with its message.
"""

from __future__ import annotations

import logging
import math
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from lemur_torch.batch import document_lengths
from lemur_torch.data.encode import Tokenize
from lemur_torch.data.mixture import Schedule
from lemur_torch.data.packing import Packer
from lemur_torch.data.resume import check_state, merge_states, stream_fingerprint, tokenizer_identity
from lemur_torch.data.schema import DataConfig, SourceConfig
from lemur_torch.data.sources.base import Source
from lemur_torch.data.sources.factory import build_source, holdout_fraction
from lemur_torch.data.sources.listing import resolve_listing
from lemur_torch.data.sources.records import REASONS
from lemur_torch.data.storage import Storage, io_counters
from lemur_torch.data.stream import ReadFailure, RowStream, end_workers_at_exit, ignore_stop_signals, take_rows
from lemur_torch.errors import DataConfigError

RESUME_STREAM = ("exact", "restart")

log = logging.getLogger("lemur_torch.data")


class PackedMixtureLoader:
    """Micro-batches of packed rows from a token-ratio mixture of sources; see the module docstring.

    The chat loader (chat_loader.py) is this loader with other records and rows: it overrides `build_source`,
    `make_tokenize`, `packer_cls` and `reasons`, and keeps the schedule, lanes, workers and resume as they are.
    """

    packer_cls = Packer
    reasons = REASONS  # skip reasons broken down in stats()

    def __init__(
        self, cfg: DataConfig, tokenizer, seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int
    ):
        if seq_len < 2 or micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise DataConfigError(
                f"build_loader: need seq_len >= 2, micro_batch_size >= 1 and 0 <= dp_rank < dp_size; "
                f"got {seq_len}, {micro_batch_size}, {dp_rank}, {dp_size}"
            )
        if not cfg.sources:
            raise DataConfigError("data.sources is empty: configure at least one source")
        self.seq_len, self.micro_batch_size = int(seq_len), int(micro_batch_size)
        self.dp_rank, self.dp_size, self.seed = int(dp_rank), int(dp_size), int(seed)
        self.tokenizer = tokenizer
        self.lanes, self.num_workers, self.read_chars = cfg.lanes, cfg.num_workers, cfg.read_chars
        self.prefetch_threads, self.strict, self.log_bad = cfg.prefetch_threads, cfg.strict, cfg.log_bad_records
        self.attend_across_documents = cfg.attend_across_documents
        if self.lanes < 1 or self.num_workers < 0 or self.read_chars < 1:
            raise DataConfigError(
                f"data.lanes >= 1, data.num_workers >= 0, data.read_chars >= 1; got {self.lanes}, "
                f"{self.num_workers}, {self.read_chars}"
            )
        self.resume_stream = str(cfg.resume_stream)
        if self.resume_stream not in RESUME_STREAM:
            raise DataConfigError(
                f"data.resume_stream={self.resume_stream!r}: use exact (continue the saved stream) or restart"
            )
        self.storage = Storage(cfg.io_retries, cfg.io_backoff_s, cfg.io_max_backoff_s)
        self.tokenizer_id = tokenizer_identity(tokenizer)

        self._group = self._state_group()
        listings = self._shared_listings(cfg)
        self.sources: List[Source] = [
            self.build_source(str(name), scfg, listings.get(str(name))) for name, scfg in cfg.sources.items()
        ]
        for src, scfg in zip(self.sources, cfg.sources.values()):
            src.set_holdout(*holdout_fraction(src.name, scfg, cfg))  # before any share is laid out
            src.check_lanes(self.lanes)
        self.schedule = Schedule([s.name for s in self.sources], [s.weight for s in self.sources], self.lanes)
        self.domain_names: List[str] = sorted({s.domain for s in self.sources})
        self._domain_of = [self.domain_names.index(s.domain) for s in self.sources]
        readers = self.dp_size * max(1, self.num_workers)
        if self.lanes % readers and self.dp_rank == 0:
            log.warning(
                "data.lanes=%d is not a multiple of data-parallel ranks x workers = %d: readers share lanes and each "
                "tokenizes rows it then drops (the stream is still exact, just up to %dx slower); pick lanes = k x %d",
                self.lanes,
                readers,
                readers // math.gcd(readers, self.lanes),
                readers,
            )
        self._rows = 0  # global rows consumed
        self._stream_start = 0  # the global row this rank's current stream started from
        self._lane_states: Dict[int, dict] = {}  # this rank's lanes (and, after a resume, every lane's start)

    def build_source(self, name: str, scfg: SourceConfig, listing=None) -> Source:
        return build_source(name, scfg, self.seed, listing, self.storage)

    def text_column(self, scfg: SourceConfig) -> Optional[str]:
        """The parquet column a source reads (None: every column, as conversations need)."""
        return scfg.text_field

    def _shared_listings(self, cfg: DataConfig) -> dict:
        """Every source's file listing, resolved on rank 0 only and broadcast (one listing, not one per rank)."""
        listings, error = {}, None
        retries0 = io_counters()[1]
        if self._group is None or self.dp_rank == 0:
            try:
                for name, scfg in cfg.sources.items():
                    listings[str(name)] = resolve_listing(str(name), scfg, self.text_column(scfg), self.storage)
            except DataConfigError as exc:
                error = exc
        self._listing_retries = io_counters()[1] - retries0
        if self._group is not None:
            box = [listings, error]
            dist.broadcast_object_list(box, src=0, group=self._group)
            listings, error = box
        if error is not None:
            raise error
        return listings

    def describe(self) -> List[str]:
        """Start-up lines, one per source: files, bytes, lanes per file or files per lane, read amplification."""
        lines = []
        for src in self.sources:
            line, amp = src.describe(self.lanes)
            lines.append(line)
            if amp > 1.5 and self.dp_rank == 0:
                log.warning("%s", line)
        return lines

    def make_tokenize(self):
        """A picklable factory (it travels to DataLoader workers): tokenizer -> the packers' tokenizer."""
        return Tokenize

    # -- iteration ----------------------------------------------------------------------------------------

    def _stream(self):
        self._stream_start = self._rows
        ds = RowStream(
            self.sources,
            self.schedule,
            self._domain_of,
            self.tokenizer,
            self.seq_len,
            self.lanes,
            self.read_chars,
            self.attend_across_documents,
            self.strict,
            self.log_bad,
            self._rows,
            self.dp_rank,
            self.dp_size,
            self.num_workers,
            dict(self._lane_states),
            self.prefetch_threads,
            self.packer_cls,
            self.make_tokenize(),
        )
        if self.num_workers == 0:
            return iter(ds)
        # batch_size=None: workers hand over single rows, which the DataLoader returns round-robin over workers
        loader = DataLoader(
            ds,
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=4,
            worker_init_fn=ignore_stop_signals,  # the trainer owns the shutdown
        )
        return end_workers_at_exit(iter(loader))  # they ignore SIGTERM, which is how multiprocessing ends them

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        rows = self._stream()
        B = self.micro_batch_size
        while True:
            items = take_rows(rows, B)
            self._advance(items)
            batch = self.collate(torch.stack([it[0] for it in items]), [it[1] for it in items])
            self._rows += B * self.dp_size
            yield batch

    def collate(self, rows: torch.Tensor, domains: Sequence[int]) -> Dict[str, torch.Tensor]:
        """[B, 3, S] rows (input_ids, labels, position_ids) and a domain id per row -> the batch contract's dict,
        document boundaries included (also how validation batches are made, lemur_torch/validation.py)."""
        domain_ids = torch.tensor(list(domains), dtype=torch.long)
        return {
            "input_ids": rows[:, 0].contiguous(),
            "labels": rows[:, 1].contiguous(),
            "position_ids": rows[:, 2].contiguous(),
            "domain_ids": domain_ids[:, None].expand(rows.shape[0], rows.shape[2]).contiguous(),
            "doc_lens": document_lengths(rows[:, 2]),  # the attention kernels' boundaries
        }

    def gather(self, obj) -> list:
        """A small picklable `obj` from every data-parallel rank, in rank order, over the loader's CPU group (no GPU
        sync); every rank calls it at the same point. Without torch.distributed: [obj]."""
        if self._group is None:
            return [obj]
        out: List[object] = [None] * self.dp_size
        dist.all_gather_object(out, obj, group=self._group)
        return out

    def _advance(self, items: list) -> None:
        """Record the new positions of this rank's lanes; raise a reader's failure (on this rank only)."""
        failure = next((it for it in items if isinstance(it, ReadFailure)), None)
        if failure is not None:
            raise failure.error()
        for _, _, lane, state in items:  # the most advanced copy of a lane wins (lanes shared by workers)
            if lane not in self._lane_states or state["m"] > self._lane_states[lane]["m"]:
                self._lane_states[lane] = state

    def __len__(self):  # an endless stream: sources cycle with an epoch counter
        raise TypeError("the packed mixture is endless; count optimizer steps instead")

    # -- state --------------------------------------------------------------------------------------------

    def fingerprint(self) -> dict:
        """What this loader's positions mean (resume.py): saved in the state, compared when loading one."""
        return stream_fingerprint(
            self.seq_len, self.lanes, self.seed, self.sources, self.schedule.weights, self.tokenizer_id
        )

    def mark(self) -> Tuple[int, Dict[int, dict]]:
        """The current position (cheap: lane states are replaced, never changed in place); see `rewind`."""
        return self._rows, dict(self._lane_states)

    def rewind(self, mark: Tuple[int, Dict[int, dict]]) -> None:
        """Back to a `mark()`: the trainer checkpoints the last completed step after a failed read mid-step."""
        self._rows, self._lane_states = mark[0], dict(mark[1])

    def local_state_dict(self) -> dict:
        """This rank's view: global rows consumed and the lanes it has read, or loaded (no communication)."""
        return {
            **self.fingerprint(),
            "rows": self._rows,
            "lane_states": {k: v for k, v in sorted(self._lane_states.items())},
        }

    def state_dict(self) -> dict:
        """Identical on every rank and independent of the world size: a collective, one gather of the ranks'
        lane positions (see the module docstring)."""
        if self.dp_size > 1 and self._group is None:
            raise RuntimeError(
                f"loader.state_dict() with dp_size={self.dp_size} gathers the lanes' positions over "
                "torch.distributed, which was "
                "not initialized when the loader was built; simulated ranks: merge_states([l.local_state_dict() ...])"
            )
        return merge_states(self.gather(self.local_state_dict()))

    def _state_group(self):
        if self.dp_size == 1:
            return None
        if not (dist.is_available() and dist.is_initialized()):
            return None
        if dist.get_world_size() != self.dp_size:
            raise DataConfigError(
                f"build_loader: dp_size={self.dp_size} but torch.distributed has {dist.get_world_size()} ranks; "
                "the loader's "
                "state assumes every rank is a data-parallel rank"
            )
        # a CPU group of our own: the loader's gathers never touch the (possibly NCCL) training group or sync a
        # GPU. new_group is collective: build_loader runs on every rank at the same point.
        return dist.new_group(backend="gloo")

    def load_state_dict(self, state: dict) -> None:
        if self.resume_stream == "restart":
            log.warning(
                "data.resume_stream=restart: the checkpoint's data position (row %s) is not used; this data stream "
                "starts at its beginning",
                state.get("rows"),
            )
            self._rows, self._stream_start, self._lane_states = 0, 0, {}
            return
        self._rows, self._lane_states = check_state(state, self.fingerprint(), self.lanes)
        self._stream_start = self._rows

    # -- metrics ------------------------------------------------------------------------------------------

    def own_lane_states(self) -> List[dict]:
        """The positions of the lanes this rank reads: those g = start + dp_rank (mod dp_size) falls in, i.e. the
        lanes congruent to start + dp_rank modulo gcd(dp_size, lanes); every lane on one rank."""
        period = math.gcd(self.dp_size, self.lanes)
        first = (self._stream_start + self.dp_rank) % period
        return [state for lane, state in self._lane_states.items() if lane % period == first]

    def stats(self) -> Dict[str, float]:
        """Rows, tokens and the token fraction per domain of the global stream (arithmetic on the row count);
        the rest (skipped records, epochs, bytes read, retries) counted over this rank's lanes: a rank's share,
        which the trainer logs from rank 0, with no communication."""
        out: Dict[str, float] = {"rows": float(self._rows), "tokens": float(self._rows * self.seq_len)}
        rows = self.schedule.rows_before(self._rows)
        for d, name in enumerate(self.domain_names):
            n = sum(c for c, dom in zip(rows, self._domain_of) if dom == d)
            out[f"token_frac/{name}"] = n / self._rows if self._rows else 0.0
        own = self.own_lane_states()
        for src in self.sources:
            states = [ls["src"][src.name] for ls in own if src.name in ls["src"]]
            out[f"skipped/{src.name}"] = float(sum(sum(st["skipped"].values()) for st in states))
            for reason in self.reasons:
                n = sum(st["skipped"].get(reason, 0) for st in states)
                if n:
                    out[f"skipped/{src.name}/{reason}"] = float(n)
            out[f"epoch/{src.name}"] = float(max((st["epoch"] for st in states), default=0))
            out[f"read_bytes/{src.name}"] = float(sum(st.get("io", {}).get("bytes", 0) for st in states))
            out[f"io_retries/{src.name}"] = float(sum(st.get("io", {}).get("retries", 0) for st in states))
        out["io_retries"] = self._listing_retries + sum(v for k, v in out.items() if k.startswith("io_retries/"))
        return out
