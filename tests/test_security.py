"""Another user on the same machine, trying the daemon's doors (docs/security.md).

- the lock file: a planted symbolic link, hard link or FIFO is refused and its
  target left alone;
- the socket's directory: the default runtime dir made by another user, or
  with group/other bits, or a symbolic link, is refused; so is an explicit
  ``--socket`` directory that others can write to;
- an impostor socket: a process of another uid serving the socket path gets
  nothing from the client, not even ``initialize``;
- another uid's client is refused by the daemon.

The cases that need a second user create a throwaway one (``useradd``,
removed at the end) when the tests run as root, and skip otherwise.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from assistant import client as client_module
from assistant import paths
from assistant.client import Client, UntrustedDaemon
from assistant.daemon.process import DaemonError, ProcessGuard, acquire_lock
from assistant.testing import run_cli, socket_answers

NO_PRELOAD = "preload: false\nthreads: 2\ncontext: 2048\n"


@pytest.fixture
def scratch():
    """A private directory short enough for socket paths (AF_UNIX allows ~104 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="as-sec-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _fallback_env(tmpdir: Path) -> tuple[dict[str, str], Path]:
    """Env for a daemon with no usable $XDG_RUNTIME_DIR (its socket dir falls back to
    $TMPDIR/assistant-<uid>), and that default socket path."""
    env = {"XDG_RUNTIME_DIR": str(tmpdir / "no-such-dir" / "run"), "TMPDIR": str(tmpdir)}
    return env, tmpdir / f"assistant-{os.getuid()}" / "assistant.sock"


def _refused(d, timeout: float = 30) -> str:
    """The daemon exited at start with status 1; its stderr."""
    code = d.wait(timeout)
    assert code == 1, d.stderr()
    return d.stderr()


# -- the lock file -------------------------------------------------------------------------


def test_lock_file_symlink_is_refused_and_its_target_untouched(scratch):
    victim = scratch / "victim"
    victim.write_text("precious\n")
    lock = scratch / "a.sock.lock"
    lock.symlink_to(victim)
    with pytest.raises(DaemonError, match="symbolic link"):
        acquire_lock(lock)
    assert victim.read_text() == "precious\n"


def test_lock_file_hard_link_is_refused_and_its_target_untouched(scratch):
    victim = scratch / "victim"
    victim.write_text("precious\n")
    os.link(victim, scratch / "a.sock.lock")
    with pytest.raises(DaemonError, match="hard links"):
        acquire_lock(scratch / "a.sock.lock")
    assert victim.read_text() == "precious\n"


def test_lock_file_that_is_not_a_regular_file_is_refused(scratch):
    os.mkfifo(scratch / "a.sock.lock")
    with pytest.raises(DaemonError, match="not a regular file"):
        acquire_lock(scratch / "a.sock.lock")


def test_own_lock_file_is_reused(scratch):
    lock = scratch / "a.sock.lock"
    lock.write_text("12345\n")
    fd = acquire_lock(lock)
    try:
        assert lock.read_text() == f"{os.getpid()}\n"
    finally:
        os.close(fd)


@pytest.mark.slow
def test_daemon_refuses_a_planted_lock_symlink(daemon_factory, scratch):
    victim = scratch / "victim"
    victim.write_text("precious\n")
    (scratch / "a.sock.lock").symlink_to(victim)
    d = daemon_factory(socket_path=scratch / "a.sock", config_text=NO_PRELOAD)
    d.start(wait=False)
    err = _refused(d)
    assert "a.sock.lock" in err and "symbolic link" in err
    assert victim.read_text() == "precious\n"
    assert not (scratch / "a.sock").exists()


# -- the socket's directory -------------------------------------------------------------------


@pytest.fixture
def runtime_home(scratch, monkeypatch):
    """$XDG_RUNTIME_DIR set to a private dir: the default socket dir is <it>/assistant."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(scratch))
    assert paths.runtime_dir() == scratch / "assistant"
    return scratch


@pytest.mark.slow
def test_daemon_refuses_a_default_runtime_dir_with_group_or_other_bits(daemon_factory, scratch):
    env, sock = _fallback_env(scratch)
    sock.parent.mkdir()
    os.chmod(sock.parent, 0o777)
    d = daemon_factory(socket_path=sock, config_text=NO_PRELOAD, env=env)
    d.start(wait=False)
    err = _refused(d)
    assert str(sock.parent) in err and "0777" in err
    assert not sock.exists() and not paths.lock_path(sock).exists()
    assert stat.S_IMODE(os.stat(sock.parent).st_mode) == 0o777  # refused, not adopted by chmod


@pytest.mark.parametrize("mode", [0o750, 0o705, 0o770])
def test_default_runtime_dir_with_any_group_or_other_bit_is_refused(runtime_home, mode):
    rdir = runtime_home / "assistant"
    rdir.mkdir()
    os.chmod(rdir, mode)
    with pytest.raises(DaemonError, match=f"{mode:04o}"):
        ProcessGuard(rdir / "assistant.sock").acquire()
    assert list(rdir.iterdir()) == []


def test_default_runtime_dir_that_is_a_symlink_is_refused(runtime_home):
    elsewhere = runtime_home / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (runtime_home / "assistant").symlink_to(elsewhere)
    with pytest.raises(DaemonError, match="symbolic link"):
        ProcessGuard(runtime_home / "assistant" / "assistant.sock").acquire()
    assert list(elsewhere.iterdir()) == []


def test_default_runtime_dir_is_made_0700_whatever_the_umask(runtime_home):
    old = os.umask(0)
    try:
        guard = ProcessGuard(runtime_home / "assistant" / "assistant.sock")
        guard.acquire()
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.lstat(runtime_home / "assistant").st_mode) == 0o700
        assert stat.S_IMODE(os.lstat(runtime_home / "assistant" / "assistant.sock.lock").st_mode) == 0o600
    finally:
        guard.release()


def test_explicit_socket_dir_writable_by_others_is_refused(scratch):
    shared = scratch / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # no sticky bit: anyone may rename or delete what is in it
    with pytest.raises(DaemonError, match="can be written by"):
        ProcessGuard(shared / "a.sock").acquire()
    below = shared / "mine"
    below.mkdir(mode=0o700)  # ours and private, but its parent lets anyone swap it
    with pytest.raises(DaemonError, match=str(shared)):
        ProcessGuard(below / "a.sock").acquire()


def test_explicit_socket_in_a_sticky_shared_dir_or_a_new_dir_is_accepted(scratch):
    sticky = scratch / "tmp"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)  # like /tmp: others cannot rename or delete our entries
    for sock in (sticky / "a.sock", scratch / "new" / "dir" / "a.sock"):
        guard = ProcessGuard(sock)
        guard.acquire()
        guard.release()
    assert stat.S_IMODE(os.stat(scratch / "new" / "dir").st_mode) == 0o700


# -- the client checks who serves the socket ----------------------------------------------------


async def test_client_refuses_a_socket_served_by_another_uid_before_sending(scratch, monkeypatch):
    """The kernel's answer about the peer is faked here (no second user needed); the
    same check against a real process of another uid runs below when root."""
    received: list[bytes] = []

    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read())  # until the client closes
        writer.close()

    server = await asyncio.start_unix_server(impostor, path=str(scratch / "a.sock"))
    monkeypatch.setattr(client_module, "peer_uid", lambda sock: os.geteuid() + 4242)
    try:
        with pytest.raises(UntrustedDaemon, match=f"uid {os.geteuid() + 4242}") as info:
            await asyncio.wait_for(Client.connect(scratch / "a.sock"), 10)
        assert "nothing was sent" in info.value.message
        for _ in range(100):
            if received:
                break
            await asyncio.sleep(0.05)
        assert received == [b""]
    finally:
        server.close()
        await server.wait_closed()


# -- another user: a throwaway account (root only) ------------------------------------------------


@pytest.fixture(scope="module")
def other_user():
    """A throwaway user (and its group), removed at the end; skips unless root."""
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a throwaway user to play another user on the machine")
    if not (shutil.which("useradd") and shutil.which("userdel")):
        pytest.skip("needs useradd and userdel to create a throwaway user")
    name = f"assec{os.getpid() % 100000}"
    made = subprocess.run(["useradd", "--system", "--no-create-home", "--user-group", "--shell", "/bin/false", name],
                          capture_output=True, text=True, timeout=60)
    if made.returncode != 0:
        pytest.skip(f"cannot create a throwaway user: {made.stderr.strip()}")
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=60)
        subprocess.run(["groupdel", name], capture_output=True, timeout=60)  # if userdel left it


@pytest.fixture(scope="module")
def their_python(other_user):
    """A Python the other user can run (ours may sit under root's private home)."""
    for candidate in dict.fromkeys([sys.executable, shutil.which("python3") or "", "/usr/bin/python3"]):
        try:
            if candidate and as_user(other_user, candidate, "-I", "-S", "-c", "pass").wait(60) == 0:
                return candidate
        except OSError:  # not theirs to execute
            continue
    pytest.skip("no Python interpreter the throwaway user may run")


def as_user(user: pwd.struct_passwd, *cmd: str, stdout=subprocess.DEVNULL) -> subprocess.Popen:
    """Run ``cmd`` as ``user`` (uid, gid, no supplementary groups)."""
    return subprocess.Popen(list(cmd), user=user.pw_uid, group=user.pw_gid, extra_groups=[], cwd="/",
                            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, stdout=stdout,
                            stderr=subprocess.DEVNULL, text=True)


# The other user's side: runs on the stdlib only.
MAKE_SHARED_DIR = """\
import os, sys
d, victim = sys.argv[1], sys.argv[2]
os.mkdir(d, 0o777); os.chmod(d, 0o777)
os.symlink(victim, os.path.join(d, "assistant.sock.lock"))
"""

# An impostor daemon: answers every request the way a daemon would and,
# for each connection, prints how many bytes it received.
IMPOSTOR = """\
import json, os, socket, sys
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(sys.argv[1]); os.chmod(sys.argv[1], 0o777); srv.listen(8)
print("ready", flush=True)
while True:
    conn, _ = srv.accept(); conn.settimeout(10); got = b""
    try:
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            got += chunk
            for line in chunk.splitlines():
                rid = json.loads(line).get("id")
                conn.sendall(json.dumps({"jsonrpc": "2.0", "id": rid, "result": {
                    "protocol_version": 1, "text": "I am your daemon", "finish_reason": "stop"}}).encode() + b"\\n")
    except (OSError, ValueError):
        pass
    conn.close()
    print(len(got), flush=True)
"""

RAW_CLIENT = """\
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.settimeout(30); s.connect(sys.argv[1])
try:  # the daemon may have answered and closed already (EPIPE): its answer is still there to read
    s.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                          "params": {"protocol_version": 1, "client": "intruder"}}).encode() + b"\\n")
except OSError:
    pass
data = b""
while not data.endswith(b"\\n"):
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print(data.decode().strip())
"""


@pytest.mark.slow
def test_daemon_refuses_a_runtime_dir_another_user_made(daemon_factory, scratch, other_user, their_python):
    """The report's takeover: with no usable $XDG_RUNTIME_DIR, another user made
    $TMPDIR/assistant-0 (0777) first and planted the lock as a link to a root file."""
    os.chmod(scratch, 0o711)  # they may pass through, as through /
    shared_tmp = scratch / "tmp"
    shared_tmp.mkdir()
    os.chmod(shared_tmp, 0o1777)
    victim = scratch / "root-only" / "victim"
    victim.parent.mkdir(mode=0o700)
    victim.write_text("precious\n")
    env, sock = _fallback_env(shared_tmp)
    assert as_user(other_user, their_python, "-I", "-S", "-c", MAKE_SHARED_DIR, str(sock.parent),
                   str(victim)).wait(60) == 0
    assert os.lstat(sock.parent).st_uid == other_user.pw_uid

    d = daemon_factory(socket_path=sock, config_text=NO_PRELOAD, env=env)
    d.start(wait=False)
    err = _refused(d)
    assert str(sock.parent) in err and other_user.pw_name in err
    assert victim.read_text() == "precious\n"
    assert not sock.exists()


def _start_impostor(user, python: str, sock: Path) -> subprocess.Popen:
    proc = as_user(user, python, "-I", "-S", "-u", "-c", IMPOSTOR, str(sock), stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.slow
async def test_client_refuses_an_impostor_of_another_uid(scratch, other_user, their_python):
    os.chmod(scratch, 0o711)
    theirs = scratch / "theirs"
    theirs.mkdir()
    os.chown(theirs, other_user.pw_uid, other_user.pw_gid)
    sock = theirs / "assistant.sock"
    impostor = _start_impostor(other_user, their_python, sock)
    try:
        with pytest.raises(UntrustedDaemon, match=other_user.pw_name):
            await asyncio.wait_for(Client.connect(sock), 10)
        assert impostor.stdout.readline().strip() == "0"

        # The CLI, as in the report ("my bank password is ..."), says why and sends nothing.
        out = await asyncio.get_running_loop().run_in_executor(
            None, lambda: run_cli("ask", "my bank password is hunter2", socket_path=sock, timeout=60))
        assert out.returncode == 1, out.stdout + out.stderr
        assert "refusing to talk to" in out.stderr and other_user.pw_name in out.stderr
        assert "I am your daemon" not in out.stdout
    finally:
        impostor.kill()
        rest, _ = impostor.communicate(timeout=30)
    # One line per connection it got, each the number of bytes it was sent.
    assert rest.split() and set(rest.split()) == {"0"}


@pytest.mark.slow
def test_daemon_refuses_a_client_of_another_uid(daemon_factory, other_user, their_python):
    d = daemon_factory(config_text=NO_PRELOAD).start()

    def intrude() -> tuple[int, str]:
        proc = as_user(other_user, their_python, "-I", "-S", "-c", RAW_CLIENT, str(d.socket),
                       stdout=subprocess.PIPE)
        out, _ = proc.communicate(timeout=60)
        return proc.returncode, out

    # The first door: the socket's directory (0700) and the socket (0600) are ours alone.
    code, out = intrude()
    assert code != 0 and not out
    # Open them, as a mistaken chmod would: the daemon's peer check still stands.
    os.chmod(d.socket.parent, 0o711)
    os.chmod(d.socket, 0o666)
    code, out = intrude()
    assert "permission denied: wrong user" in out
    deadline = time.monotonic() + 30
    while "refused a connection from uid" not in d.stderr() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"refused a connection from uid {other_user.pw_uid}" in d.stderr()
    assert "intruder" not in d.stderr()  # never initialized
    assert socket_answers(d.socket) and d.proc.poll() is None
