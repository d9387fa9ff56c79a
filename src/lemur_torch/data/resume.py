"""The loader state's identity and consistency: what a saved data position means, and whether this run may
continue it.

A state carries a fingerprint of everything that gives positions their meaning - the state version, lanes,
seq_len, seed, weights, the tokenizer, and per source its kind, path, files (names and sizes), text field,
shuffle and held-out fraction (`Source.fingerprint`) - and a run refuses a state whose fingerprint differs,
naming the setting, unless `data.resume_stream` is `restart` (loader.py). Without torch.distributed (ranks
simulated in one process, as the tests do), the ranks' `local_state_dict()`s combine with `merge_states`.
"""

from __future__ import annotations

import hashlib
from typing import Dict, List, Sequence, Tuple

from lemur_torch.data.sources.base import Source
from lemur_torch.errors import DataConfigError

# 2: lanes read contiguous shares and positions are seekable reader positions (1: strided record indices)
STATE_VERSION = 2


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


def stream_fingerprint(
    seq_len: int, lanes: int, seed: int, sources: Sequence[Source], weights: Sequence[int], tokenizer_id: str
) -> Dict[str, object]:
    """The flat dict of settings a state's positions depend on (saved in the state, compared on load)."""
    fp: Dict[str, object] = {
        "version": STATE_VERSION,
        "seq_len": seq_len,
        "lanes": lanes,
        "seed": seed,
        "sources": [s.name for s in sources],
        "weights": list(weights),
        "tokenizer": tokenizer_id,
    }
    for src in sources:
        for key, value in src.fingerprint().items():
            fp[f"sources.{src.name}.{key}"] = value
    return fp


def expected_lane_rows(rows: int, lanes: int) -> List[int]:
    """Rows of each lane among global rows 0..rows-1 (rows g < G with g = lane (mod L))."""
    return [max(0, -(-(rows - lane) // lanes)) for lane in range(lanes)]


def check_state(state: dict, fingerprint: Dict[str, object], lanes: int) -> Tuple[int, Dict[int, dict]]:
    """(global rows consumed, lane states) of a saved state this run can continue; DataConfigError naming the
    setting otherwise."""
    if state.get("version") != STATE_VERSION:
        raise DataConfigError(
            f"data loader state has version {state.get('version')!r}, this loader reads version "
            f"{STATE_VERSION} (lanes "
            "now read contiguous shares with seekable positions): set data.resume_stream=restart to resume "
            "the model "
            "and optimizer with the data stream from its beginning, or resume with the lemur-torch version "
            "that wrote it"
        )
    for key, value in fingerprint.items():
        if state.get(key) != value:
            raise DataConfigError(
                f"data loader state was saved with {key}={state.get(key)!r} but this run has {key}={value!r}; the "
                "saved positions would mean other data: restore that setting, or set data.resume_stream=restart to "
                "resume the model and optimizer and start this data stream from its beginning"
            )
    rows = int(state["rows"])
    lane_states = {int(k): v for k, v in state["lane_states"].items()}
    for lane, expected in enumerate(expected_lane_rows(rows, lanes)):
        got = lane_states.get(lane, {}).get("m", 0)
        if got != expected:
            raise DataConfigError(
                f"data loader state is inconsistent: lane {lane} is at row {got} but {rows} global rows "
                f"imply {expected}; "
                "is it one simulated rank's local_state_dict() without merge_states?"
            )
    return rows, lane_states


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
