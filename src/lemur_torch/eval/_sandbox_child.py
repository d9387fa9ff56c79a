"""The inside of the sandbox: runs ONE untrusted program. Started by sandbox.py as `python -I [-S] <this file>`
with a scrubbed environment, in a new session, its spec as JSON on stdin. Standard library only: it runs
before (and, with -S, without) site-packages.

Steps, each recorded in the record file the evaluator passed (what the platform allowed):
1. unshare new network, mount and PID namespaces (as root directly; otherwise inside a new user namespace
   when unprivileged user namespaces are allowed);
2. fork: the child is PID 1 of the new PID namespace, so when it ends (or is killed) the kernel kills every
   process it left behind; this launcher kills it at the wall-clock limit, and it dies with this launcher
   (PR_SET_PDEATHSIG) should the evaluator have to kill the launcher;
3. in the child: make every mount read-only except the work folder, mount a /proc that shows only the
   sandbox's processes, set the resource limits, drop to the unprivileged uid given by the evaluator (root
   only; otherwise drop all capabilities), forbid privilege gain (no_new_privs), then exec() the program;
4. the exit code is the spec's `success_code` only when the program ran to its end without an exception.
"""

import ctypes
import json
import os
import resource
import signal
import sys
import traceback

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x1000, 0x4000, 1 << 18
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (added in Linux 5.12)
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SETUP_FAILED = 3  # exit code when the sandbox could not be set up (the launcher's log says why)
TIMED_OUT = 124  # exit code when the wall-clock limit killed the program

libc = ctypes.CDLL(None, use_errno=True)


class MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(rc, what):
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _unshare(flags):
    _check(libc.unshare(ctypes.c_int(flags)), "unshare")


