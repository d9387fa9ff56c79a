"""Per-rank sharding, workers and exact resume of the packed code/text mixture (the loader contract is in
lemur_torch/batch.py).

The global stream (independent of the world size) is a sequence of packed rows g = 0, 1, 2, ...:
- row g comes from source `schedule.source_at(g)` (mixture.py: token ratio within 2 rows of exact at every
  prefix, arithmetic in g);
- row g belongs to lane l = g mod L (L = `data.lanes`, fixed for a run); each lane has one packer per source
  that reads that lane's share of the source in each epoch (a contiguous part of its bytes or rows, or every
  L-th document of a one-document-per-file source; sources.py) and cuts it into rows (packing.py); row g is the
  next row of packer (l, source_at(g)).
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
source). A rank only makes the rows of its own lanes, so after each micro-batch the ranks exchange the new
positions of the lanes they used (one small all_gather_object on a gloo group of their own, CPU only, created
when the loader is built; no GPU sync). Every rank thus holds every lane's position: `state_dict()` needs no
communication (the trainer may call it on rank 0 alone), is identical on every rank and says nothing about the
world size. `load_state_dict` on any number of ranks and workers continues the global stream at row G.
Without torch.distributed (ranks simulated in one process, as the tests do), combine the ranks'
`local_state_dict()`s with `merge_states`.

The state carries a fingerprint of everything that gives positions their meaning - lanes, seq_len, seed,
weights, the tokenizer, and per source its kind, path, files (names and sizes), text field, shuffle and held-out
fraction - and
`load_state_dict` refuses a state whose fingerprint differs, naming the setting, unless `data.resume_stream`
is `restart` (the model and optimizer resume; the data stream starts at its beginning).

Start-up and failures: the sources' file listings are resolved once, on rank 0, and broadcast on the
loader's gloo group (config errors then fail on every rank alike). A reader that fails for good mid-run (a
`DataReadError` after retries, or bad input in strict mode) - in a DataLoader worker, its prefetch thread or
inline - hands the failure on as an item; the micro-batch's lane exchange tells every rank, and every rank
raises it at the same micro-batch, so none is left waiting in a collective. The trainer then checkpoints the
last completed step (`mark`/`rewind`) and stops.
"""

from __future__ import annotations

import hashlib
import logging
import math
import sys
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lemur_torch.batch import document_lengths
from lemur_torch.data.mixture import Schedule
from lemur_torch.data.packing import BadCounter, Packer, Refiller, Tokenize
from lemur_torch.data.sources import REASONS, Source, build_source, holdout_fraction, resolve_listing
from lemur_torch.data.storage import Storage, io_counters
from lemur_torch.errors import BadInputError, DataConfigError, DataReadError

# 2: lanes read contiguous shares and positions are seekable reader positions (1: strided record indices)
STATE_VERSION = 2
RESUME_STREAM = ("exact", "restart")
_FAILURES = {"DataReadError": DataReadError, "BadInputError": BadInputError}


class _Failure:
    """A reader's permanent failure, handed on as a stream item (crosses worker processes and threads intact)."""

    def __init__(self, kind: str, message: str):
        self.kind, self.message = kind, message

    def error(self) -> Exception:
        return _FAILURES[self.kind](self.message)


log = logging.getLogger("lemur_torch.data")


