"""Load test of `dlnotes serve` on loopback: many clients at once, some of them walking away, then a long soak.

    python scripts/load_test_serve.py                      # 500 requests, 40 at a time, then a 1,000-request soak
    python scripts/load_test_serve.py --requests 200 --concurrency 20 --soak 0

It starts `dlnotes serve` in a subprocess on a free loopback port with the tiny random llama (saved to a
temporary folder: nothing is downloaded), and sends a mix of requests from client threads:

    complete   streaming or not: must end with a finish_reason (streams with `data: [DONE]`)
    abandoned  the client leaves: after the first chunk of a stream, or before a reply comes
    refused    503 or 429 with Retry-After, in OpenAI's error shape, three times: the queue was full (allowed;
               like the `openai` client, a refused client waits Retry-After, at most 2 s here, and tries twice more)

Anything else is a failure: a 5xx other than 503, a 4xx, a connection error, a stream cut short, a reply
without a finish_reason (a "lost" reply). It prints p50/p99 latency of complete replies, the server's peak
RSS while under load, and its RSS every 100 requests of the soak (flat = no leak), and exits 1 on any failure.
`hammer()` is also what tests/test_serve.py's slow load test runs against an in-process server.
Only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

KINDS = ("plain", "stream", "leave-stream", "leave-plain")
WEIGHTS = (4, 4, 1, 1)  # abandoned clients are one request in five


def one_request(url: str, key: str, model: str, kind: str, rng: random.Random, timeout: float,
                retries: int = 2) -> tuple[str, float]:
    """Send one request of this kind; (outcome, seconds from the first try). Outcomes: complete, abandoned,
    refused (after `retries` more tries, each after Retry-After), or a failure."""
    start = time.perf_counter()
    for _ in range(retries + 1):
        outcome, wait = _attempt(url, key, model, kind, rng, timeout)
        if outcome != "refused":
            break
        time.sleep(min(wait, 2.0))
    return outcome, time.perf_counter() - start


def _attempt(url: str, key: str, model: str, kind: str, rng: random.Random, timeout: float) -> tuple[str, float]:
    """One try: (outcome, the Retry-After seconds when refused)."""
    where = urlsplit(url)
    if where.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"refusing to load-test {where.hostname}: loopback only")
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": f"Hello {rng.random()}"}],
                       "max_tokens": rng.randint(1, 64), "temperature": rng.choice([0, 0.7, 1.0]),
                       "stream": kind in ("stream", "leave-stream")}).encode()
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=timeout)
    try:
        conn.request("POST", where.path + "/chat/completions", body=body,
                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        if kind == "leave-plain":
            time.sleep(rng.uniform(0, 0.05))  # gone before (or while) the reply is made
            return "abandoned", 0
        response = conn.getresponse()
        if response.status in (429, 503):
            reply = json.loads(response.read())
            shaped = set(reply.get("error", {})) == {"message", "type", "param", "code"}
            retry_after = response.getheader("Retry-After") or ""
            if shaped and retry_after.isdigit():
                return "refused", int(retry_after)
            return f"refused badly: {reply}, Retry-After {retry_after!r}", 0
        if response.status != 200:
            return f"status {response.status}: {response.read()[:200]!r}", 0
        if kind == "leave-stream":
            response.readline()  # the first event
            return "abandoned", 0
        if kind == "plain":
            reply = json.loads(response.read())
            finished = reply["choices"][0]["finish_reason"] in ("stop", "length")
            return ("complete" if finished else "lost: no finish_reason"), 0
        finish, done = None, False
        for line in response:
            if line.startswith(b"data: [DONE]"):
                done = True
                break
            if line.startswith(b"data: "):
                event = json.loads(line[6:])
                if "error" in event:
                    return f"error event: {event['error']['message']}", 0
                for choice in event["choices"]:
                    finish = choice["finish_reason"] or finish
        return ("complete" if done and finish in ("stop", "length") else "lost: stream cut short"), 0
    except (OSError, http.client.HTTPException, ValueError, KeyError) as err:
        return f"lost: {type(err).__name__}: {err}", 0
    finally:
        conn.close()


def hammer(url: str, key: str, model: str, requests: int, concurrency: int, seed: int = 0, timeout: float = 120,
           time_limit: float = 600, progress: object = None) -> dict:
    """`requests` requests, `concurrency` at a time; outcomes counted, latencies of complete replies."""
    rng = random.Random(seed)
    plan = [(rng.choices(KINDS, WEIGHTS)[0], random.Random(rng.random())) for _ in range(requests)]
    stop_at = time.monotonic() + time_limit
    outcomes: Counter = Counter()
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def run(item: tuple[str, random.Random]) -> None:
        if time.monotonic() > stop_at:
            outcome, seconds = "not sent (time limit)", 0.0
        else:
            outcome, seconds = one_request(url, key, model, item[0], item[1], timeout)
        with lock:
            outcomes[outcome if outcome in ("complete", "abandoned", "refused") else "failed"] += 1
            if outcome == "complete":
                latencies.append(seconds)
            elif outcome not in ("abandoned", "refused"):
                failures.append(outcome)
            if progress is not None:
                progress(sum(outcomes.values()))

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(run, plan))
    latencies.sort()
    return {"outcomes": dict(outcomes), "failures": failures[:10],
            "p50_s": statistics.median(latencies) if latencies else None,
            "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None}


# --- the server in a subprocess, and its memory ----------------------------------------------------------------


def start_server(folder: Path, key: str, queue: int, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "dlnotes", "serve", "--model", str(folder), "--port", str(port),
                               "--queue", str(queue)], stdout=log.open("w"), stderr=subprocess.STDOUT,
                              env=os.environ | {"DLNOTES_API_KEY": key})
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 300
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return server, url
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.3)


class PeakRSS:
    """Samples a process's resident memory every 50 ms in a thread; `.peak` in bytes."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.process, self.peak, self.done = psutil.Process(pid), 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done.wait(0.05):
            self.peak = max(self.peak, self.now())

    def now(self) -> int:
        return self.process.memory_info().rss

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=40)
    parser.add_argument("--soak", type=int, default=1000, help="requests of the soak after the load (0: none)")
    parser.add_argument("--soak-concurrency", type=int, default=8)
    parser.add_argument("--queue", type=int, default=16, help="the server's --queue")
    parser.add_argument("--time-limit", type=float, default=900, help="seconds for each phase at most")
    args = parser.parse_args()

    from dlnotes.llm.tiny import TINY_NAME, tiny_model

    mb = 1 / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / TINY_NAME
        tiny = tiny_model()
        tiny.model.save_pretrained(folder)
        tiny.tokenizer.save_pretrained(folder)
        server, url = start_server(folder, "load-test", args.queue, Path(tmp) / "server.log")
        failed = False
        try:
            rss = PeakRSS(server.pid)
            print(f"server at {url} (pid {server.pid}), RSS at start {rss.now() * mb:.0f} MiB")
            began = time.perf_counter()
            load = hammer(url, "load-test", TINY_NAME, args.requests, args.concurrency, seed=1,
                          time_limit=args.time_limit)
            rss.stop()
            print(f"load: {args.requests} requests, {args.concurrency} at a time, {time.perf_counter() - began:.0f} s")
            print(f"  outcomes {load['outcomes']}")
            print(f"  latency of complete replies: p50 {load['p50_s']:.3f} s, p99 {load['p99_s']:.3f} s")
            print(f"  peak RSS of the server {rss.peak * mb:.0f} MiB")
            failed |= bool(load["failures"])
            for failure in load["failures"]:
                print(f"  FAILURE {failure}")
            if args.soak:
                readings: list[tuple[int, float]] = []

                def note(done: int) -> None:
                    if done % 100 == 0:
                        readings.append((done, rss.now() * mb))

                began = time.perf_counter()
                soak = hammer(url, "load-test", TINY_NAME, args.soak, args.soak_concurrency, seed=2,
                              time_limit=args.time_limit, progress=note)
                print(f"soak: {args.soak} requests, {args.soak_concurrency} at a time, "
                      f"{time.perf_counter() - began:.0f} s, outcomes {soak['outcomes']}")
                print("  server RSS (MiB) after every 100: " + ", ".join(f"{n}: {m:.0f}" for n, m in readings))
                if readings:
                    print(f"  growth from the first reading to the last: {readings[-1][1] - readings[0][1]:+.1f} MiB")
                failed |= bool(soak["failures"])
                for failure in soak["failures"]:
                    print(f"  FAILURE {failure}")
            alive = one_request(url, "load-test", TINY_NAME, "plain", random.Random(0), 60)[0]
            print(f"after: one more request -> {alive}")
            failed |= alive != "complete"
        finally:
            server.terminate()
            server.wait(timeout=30)
    print("FAILED" if failed else "OK: no 5xx, no lost reply")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
