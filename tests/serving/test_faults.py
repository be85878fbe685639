"""Faults over real HTTP, against a server of its own (one tiny model, no keys, a small queue):
closed by default, an adapter store away at start, disconnecting clients, overload, a killed engine.

The tests share one module-scoped server and run in file order; the engine kill comes last.
"""

from __future__ import annotations

import re
import shutil
import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from llm_platform.serving.adapter_store import AdapterStore
from llm_platform.serving.cpu_cores import marked, vllm_role
from llm_platform.serving.process import ServerProcess
from tests.conftest import make_lora
from tests.serving.conftest import SERVER_MARK

pytestmark = pytest.mark.slow
PROMPT = "Review: The lamp is lovely. Is this review positive or negative?\nAnswer:"
MAX_ONGOING, MAX_QUEUED = 4, 8
QUEUE_WAIT_S = 3.0
"""max_queue_wait_s: the longest a request waits in Serve's router for a replica before its 503."""
PROMPT_503_S = QUEUE_WAIT_S + 7
"""Every 503 comes within this (the wait plus slack for a busy 2-core machine), far below a client's timeout."""


@pytest.fixture(scope="module")
def fault_server(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("fault-server")
    # tiny-s, with a chat template that refuses system messages (as many real templates refuse some orders).
    model = shutil.copytree(tiny_models["tiny-s"], root / "tiny-s-strict")
    template = (model / "chat_template.jinja").read_text()
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('system messages are not "
        "supported') }}{% endif %}{% endfor %}" + template)
    # The store cannot be opened at start: a file stands where its parent folder should be (as an
    # unmounted volume or an unreachable bucket, every access fails) until the test puts the folder there.
    (root / "volume").write_text("not mounted")
    config = {
        "adapter_store": str(root / "volume" / "store"),
        "adapter_sync_s": 0.5,
        "health_check_period_s": 1,
        "max_queued_requests": MAX_QUEUED,
        "max_queue_wait_s": QUEUE_WAIT_S,
        "models": [{"id": "tiny-s", "num_cpus": 0.5, "max_adapters": 2, "max_ongoing_requests": MAX_ONGOING,
                    "engine": {"model": str(model), "kind": "vllm", "max_model_len": 2048,
                               "max_num_seqs": MAX_ONGOING}}],
    }
    # No keys at all (empty values count as unset), and metrics exported every second.
    # LLMP_TEST_SERVER marks every process of this server (Ray workers and vLLM's engine core inherit the
    # environment), so the engine core is found even where it is not a descendant of the server process.
    # In this process's session, as the shared server: the tests time its 503s from here (child_group).
    running = ServerProcess(config, root, env={"LLMP_ADMIN_KEY": "", "LLMP_API_KEY": "",
                                               "RAY_metrics_report_interval_ms": "1000",
                                               SERVER_MARK: str(root)},
                            same_session=True)
    running.root = root
    running.start()
    yield running
    running.stop()


def complete(server, timeout=60, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", timeout=timeout,
                      json={"model": "tiny-s", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, **body})


def metric(server, name: str) -> float | None:
    """Sum of a Prometheus metric's samples for model tiny-s on the server's Ray metrics port."""
    text = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name + "{") and re.search(r'model(_name)?="tiny-s"', line)]
    return sum(values) if values else None


