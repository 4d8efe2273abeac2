"""Load-test the web app under gunicorn on this machine: loopback only, bounded in time.

Usage:
    python scripts/load_test.py --checkpoint runs/lenet [--requests 1000] [--concurrency 8] [--image FILE]
        [--gradcam] [--workers 1] [--threads 4] [--torch-threads 1] [--timeout 900] [--out FILE.json]

It starts `gunicorn "rvf.web:create_app()"` with `RVF_CHECKPOINT` on 127.0.0.1 (a port the OS
picks), waits for `GET /api/health`, sends a few warm-up requests, then `--requests`
`POST /api/predict` of one image from `--concurrency` client threads (one keep-alive connection
each), and stops the server. It prints and writes as JSON: requests served, errors (anything
but a 200 carrying a verdict), latency p50/p90/p99/max, throughput, and the server's RSS
(gunicorn master + workers, psutil) after the warm-up, at the end and at its peak.

Exit status: 0 with no errors and RSS growth under --max-rss-growth-mb, 1 otherwise (or when
--timeout ran out first), 2 for bad arguments. It never sends a request off this machine: a
--host that is not a loopback address is refused.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import collections  # noqa: E402
import http.client  # noqa: E402
import io  # noqa: E402
import ipaddress  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

from rvf.cli import non_negative_int, positive_int  # noqa: E402
from rvf.utils import PeakSampler, tree_rss  # noqa: E402


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="folder with model.safetensors + model.json")
    parser.add_argument("--requests", type=positive_int, default=1000,
                        help="timed POST /api/predict requests (default 1000)")
    parser.add_argument("--concurrency", type=positive_int, default=8, help="client threads (default 8)")
    parser.add_argument("--image", type=Path, help="image to upload (default: a generated 256x256 JPEG)")
    parser.add_argument("--gradcam", action="store_true", help="ask for a Grad-CAM overlay in every response")
    parser.add_argument("--warmup", type=non_negative_int, default=8,
                        help="untimed requests before the RSS baseline (default 8)")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind and load (default 127.0.0.1)")
    parser.add_argument("--workers", type=positive_int, default=1, help="gunicorn worker processes (default 1)")
    parser.add_argument("--threads", type=positive_int, default=4, help="gunicorn threads per worker (default 4)")
    parser.add_argument("--torch-threads", type=positive_int, default=1,
                        help="RVF_TORCH_THREADS for the app (default 1: best when cores are shared)")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="seconds one request may take")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="bound on the whole run, server start included (default 900 s)")
    parser.add_argument("--max-rss-growth-mb", type=float, default=50.0, help="fail above this growth (default 50)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "load_test.json",
                        help="JSON report (default benchmarks/results/load_test.json)")
    return parser


def check_loopback(host: str) -> str:
    """Return `host` if it is a loopback IP address; raise ValueError otherwise."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        ip = None
    if ip is None or not ip.is_loopback:
        raise ValueError(f"--host {host!r} is not a loopback address (127.0.0.0/8 or ::1): "
                         f"this script only ever loads a server on this machine")
    return str(ip)