class _Lane:
    def __init__(self, lane: int, ctx: "_RowStream", state: Optional[dict]):
        self.lane, self.ctx = lane, ctx
        state = state or {}
        self.m: int = state.get("m", 0)  # rows this lane has produced = its rows below the current global row
        self._initial = dict(state.get("src", {}))
        self.packers: Dict[int, Packer] = {}

    def next_row(self):
        ctx = self.ctx
        s = ctx.schedule.source_at(self.lane + ctx.lanes * self.m)
        packer = self.packers.get(s)
        if packer is None:
            src = ctx.sources[s]
            # read-ahead in proportion to the source's share of rows: every packer's chunk then lasts about as long,
            # and a small source does not hold (or, at the end of a run, waste) as much tokenized text as a big one.
            # A quarter of the lane's read_chars: the Refiller gathers several packers' chunks into each tokenizer
            # call of read_chars, so small chunks keep the read-ahead small without shrinking the batches
            chunk = max(16384, ctx.read_chars * ctx.schedule.weights[s] // ctx.schedule.period // 4)
            packer = ctx.packer_cls(
                src,
                self.lane,
                ctx.lanes,
                ctx.seq_len,
                ctx.tokenize,
                ctx.bad,
                chunk,
                self._initial.get(src.name),
                ctx.refiller,
            )
            self.packers[s] = packer
        row = packer.next_row(ctx.attend_across_documents)
        self.m += 1
        return s, row

    def state(self) -> dict:
        src = dict(self._initial)
        for s, p in self.packers.items():
            src[self.ctx.sources[s].name] = p.state()
        return {"m": self.m, "src": src}


class _RowStream(IterableDataset):
    """The rows of one rank from global row `start` on; in a DataLoader worker, that worker's share of them."""

    def __init__(
        self,
        sources,
        schedule,
        domain_of,
        tokenizer,
        seq_len,
        lanes,
        read_chars,
        attend_across_documents,
        strict,
        log_bad,
        start,
        dp_rank,
        dp_size,
        num_workers,
        lane_states,
        prefetch_threads=0,
        packer_cls=Packer,
        make_tokenize=Tokenize,
    ):
        self.sources, self.schedule, self.domain_of = sources, schedule, domain_of
        self.tokenizer, self.seq_len, self.lanes, self.read_chars = tokenizer, seq_len, lanes, read_chars
        self.attend_across_documents, self.strict, self.log_bad = attend_across_documents, strict, log_bad
        self.start, self.dp_rank, self.dp_size, self.num_workers = start, dp_rank, dp_size, max(1, num_workers)
        self.lane_states = lane_states
        self.prefetch_threads = prefetch_threads
        self.packer_cls, self.make_tokenize = packer_cls, make_tokenize

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        self.tokenize = self.make_tokenize(self.tokenizer)
        self.bad = BadCounter(self.strict, self.log_bad)
        self.pool = None
        if self.prefetch_threads > 0:
            from concurrent.futures import ThreadPoolExecutor

            # prefetch_threads > 0 means "read ahead in the background", 0 means inline. Two reads in flight
            # (Refiller): each is one batched tokenizer call over the cores, and the second keeps them busy
            # while the first finishes its longest document or converts its ids
            self.pool = ThreadPoolExecutor(2, thread_name_prefix="lemur-data")
        self.refiller = Refiller(self.tokenize, self.pool, depth=2, batch_chars=self.read_chars)
        stride = self.dp_size * self.num_workers
        lanes: Dict[int, _Lane] = {}
        g = self.start + self.dp_rank + self.dp_size * worker
        finalizing = sys.is_finalizing  # held by the frame: module globals are gone when it runs at exit
        try:
            while True:
                lane_id, m = g % self.lanes, g // self.lanes
                try:
                    lane = lanes.get(lane_id)
                    if lane is None:
                        lane = lanes[lane_id] = _Lane(lane_id, self, self.lane_states.get(lane_id))
                    while lane.m < m:  # rows of a shared lane that other workers own: made, then dropped
                        lane.next_row()
                    s, (ids, labels, pos) = lane.next_row()
                except (DataReadError, BadInputError) as exc:
                    yield _Failure(type(exc).__name__, str(exc))
                    return
                row = torch.stack([torch.from_numpy(ids), torch.from_numpy(labels), torch.from_numpy(pos)])
                yield row, self.domain_of[s], lane_id, lane.state()
                g += stride
        finally:
            # An iterator still referenced at interpreter exit is finalized after concurrent.futures has stopped
            # and joined its workers (threading's atexit hook); shutdown() would then only trip over torn-down
            # module globals (AttributeError: 'NoneType' object has no attribute 'Empty'), with nothing to stop
            if self.pool is not None and not finalizing():
                self.pool.shutdown(wait=False, cancel_futures=True)


def _take(rows, n: int) -> list:
    """The next n items of a row stream, or fewer ending with a reader's failure (after which it has no more)."""
    items = []
    for _ in range(n):
        items.append(next(rows))
        if isinstance(items[-1], _Failure):
            break
    return items


class PackedMixtureLoader:
    """Micro-batches of packed rows from a token-ratio mixture of sources; see the module docstring.

    The chat loader (chat_loader.py) is this loader with other records and rows: it overrides `build_source`,
    `make_tokenize`, `packer_cls` and `reasons`, and keeps the schedule, lanes, workers and resume as they are.
    """

    packer_cls = Packer
    reasons = REASONS  # skip reasons broken down in stats()

    def __init__(self, data_cfg, tokenizer, seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int):
        if seq_len < 2 or micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise DataConfigError(
                f"build_loader: need seq_len >= 2, micro_batch_size >= 1 and 0 <= dp_rank < dp_size; "
                f"got {seq_len}, {micro_batch_size}, {dp_rank}, {dp_size}"
            )
        if not data_cfg.sources:
            raise DataConfigError("data.sources is empty: configure at least one source")
        self.seq_len, self.micro_batch_size = int(seq_len), int(micro_batch_size)
        self.dp_rank, self.dp_size, self.seed = int(dp_rank), int(dp_size), int(seed)
        self.tokenizer = tokenizer
        self.lanes = int(data_cfg.get("lanes", 12))
        self.num_workers = int(data_cfg.get("num_workers", 0))
        self.read_chars = int(data_cfg.get("read_chars", 1 << 18))
        self.prefetch_threads = int(data_cfg.get("prefetch_threads", 1))
        self.strict = bool(data_cfg.get("strict", False))
        self.log_bad = int(data_cfg.get("log_bad_records", 5))
        self.attend_across_documents = bool(data_cfg.get("attend_across_documents", False))
        if self.lanes < 1 or self.num_workers < 0 or self.read_chars < 1:
            raise DataConfigError(
                f"data.lanes >= 1, data.num_workers >= 0, data.read_chars >= 1; got {self.lanes}, "
                f"{self.num_workers}, {self.read_chars}"
            )
        self.resume_stream = str(data_cfg.get("resume_stream", "exact"))
        if self.resume_stream not in RESUME_STREAM:
            raise DataConfigError(
                f"data.resume_stream={self.resume_stream!r}: use exact (continue the saved stream) or restart"
            )
        self.storage = Storage(
            int(data_cfg.get("io_retries", 8)),
            float(data_cfg.get("io_backoff_s", 1.0)),
            float(data_cfg.get("io_max_backoff_s", 60.0)),
        )
        self.tokenizer_id = tokenizer_identity(tokenizer)

        self._group = self._exchange_group()
        listings = self._shared_listings(data_cfg)
        self.sources: List[Source] = [
            self.build_source(str(name), scfg, listings.get(str(name))) for name, scfg in data_cfg.sources.items()
        ]
        for src, scfg in zip(self.sources, data_cfg.sources.values()):
            src.set_holdout(*holdout_fraction(src.name, scfg, data_cfg))  # before any share is laid out
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
        self._lane_states: Dict[int, dict] = {}

    def build_source(self, name: str, scfg, listing=None) -> Source:
        return build_source(name, scfg, self.seed, listing, self.storage)

    def text_column(self, scfg) -> Optional[str]:
        """The parquet column a source reads (None: every column, as conversations need)."""
        return scfg.text_field

    def _shared_listings(self, data_cfg) -> dict:
        """Every source's file listing, resolved on rank 0 only and broadcast (one listing, not one per rank)."""
        listings, error = {}, None
        retries0 = io_counters()[1]
        if self._group is None or self.dp_rank == 0:
            try:
                for name, scfg in data_cfg.sources.items():
                    listings[str(name)] = resolve_listing(str(name), scfg, self.text_column(scfg), self.storage)
            except DataConfigError as exc:
                error = exc
        self._listing_retries = io_counters()[1] - retries0
        if self._group is not None:
            box = [listings, error]
            torch.distributed.broadcast_object_list(box, src=0, group=self._group)
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
        ds = _RowStream(
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
        return iter(DataLoader(ds, batch_size=None, num_workers=self.num_workers, prefetch_factor=4))

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        rows = self._stream()
        B = self.micro_batch_size
        while True:
            items = _take(rows, B)
            self._exchange(items)  # every rank raises here, together, if any rank's reader failed
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
        torch.distributed.all_gather_object(out, obj, group=self._group)
        return out

    def _exchange(self, items: list) -> None:
        """Share the lanes' new positions with every rank (and a reader's failure, if any)."""
        failure = next((it for it in items if isinstance(it, _Failure)), None)
        updates = [] if failure else [(lane, state) for _, _, lane, state in items]
        if self._group is not None:
            gathered: List[Optional[tuple]] = [None] * self.dp_size
            torch.distributed.all_gather_object(gathered, (updates, failure), group=self._group)
            failure = next((f for _, f in gathered if f is not None), None)
            updates = [u for rank_updates, _ in gathered for u in rank_updates]
        if failure is not None:
            raise failure.error()
        for lane, state in updates:  # the most advanced copy of a lane wins (shared lanes)
            if lane not in self._lane_states or state["m"] > self._lane_states[lane]["m"]:
                self._lane_states[lane] = state

    def __len__(self):  # an endless stream: sources cycle with an epoch counter
        raise TypeError("the packed mixture is endless; count optimizer steps instead")

    # -- state --------------------------------------------------------------------------------------------

    def _fingerprint(self) -> dict:
        fp = {
            "version": STATE_VERSION,
            "seq_len": self.seq_len,
            "lanes": self.lanes,
            "seed": self.seed,
            "sources": [s.name for s in self.sources],
            "weights": list(self.schedule.weights),
            "tokenizer": self.tokenizer_id,
        }
        for src in self.sources:
            for key, value in src.fingerprint().items():
                fp[f"sources.{src.name}.{key}"] = value
        return fp

    def mark(self) -> Tuple[int, Dict[int, dict]]:
        """The current position (cheap: lane states are replaced, never changed in place); see `rewind`."""
        return self._rows, dict(self._lane_states)

    def rewind(self, mark: Tuple[int, Dict[int, dict]]) -> None:
        """Back to a `mark()`: the trainer checkpoints the last completed step after a failed read mid-step."""
        self._rows, self._lane_states = mark[0], dict(mark[1])

    def local_state_dict(self) -> dict:
        """This rank's view: global rows consumed and the lanes it has seen (no communication)."""
        return {
            **self._fingerprint(),
            "rows": self._rows,
            "lane_states": {k: v for k, v in sorted(self._lane_states.items())},
        }

    def state_dict(self) -> dict:
        """Identical on every rank and independent of the world size; no communication (see the module doc)."""
        if self.dp_size > 1 and self._group is None:
            raise RuntimeError(
                f"loader.state_dict() with dp_size={self.dp_size} needs the lane exchange over "
                "torch.distributed, which was "
                "not initialized when the loader was built; simulated ranks: merge_states([l.local_state_dict() ...])"
            )
        return self.local_state_dict()

    def _exchange_group(self):
        if self.dp_size == 1:
            return None
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        if dist.get_world_size() != self.dp_size:
            raise DataConfigError(
                f"build_loader: dp_size={self.dp_size} but torch.distributed has {dist.get_world_size()} ranks; "
                "the loader's "
                "lane exchange assumes every rank is a data-parallel rank"
            )
        # a CPU group of our own: the exchange never touches the (possibly NCCL) training group or syncs a GPU.
        # new_group is collective: build_loader runs on every rank at the same point.
        return dist.new_group(backend="gloo")

    def load_state_dict(self, state: dict) -> None:
        if self.resume_stream == "restart":
            log.warning(
                "data.resume_stream=restart: the checkpoint's data position (row %s) is not used; this data stream "
                "starts at its beginning",
                state.get("rows"),
            )
            self._rows, self._lane_states = 0, {}
            return
        if state.get("version") != STATE_VERSION:
            raise DataConfigError(
                f"data loader state has version {state.get('version')!r}, this loader reads version "
                f"{STATE_VERSION} (lanes "
                "now read contiguous shares with seekable positions): set data.resume_stream=restart to resume "
                "the model "
                "and optimizer with the data stream from its beginning, or resume with the lemur-torch version "
                "that wrote it"
            )
        mine = self._fingerprint()
        for key, value in mine.items():
            if state.get(key) != value:
                raise DataConfigError(
                    f"data loader state was saved with {key}={state.get(key)!r} but this run has {key}={value!r}; the "
                    "saved positions would mean other data: restore that setting, or set data.resume_stream=restart to "
                    "resume the model and optimizer and start this data stream from its beginning"
                )
        rows = int(state["rows"])
        lane_states = {int(k): v for k, v in state["lane_states"].items()}
        for lane in range(self.lanes):
            expected = max(0, -(-(rows - lane) // self.lanes))  # rows g < G with g = lane (mod L)
            got = lane_states.get(lane, {}).get("m", 0)
            if got != expected:
                raise DataConfigError(
                    f"data loader state is inconsistent: lane {lane} is at row {got} but {rows} global rows "
                    f"imply {expected}; "
                    "is it one simulated rank's local_state_dict() without merge_states?"
                )
        self._rows, self._lane_states = rows, lane_states

    # -- metrics ------------------------------------------------------------------------------------------

    def stats(self) -> Dict[str, float]:
        out: Dict[str, float] = {"rows": float(self._rows), "tokens": float(self._rows * self.seq_len)}
        rows = self.schedule.rows_before(self._rows)
        for d, name in enumerate(self.domain_names):
            n = sum(c for c, dom in zip(rows, self._domain_of) if dom == d)
            out[f"token_frac/{name}"] = n / self._rows if self._rows else 0.0
        for src in self.sources:
            states = [ls["src"][src.name] for ls in self._lane_states.values() if src.name in ls["src"]]
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


def merge_states(states: Sequence[dict]) -> dict:
    """Combine the local_state_dict()s of all data-parallel ranks (taken at the same step) into the global state."""
    first = states[0]
    lanes: Dict[int, dict] = {}
    for st in states:
        for key in [k for k in first if k != "lane_states"]:
            if st.get(key) != first[key]:
                raise RuntimeError(
                    f"loader states differ in {key!r} across ranks ({st[key]!r} vs {first[key]!r}): not taken at "
                    "the same step"
                )
        for lane, ls in st["lane_states"].items():
            if lane not in lanes or ls["m"] > lanes[lane]["m"]:
                lanes[lane] = ls
    return {**first, "lane_states": {k: lanes[k] for k in sorted(lanes)}}


def build_loader(data_cfg, tokenizer, seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int):
    fmt = data_cfg.get("format", "pretrain")
    if fmt == "chat":
        from lemur_torch.data.chat_loader import ChatLoader

        return ChatLoader(data_cfg, tokenizer, seq_len, micro_batch_size, dp_rank, dp_size, seed)
    if fmt != "pretrain":
        raise DataConfigError(f"data.format={fmt!r}: use pretrain (packed documents) or chat (ChatML conversations)")
    return PackedMixtureLoader(data_cfg, tokenizer, seq_len, micro_batch_size, dp_rank, dp_size, seed)


def tokenizer_identity(tokenizer) -> str:
    """A digest of the tokenizer's vocabulary and rules (a checkpoint's positions are in its tokens)."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        for piece, i in sorted(tokenizer.get_vocab().items()):
            h.update(f"{piece}\0{i}\n".encode())
    h.update(repr((tokenizer.bos_token_id, tokenizer.eos_token_id, len(tokenizer))).encode())
    return f"{type(tokenizer).__name__}/{len(tokenizer)}/{h.hexdigest()[:16]}"


def expected_lane_rows(rows: int, lanes: int) -> List[int]:
    """Rows of each lane among global rows 0..rows-1 (for tests and tooling)."""
    return [max(0, math.ceil((rows - lane) / lanes)) for lane in range(lanes)]