def settled_tokens(server, quiet: float = 3.0, timeout: float = 60.0) -> float:
    """vLLM's generated-token count once it has not moved for ``quiet`` seconds (the engine is idle)."""
    def read():
        return metric(server, "ray_vllm:generation_tokens_total") or metric(server, "ray_vllm_generation_tokens_total")

    deadline, value, since = time.monotonic() + timeout, read(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = read()
        if now != value:
            value, since = now, time.monotonic()
        elif value is not None and time.monotonic() - since >= quiet:
            return value
    raise AssertionError(f"vLLM's token count did not settle in {timeout} s (last {value})")


def wait_for(predicate, timeout: float, step: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def refusal_reason(response: httpx.Response) -> str:
    """Why a 503 came: Serve's own backpressure (its body is not ours), or the code of our OpenAI-shaped error."""
    try:
        message, code = response.json()["error"]["message"], response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return "serve backpressure"
    if "max_queue_wait_s" in message:
        return "queue wait"
    return "no running replica" if "no running replica" in message else code


def tally(refusals: list[tuple[float, str]]) -> dict:
    """503 reasons: how many, and the slowest answer of each."""
    return {why: f"{sum(1 for _, w in refusals if w == why)} (slowest {max(t for t, w in refusals if w == why):.1f} s)"
            for why in sorted({w for _, w in refusals})}


def test_admin_is_refused_without_a_key_and_docs_are_off(fault_server, adapters):
    url = fault_server.url
    for method, path, body in [("POST", "/v1/adapters", {"name": "x", "base": "tiny-s", "kind": "lora",
                                                          "source": str(adapters["tiny-s"]["lora"])}),
                               ("POST", "/v1/adapters", {"garbage": True}),  # refused before any field error
                               ("GET", "/v1/adapters", None), ("DELETE", "/v1/adapters/tiny-s:x", None)]:
        response = httpx.request(method, url + path, json=body, headers={"Authorization": "Bearer guess"})
        assert response.status_code == 403, (method, path, response.text)
        assert response.json()["error"]["code"] == "admin_disabled"
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(url + path).status_code == 404, path
    assert httpx.get(url + "/health").status_code == 200


def test_chat_template_errors_are_400(fault_server):
    chat = {"model": "tiny-s", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
    assert httpx.post(f"{fault_server.url}/v1/chat/completions", json=chat, timeout=60).status_code == 200
    chat["messages"].insert(0, {"role": "system", "content": "Be brief."})
    for stream in (False, True):
        refused = httpx.post(f"{fault_server.url}/v1/chat/completions", json={**chat, "stream": stream}, timeout=60)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == "messages"
        assert "system messages are not supported" in refused.json()["error"]["message"]


def test_base_serves_while_the_store_is_away_and_adapters_recover(fault_server, tiny_models):
    root = fault_server.root
    base = complete(fault_server, max_tokens=16)
    assert base.status_code == 200, base.text
    away = complete(fault_server, model="tiny-s:early", max_tokens=16)
    assert away.status_code == 503 and away.json()["error"]["code"] == "adapter_store_unavailable"
    assert int(away.headers["retry-after"]) >= 1
    assert httpx.get(f"{fault_server.url}/v1/models").status_code == 200

    # The volume appears, holding an adapter registered elsewhere.
    staging = root / "staging"
    lora = make_lora(tiny_models["tiny-s"], root / "early-lora", seed=7)
    AdapterStore(str(staging / "store")).put("tiny-s", "early", "lora", lora)
    (root / "volume").unlink()
    staging.rename(root / "volume")
    recovered = wait_for(lambda: complete(fault_server, model="tiny-s:early", max_tokens=16).status_code == 200, 30)
    assert recovered
    adapted = complete(fault_server, model="tiny-s:early", max_tokens=16).json()["choices"][0]["text"]
    assert adapted != base.json()["choices"][0]["text"]


def test_disconnected_clients_free_their_engine_slots(fault_server):
    # Long generations that only a disconnect can end early.
    # ignore_eos: only max_tokens ends these, whichever tokens greedy decoding picks. With an end-of-sequence
    # token chosen to be out of reach of the prompt alone, CI once saw one of the requests below answered
    # within 1 s (not reproduced here; a batch decoding differently from the prompt alone would do it).
    probe = complete(fault_server, max_tokens=1500, ignore_eos=True, timeout=300).json()
    assert probe["usage"]["completion_tokens"] == 1500, probe["usage"]
    assert wait_for(lambda: metric(fault_server, "ray_llmp_engine_requests") == 0, 30)
    before = settled_tokens(fault_server)

    def stream_then_leave(_):
        with httpx.stream("POST", f"{fault_server.url}/v1/completions", timeout=60, json={
                "model": "tiny-s", "prompt": PROMPT, "max_tokens": 1900, "ignore_eos": True, "temperature": 0,
                "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # leaving the with-block closes the connection

    def leave_before_the_answer(_):
        try:
            answer = complete(fault_server, max_tokens=1900, ignore_eos=True, timeout=1.0)
        except httpx.ReadTimeout:
            return
        pytest.fail(f"a 1900-token request was answered within 1 s: {answer.status_code} {answer.text[:500]}")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(stream_then_leave, range(2)))
        list(pool.map(leave_before_the_answer, range(2)))
    left_at = time.monotonic()
    # Had they run on, 1900-token generations would hold the engine far longer than this.
    assert wait_for(lambda: metric(fault_server, "ray_llmp_engine_requests") == 0, 20, step=0.25)
    freed_after = time.monotonic() - left_at
    # The engine stopped generating: its token count settles (Ray exports it every second, so a reading taken
    # right away can still lag) at far fewer tokens than the four 1900-token generations would have made.
    after = settled_tokens(fault_server)
    assert after - before < 4 * 1900 / 2, (before, after)
    print(f"engine slots freed {freed_after:.1f} s after 4 clients left; {after - before:.0f} tokens generated")


def test_overload_gives_only_200_or_503_and_recovers(fault_server):
    """A bounded soak: 32 clients against 4 slots + 8 queued for 20 s, then a quiet request."""
    server_proc = psutil.Process(fault_server.process.pid)

    def tree_rss() -> int:
        procs = [server_proc] + server_proc.children(recursive=True)
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    rss_before = tree_rss()
    stop = time.monotonic() + 20
    statuses, latencies, no_retry_after, lock = [], [], [], threading.Lock()
    refusals = []  # (seconds, why) of each 503
    peak_rss = [rss_before]

    def client(_):
        with httpx.Client(timeout=60) as http:
            while time.monotonic() < stop:
                start = time.perf_counter()
                r = http.post(f"{fault_server.url}/v1/completions",
                              json={"model": "tiny-s", "prompt": PROMPT, "max_tokens": 64, "temperature": 0.8})
                with lock:
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        latencies.append(time.perf_counter() - start)
                    if r.status_code == 503:
                        refusals.append((time.perf_counter() - start, refusal_reason(r)))
                    if r.status_code == 503 and not r.headers.get("retry-after", "").isdigit():
                        no_retry_after.append((dict(r.headers), r.text[:300]))
                if r.status_code == 503:
                    time.sleep(0.05)

    def sample_memory():
        while time.monotonic() < stop:
            peak_rss[0] = max(peak_rss[0], tree_rss())
            time.sleep(1)

    late = [0.0]  # how late this process's own 0.1 s sleeps woke: a slow 503 with a starved client is the client's

    def watch_the_client():
        while time.monotonic() < stop:
            slept = time.monotonic()
            time.sleep(0.1)
            late[0] = max(late[0], time.monotonic() - slept - 0.1)

    sampler, watcher = threading.Thread(target=sample_memory), threading.Thread(target=watch_the_client)
    sampler.start()
    watcher.start()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(client, range(32)))
    sampler.join()
    watcher.join()
    counts = {s: statuses.count(s) for s in set(statuses)}
    ok = sorted(latencies)
    p99 = ok[int(0.99 * (len(ok) - 1))] if ok else float("nan")
    print(f"overload soak 20 s, 32 clients: {len(statuses) / 20:.1f} req/s, {len(ok) / 20:.1f} ok/s, "
          f"statuses {counts}, p50 {statistics.median(ok):.2f} s, p99 {p99:.2f} s, "
          f"tree RSS {rss_before / 2**30:.2f} -> peak {peak_rss[0] / 2**30:.2f} GiB; "
          f"503s: {tally(refusals)}; the test's own sleeps woke up to {late[0]:.2f} s late")
    assert set(counts) <= {200, 503}, counts
    assert counts.get(200, 0) > 0 and counts.get(503, 0) > 0, counts  # it was overloaded, and still served
    assert not no_retry_after, no_retry_after[:3]
    assert max(took for took, _ in refusals) < PROMPT_503_S, (tally(refusals), f"client up to {late[0]:.2f} s late")
    assert peak_rss[0] - rss_before < 1.5 * 2**30
    quiet = complete(fault_server)
    assert quiet.status_code == 200, quiet.text


def test_every_dashboard_panel_has_data_in_a_real_prometheus(fault_server, tmp_path):
    """Debian's prometheus scrapes Ray's metrics export; each panel's queries return finite values."""
    import json
    import math
    import shutil as sh
    import subprocess

    from llm_platform.serving.monitoring import PANELS, dashboard
    from llm_platform.serving.process import free_port

    binary = sh.which("prometheus")
    if binary is None:
        pytest.skip("Debian's prometheus package is not installed (apt-get install prometheus)")
    assert len(dashboard()["panels"]) == len(PANELS)
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(json.dumps({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "ray", "static_configs": [
            {"targets": [f"127.0.0.1:{fault_server.metrics_port}"]}]}]}))
    prometheus = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                  stdout=(tmp_path / "prometheus.log").open("w"), stderr=subprocess.STDOUT)
    try:
        def query(expr):
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": expr}, timeout=10)
            except httpx.ConnectError:  # prometheus still starting (its port opens after the storage is ready)
                return []
            return r.json()["data"]["result"] if r.status_code == 200 else []

        def finite(expr):
            return [s for s in query(expr) if math.isfinite(float(s["value"][1]))]

        missing, answers = [], []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for model in ("tiny-s", "tiny-s:early"):
                answer = complete(fault_server, model=model, max_tokens=24, temperature=0.7)
                answers.append((model, answer.status_code, answer.text[:200] if answer.status_code != 200 else ""))
            httpx.get(f"{fault_server.url}/v1/adapters")  # a 403, for the error panel
            missing = [(panel.title, expr) for panel in PANELS for expr, _ in panel.exprs if not finite(expr)]
            if not missing:
                break
            time.sleep(1)
        assert not missing, (missing, [a for a in answers if a[1] != 200][-5:], len(answers))
    finally:
        prometheus.terminate()
        prometheus.wait(30)


