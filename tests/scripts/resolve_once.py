"""One process of tests/test_checkpoint.py::test_pretrained_is_fetched_once_per_node: resolve a hub id with
this process's HF_HUB_CACHE, online, where the hub is a local folder. The stand-in for huggingface_hub's download
takes a second, copies the folder into the cache as a download does and appends one line to
<cache>/downloads.log; the cache look-ups (local_files_only) are huggingface_hub's own.

usage: resolve_once.py HUB_FOLDER REPO_ID   (prints the folder resolve_pretrained returned)
"""

import os
import shutil
import sys
import time

import huggingface_hub
from huggingface_hub import constants

real_snapshot_download = huggingface_hub.snapshot_download
hub_folder, repo_id = sys.argv[1], sys.argv[2]


def download(repo, allow_patterns=None, local_files_only=False, **kwargs):
    if local_files_only:
        return real_snapshot_download(repo, allow_patterns=allow_patterns, local_files_only=True, **kwargs)
    cache = constants.HF_HUB_CACHE
    with open(os.path.join(cache, "downloads.log"), "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(1.0)  # a download takes a while: the node's other processes must wait for it, not start their own
    repo_dir = os.path.join(cache, "models--" + repo.replace("/", "--"))
    commit_hash = "0123456789abcdef0123456789abcdef01234567"
    snapshot = os.path.join(repo_dir, "snapshots", commit_hash)
    shutil.copytree(hub_folder, snapshot, dirs_exist_ok=True)
    os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
    with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
        f.write(commit_hash)
    return snapshot


huggingface_hub.snapshot_download = download

from lemur_torch.parallel.fsdp import resolve_pretrained  # noqa: E402

print(resolve_pretrained(repo_id))