def _mount(src, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def _mount_setattr(path, flags, attr_set=0, attr_clr=0):
    attr = MountAttr(attr_set, attr_clr, 0, 0)
    rc = libc.syscall(
        ctypes.c_long(SYS_MOUNT_SETATTR),
        ctypes.c_int(AT_FDCWD),
        path.encode(),
        ctypes.c_uint(flags),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    _check(rc, f"mount_setattr {path}")


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def enter_namespaces(record):
    """Network + mount + PID namespaces; a user namespace first when not root. Returns the flags obtained."""
    base = CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID
    uid, gid = os.getuid(), os.getgid()
    attempts = [base] if os.geteuid() == 0 else []
    attempts.append(CLONE_NEWUSER | base)
    for flags in attempts:
        try:
            _unshare(flags)
        except OSError as exc:
            record["namespace_error"] = str(exc)
            continue
        if flags & CLONE_NEWUSER:
            # keep our own ids inside (the program sees its usual uid); capabilities are dropped later
            _write("/proc/self/setgroups", "deny")
            _write("/proc/self/uid_map", f"{uid} {uid} 1")
            _write("/proc/self/gid_map", f"{gid} {gid} 1")
        record.pop("namespace_error", None)
        return flags
    return 0


def seal_filesystem(workdir, new_proc, expose, record):
    """Every mount read-only and nosuid; the work folder writable (nodev); our own /proc; the interpreter's
    folders reachable by the sandbox's uid. Best effort, recorded."""
    try:
        _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we do propagates back to the host
        if expose:
            expose_interpreter(expose, record)
        _mount(workdir, workdir, None, MS_BIND | MS_REC)
        _mount_setattr("/", AT_RECURSIVE, attr_set=MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID)  # /dev/null stays usable
        _mount_setattr(workdir, 0, attr_set=MOUNT_ATTR_NODEV, attr_clr=MOUNT_ATTR_RDONLY)
        record["readonly_filesystem"] = True
    except OSError as exc:
        record["readonly_filesystem"] = False
        record["filesystem_error"] = str(exc)
    if new_proc:
        try:
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            record["private_proc"] = True
        except OSError as exc:
            record["private_proc"] = False
            record["proc_error"] = str(exc)


def expose_interpreter(paths, record):
    """Under an unprivileged uid the interpreter's own folders may be out of reach (a Python installed under
    /root, mode 700). Cover each such closed ancestor with an empty tmpfs that holds only those folders
    (bind-mounted back): the program can import the standard library and sees nothing else of that tree."""
    closed = {}
    for path in sorted({os.path.realpath(p) for p in paths if os.path.isdir(p)}):
        parts = path.split("/")
        for i in range(2, len(parts)):
            ancestor = "/".join(parts[:i])
            if not os.stat(ancestor).st_mode & 0o001:  # no search permission for "others"
                closed.setdefault(ancestor, []).append(path)
                break
    for ancestor, inside in closed.items():
        fds = [os.open(p, os.O_PATH | os.O_DIRECTORY) for p in inside]  # still reachable before the cover
        _mount("tmpfs", ancestor, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=64k")
        for path, fd in zip(inside, fds):
            os.makedirs(path, mode=0o755, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
            os.close(fd)
    record["exposed"] = sorted(p for inside in closed.values() for p in inside)


def set_limits(limits):
    mb = 1024 * 1024
    cpu = int(limits["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at the soft limit, SIGKILL one second later
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_mb"] * mb,) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_size_mb"] * mb,) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"],) * 2)
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["processes"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def drop_privileges(uid, record):
    if os.geteuid() == 0 and uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # from root to non-root: the kernel clears every capability
        record["uid"] = uid
    elif os.geteuid() != 0:
        # the capabilities a new user namespace grants its creator: gone, so the mounts stay as sealed
        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [
                ("effective", ctypes.c_uint32),
                ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32),
            ]

        data = (Data * 2)()
        _check(libc.capset(ctypes.byref(Header(0x20080522, 0)), data), "capset")
        record["uid"] = os.getuid()
    else:
        record["uid"] = 0
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(no_new_privs)")


def _readable(path):
    try:
        os.listdir(path)
    except FileNotFoundError:  # a sys.path entry that does not exist (python311.zip) is no problem
        return True
    except NotADirectoryError:
        return os.access(path, os.R_OK)
    except PermissionError:
        return False
    return True


def run_program(spec, record):
    """In the child. Its stdout (fd 1) is the output file and `record_fd` the record file, both opened by the
    evaluator outside the work folder (files opened before unshare do not keep the copied mounts busy)."""
    workdir = spec["workdir"]
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if record["mount_namespace"]:  # never outside our own mount namespace: that would seal the host
        dropping = os.geteuid() == 0 and spec.get("uid") is not None
        seal_filesystem(workdir, record["pid_namespace"], sys.path if dropping else [], record)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    set_limits(spec["limits"])
    drop_privileges(spec.get("uid"), record)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # a credential change clears it: set it again
    unreadable = [p for p in sys.path if not _readable(p)]
    if unreadable:  # every program would fail on its imports: a wrong score, so stop here, loudly
        raise PermissionError(
            f"the interpreter's folders {unreadable} are not readable by the sandbox's uid "
            f"{os.getuid()} and no mount namespace could expose them: use a Python installed "
            f"in a world-readable place, or allow namespaces"
        )
    os.chdir(workdir)
    # the record is the evaluator's proof that the program runs inside a complete sandbox: written last
    with os.fdopen(spec["record_fd"], "w") as f:
        json.dump(record, f)
    os.dup2(1, 2)  # from here on, the launcher's own log is no more: the program's errors go to its output
    sys.argv = ["program.py"]
    program = spec["program"]
    del spec
    try:
        exec(compile(program, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # SystemExit too: a program that exits early has not passed its checks
        try:
            sys.stdout.flush()  # the program's output first, then its traceback last (the reported line)
            traceback.print_exc()
            sys.stderr.flush()
        finally:  # even when the output is what failed (RLIMIT_FSIZE)
            os._exit(1)
    os._exit(SUCCESS)


def main():
    global SUCCESS
    spec = json.loads(sys.stdin.read())
    SUCCESS = spec["success_code"]
    record = {}
    flags = enter_namespaces(record) if spec.get("isolate", True) else 0
    record["network_namespace"] = bool(flags & CLONE_NEWNET)
    record["mount_namespace"] = bool(flags & CLONE_NEWNS)
    record["pid_namespace"] = bool(flags & CLONE_NEWPID)
    record["user_namespace"] = bool(flags & CLONE_NEWUSER)
    pid = os.fork()  # with CLONE_NEWPID, the child is PID 1 of the new namespace
    if pid == 0:
        try:
            run_program(spec, record)
        except BaseException:  # the launcher's own failure (before the program ran): to the launcher's log
            traceback.print_exc()
        finally:
            os._exit(SETUP_FAILED)
    # the wall-clock limit is enforced here, so that this launcher reaps the program's PID 1 itself (killed
    # from outside, the orphan would wait for the host's init to reap it)
    timed_out = []

    def on_alarm(signum, frame):
        timed_out.append(True)
        os.kill(pid, signal.SIGKILL)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, spec["timeout_s"])
    _, status = os.waitpid(pid, 0)  # retried after the handler ran (PEP 475)
    if timed_out:
        os._exit(TIMED_OUT)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


if __name__ == "__main__":
    main()