def engine_cores(server: ServerProcess) -> list[psutil.Process]:
    """The vLLM engine-core processes of ``server``: every process on this machine whose environment
    carries the server's mark, looked up machine-wide (not as descendants of the server process)."""
    return [process for process in marked(SERVER_MARK, str(server.root)) if vllm_role(process) == "engine"]


def one_engine_core(server: ServerProcess, timeout: float = 180) -> psutil.Process:
    """The server's single engine core once it answers a request, or a failure that shows the process
    tree (a replica may still be starting when an earlier test left it replaced)."""
    deadline = time.monotonic() + timeout
    cores: list[psutil.Process] = []
    while time.monotonic() < deadline:
        cores = engine_cores(server)
        if len(cores) == 1 and complete(server).status_code == 200:
            return cores[0]
        time.sleep(2)
    everywhere = []
    for process in psutil.process_iter():  # vllm_role reads each command line afresh
        try:
            if vllm_role(process) == "engine":
                chain = [p.pid for p in process.parents()]
                everywhere.append((process.pid, chain, process.environ().get(SERVER_MARK)))
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
    raise AssertionError(f"{len(cores)} engine cores of this server after {timeout:.0f} s; every engine core "
                         f"on the machine (pid, parents, mark): {everywhere}; server pid {server.process.pid}")