def default_image() -> tuple[bytes, str]:
    """A smooth, noisy 256x256 JPEG (a face stand-in), the same bytes every run."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:256]
    rgb = np.stack([xx, yy, (xx + yy) // 2], -1) + rng.integers(-30, 30, (256, 256, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue(), "generated.jpg"


def multipart(data: bytes, filename: str) -> tuple[bytes, str]:
    """Encode one file as field `image` of a multipart/form-data body; return (body, content type)."""
    boundary = uuid.uuid4().hex
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Server:
    """gunicorn serving `rvf.web:create_app()` on `host`, port chosen by the OS."""

    def __init__(self, args, log_path: Path):
        self.host = args.host
        bind = f"[{args.host}]:0" if ":" in args.host else f"{args.host}:0"
        cmd = [sys.executable, "-m", "gunicorn", "--workers", str(args.workers), "--threads", str(args.threads),
               "--bind", bind, "--timeout", "120", "--graceful-timeout", "10",
               "--no-control-socket",  # gunicorn 27 would otherwise open ~/.gunicorn/gunicorn.ctl
               "rvf.web:create_app()"]
        env = {**os.environ, "RVF_CHECKPOINT": str(args.checkpoint.resolve()),
               "RVF_TORCH_THREADS": str(args.torch_threads),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.port = None

    def wait_ready(self, deadline: float) -> dict:
        """Wait for gunicorn's port, then for a 200 from /api/health; return its JSON."""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with status {self.proc.returncode}:\n{self.log_tail()}")
            if self.port is None:
                m = re.search(r"Listening at: http://\S+:(\d+) ", self.log_path.read_text())
                self.port = int(m.group(1)) if m else None
            if self.port is not None:
                try:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
                    conn.request("GET", "/api/health")
                    r = conn.getresponse()
                    body = r.read()
                    conn.close()
                    if r.status == 200:
                        return json.loads(body)
                except OSError:
                    pass  # the worker is still loading the model
            time.sleep(0.2)
        raise TimeoutError(f"the server was not ready before --timeout ran out:\n{self.log_tail()}")

    def rss(self) -> int:
        """Resident memory of the master and all its workers, in bytes."""
        return tree_rss(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: gunicorn's graceful shutdown
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text()[-n:]


def send(conn_box: list, host: str, port: int, path: str, body: bytes, ctype: str,
         timeout: float) -> tuple[bool, str]:
    """POST once on the thread's keep-alive connection (reopened after an error); return (ok, why)."""
    if conn_box[0] is None:
        conn_box[0] = http.client.HTTPConnection(host, port, timeout=timeout)
    conn = conn_box[0]
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": ctype})
        r = conn.getresponse()
        payload = r.read()
    except (OSError, http.client.HTTPException) as e:
        conn.close()
        conn_box[0] = None
        return False, type(e).__name__
    if r.status != 200:
        return False, f"HTTP {r.status}"
    try:
        label = json.loads(payload)["results"][0]["label"]
    except (ValueError, KeyError, IndexError, TypeError):
        return False, "bad JSON"
    return (True, "") if label in ("fake", "real") else (False, f"label {label!r}")


def run_load(server: Server, path: str, body: bytes, ctype: str, n: int, concurrency: int, timeout: float,
             deadline: float) -> dict:
    """Send `n` requests from `concurrency` threads; return latencies (s), error kinds, sent count."""
    lock = threading.Lock()
    state = {"next": 0, "latencies": [], "errors": collections.Counter()}

    def client():
        box = [None]
        while True:
            with lock:
                if state["next"] >= n or time.monotonic() >= deadline:
                    break
                state["next"] += 1
            t0 = time.perf_counter()
            ok, why = send(box, server.host, server.port, path, body, ctype, timeout)
            dt = time.perf_counter() - t0
            with lock:
                if ok:
                    state["latencies"].append(dt)
                else:
                    state["errors"][why] += 1
        if box[0] is not None:
            box[0].close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": state["latencies"], "errors": state["errors"], "sent": state["next"]}


def check_checkpoint(directory: Path) -> None:
    """Raise ValueError (`CheckpointError`) naming what is wrong with a run or ensemble folder."""
    from rvf.checkpoint import read_meta
    from rvf.ensemble import MANIFEST, check_member_weights, read_manifest

    if (directory / MANIFEST).is_file():
        manifest = read_manifest(directory)
        for member in manifest["members"]:
            read_meta(member)
        check_member_weights(directory, manifest)
    else:
        read_meta(directory)


def main(args) -> int:
    try:
        args.host = check_loopback(args.host)
        if not args.checkpoint.is_dir():
            raise ValueError(f"--checkpoint {args.checkpoint}: no such folder")
        check_checkpoint(args.checkpoint)  # here, not as a server worker's traceback
        data, name = (args.image.read_bytes(), args.image.name) if args.image else default_image()
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from rvf.utils import device_name

    deadline = time.monotonic() + args.timeout
    body, ctype = multipart(data, name)
    path = "/api/predict" + ("?gradcam=1" if args.gradcam else "")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, log_path = tempfile.mkstemp(prefix="rvf-gunicorn-", suffix=".log")
    os.close(fd)
    server = Server(args, Path(log_path))
    try:
        health = server.wait_ready(deadline)
        rss_start = server.rss()
        warm = run_load(server, path, body, ctype, args.warmup, 1, args.request_timeout, deadline)
        if warm["errors"]:  # e.g. an --image the app refuses: every timed request would fail alike
            raise RuntimeError(f"{sum(warm['errors'].values())} of {args.warmup} warm-up requests failed "
                               f"({dict(warm['errors'])}); no load sent")
        rss_warm = server.rss()
        t0 = time.perf_counter()
        with PeakSampler(server.rss) as peak:
            res = run_load(server, path, body, ctype, args.requests, args.concurrency, args.request_timeout, deadline)
        wall = time.perf_counter() - t0
        rss_end = server.rss()
    except (RuntimeError, TimeoutError) as e:
        print(f"error: {e}\n(server log: {log_path})", file=sys.stderr)
        return 1
    finally:
        server.stop()
    os.unlink(log_path)

    lat = sorted(1000 * s for s in res["latencies"])
    cuts = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else lat * 99
    n_errors = sum(res["errors"].values())  # the warm-up's would have stopped the run above
    not_sent = args.requests - res["sent"]
    mb = 2 ** 20
    report = {
        "requests": args.requests, "concurrency": args.concurrency, "gradcam": args.gradcam, "served_ok": len(lat),
        "errors": n_errors, "error_kinds": dict(res["errors"]), "not_sent": not_sent,
        "latency_ms": {"p50": round(cuts[49], 2), "p90": round(cuts[89], 2), "p99": round(cuts[98], 2),
                       "max": round(lat[-1], 2), "mean": round(statistics.fmean(lat), 2)} if lat else None,
        "throughput_rps": round(len(lat) / wall, 1), "wall_seconds": round(wall, 2),
        "rss_mb": {"after_start": round(rss_start / mb, 1), "after_warmup": round(rss_warm / mb, 1),
                   "end": round(rss_end / mb, 1), "peak": round(max(peak.peak, rss_end) / mb, 1),
                   "growth": round((rss_end - rss_warm) / mb, 1)},
        "server": {"gunicorn_workers": args.workers, "gunicorn_threads": args.threads,
                   "torch_threads": args.torch_threads, "bind": f"{args.host}:{server.port}"},
        "image": {"name": name, "bytes": len(data)}, "model": health.get("model"),
        "input_size": health.get("input_size"), "machine": device_name("cpu"),
        "command": " ".join(["python", *sys.argv]),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    lat_ms = report["latency_ms"] or {}
    print(f"{len(lat)}/{args.requests} served OK from {args.concurrency} clients in {wall:.1f} s "
          f"({report['throughput_rps']} req/s); errors {n_errors} {report['error_kinds'] or ''}; "
          f"p50 {lat_ms.get('p50')} ms, p99 {lat_ms.get('p99')} ms; server RSS {report['rss_mb']['after_warmup']} -> "
          f"{report['rss_mb']['end']} MB (growth {report['rss_mb']['growth']} MB, peak {report['rss_mb']['peak']} MB); "
          f"wrote {args.out}")
    if not_sent:
        print(f"error: --timeout ran out with {not_sent} requests not sent", file=sys.stderr)
    growth_ok = report["rss_mb"]["growth"] < args.max_rss_growth_mb
    if not growth_ok:
        print(f"error: server RSS grew {report['rss_mb']['growth']} MB (limit {args.max_rss_growth_mb:g})",
              file=sys.stderr)
    return 0 if n_errors == 0 and not not_sent and growth_ok else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
