#!/usr/bin/env python3
"""Floods `ipcm recv` with connections that never say hello, and reports
what the listener holds: descriptors while the flood is held, CPU seconds
used while held, descriptors 1.5 s after the flood closed, and whether a
well-behaved client that connects afterwards is served.

    cargo build --release --bin ipcm
    python3 scripts/flood.py io_uring 300          # peers close: released at once?
    python3 scripts/flood.py epoll 400 --emfile    # RLIMIT_NOFILE 128: no spin, recovery?
"""
import argparse, json, os, resource, socket, subprocess, sys, time

ap = argparse.ArgumentParser()
ap.add_argument("backend", choices=["io_uring", "epoll"])
ap.add_argument("count", type=int)
ap.add_argument("--emfile", action="store_true", help="run ipcm recv with RLIMIT_NOFILE 128")
ap.add_argument("--threaded", action="store_true", help="ipcm recv --threaded")
ap.add_argument("--ipcm", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "ipcm"))
a = ap.parse_args()

info = subprocess.check_output([a.ipcm, "spawn"]).decode().strip()
route = json.loads(info)[2]


def limit():
    if a.emfile:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))


cmd = [a.ipcm, "recv", info, "--id", "sink", "--timeout", "20", "--backend", a.backend]
if a.threaded:
    cmd.append("--threaded")
p = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, preexec_fn=limit)
p.stderr.readline()  # "ready"


def fds():
    return len(os.listdir(f"/proc/{p.pid}/fd"))


def cpu():
    f = open(f"/proc/{p.pid}/stat").read().split(")")[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


base = fds()
flood = []
for _ in range(a.count):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect(os.path.join(route, "sink"))
    except BlockingIOError:
        pass
    flood.append(s)
time.sleep(1.0)
held, c0 = fds(), cpu()
time.sleep(3.0)
used = cpu() - c0
for s in flood:
    s.close()
time.sleep(1.5)
after = fds()
sent = subprocess.run([a.ipcm, "send", info, "--id", "late", "--to", "sink", '"hi"'],
                      capture_output=True, timeout=10)
time.sleep(0.5)
p.terminate()
out, err = p.communicate(timeout=5)
served = b'"content":"hi"' in out
print(f"{a.backend}{' threaded' if a.threaded else ''}{' RLIMIT_NOFILE=128' if a.emfile else ''}: "
      f"{a.count} connections; descriptors {base} -> {held} held, {used:.2f} s CPU in 3 s held, "
      f"{after} 1.5 s after the flood closed; a later client served: {served}; "
      f"stderr lines: {len(err.splitlines())}")
subprocess.run([a.ipcm, "unspawn", "--force", info], capture_output=True)
sys.exit(0 if served else 1)