def test_killed_engine_gives_503s_then_service_resumes_without_a_restart(fault_server):
    core = one_engine_core(fault_server)
    server_pid = fault_server.process.pid
    core.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    statuses, bad, refusals = [], [], []
    deadline = killed_at + 480  # a new vLLM replica starts in ~1 min on an idle 2-core machine, minutes when busy
    while time.monotonic() < deadline:
        start = time.monotonic()
        r = complete(fault_server, timeout=60)  # a wait past the client's timeout fails the test (ReadTimeout)
        took = time.monotonic() - start
        statuses.append(r.status_code)
        if r.status_code == 503:
            refusals.append((took, refusal_reason(r)))
            error = r.json()["error"]
            if not (int(r.headers["retry-after"]) >= 1 and error["type"] == "service_unavailable"
                    and error["code"] in {"unavailable", "overloaded"} and "'tiny-s'" in error["message"]):
                bad.append((dict(r.headers), r.text))
        elif r.status_code != 200:
            bad.append(r.text)
        if r.status_code == 200 and 503 in statuses:
            break
        time.sleep(0.5)
    resumed_after = time.monotonic() - killed_at
    print(f"engine killed: {statuses.count(503)} x 503 {tally(refusals)}, then 200 after {resumed_after:.0f} s")
    assert not bad, bad
    assert 503 in statuses and statuses[-1] == 200, statuses
    # Refused at once from Serve's replica status, or after max_queue_wait_s in Serve's router: never a long wait.
    assert max(took for took, _ in refusals) < PROMPT_503_S, tally(refusals)
    assert fault_server.process.pid == server_pid and fault_server.process.poll() is None
    health = httpx.get(f"{fault_server.url}/healthz")
    assert health.status_code == 200
    # The killed core is gone (reaped, or a zombie nobody waits for) and another engine answered the 200 above.
    # (Looking the replacement up by its process title found none in two runs, though it was serving: vLLM's
    # title of a replacement replica's core is not reliable enough to assert on.)
    assert not core.is_running() or core.status() == psutil.STATUS_ZOMBIE
