"""taps-fast serve end to end: a real server process, a real HTTP client, every answer checked
against the task's own converted model (float64) on the same pre-processed image."""
import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from taps_fast import MultiTaskModel

from serve_helpers import CLEAN_EXIT, Oracle, Server, images, make_base, metric, predict, write_extra_task, write_world, zipf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("serve"), n_tasks=18)


@pytest.fixture(scope="module")
def oracle(world):
    return Oracle(world)


@pytest.fixture(scope="module")
def server(world):
    srv = Server(world, "--max-wait-ms", "20")
    yield srv
    assert srv.stop() in CLEAN_EXIT, srv.log()


def run_all(url, jobs, workers=16):
    """POST every (task, image) of ``jobs`` from ``workers`` threads; [(task, image, response)]."""
    with httpx.Client(base_url=url, timeout=120, limits=httpx.Limits(max_connections=workers)) as c:
        with ThreadPoolExecutor(workers) as ex:
            rs = list(ex.map(lambda j: predict(c, *j), jobs))
    return [(t, img, r) for (t, img), r in zip(jobs, rs)]


def stream(world, n, seed, base_every=7):
    """n (task, image) pairs: zipf(1.0) over the tasks, every base_every-th a base row."""
    imgs = images(24, seed)
    tasks = zipf(world["names"], n, seed)
    return [("base" if i % base_every == 0 else t, imgs[i % len(imgs)]) for i, t in enumerate(tasks)]


def test_alone(world, oracle, server):
    imgs = images(8, seed=5)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for i, task in enumerate(["base"] + world["names"][:7]):
            r = predict(c, task, imgs[i])
            assert r.status_code == 200, r.text
            assert r.json()["batch_rows"] == 1
            oracle.check(task, imgs[i], r.json())


def test_mixed_batches_zipf(world, oracle, server):
    jobs = stream(world, 320, seed=1)
    assert len({t for t, _ in jobs}) >= 17  # base + most of the 18 tasks
    results = run_all(server.url, jobs, workers=32)
    mixed = 0
    for task, img, r in results:
        assert r.status_code == 200, r.text
        answer = r.json()
        oracle.check(task, img, answer)
        mixed += answer["batch_tasks"] > 1
        i = int(task[4:]) if task != "base" else 1
        if i % 2 == 0:  # tasks saved with class names answer with them
            assert all(p["label"] == f"{task}-class{p['index']}" for p in answer["top_k"]), answer
        else:
            assert all("label" not in p for p in answer["top_k"]), answer
    assert mixed > 0, "no batch mixed tasks: the mixed path was not exercised"
    info = httpx.get(server.url + "/v1/tasks").json()
    used = {t for t, _ in jobs} - {"base"}
    assert {t["name"] for t in info["tasks"] if t["resident"]} >= used
    m = httpx.get(server.url + "/metrics").text
    assert metric(m, "taps_serve_requests_total") >= len(jobs)
    assert metric(m, "taps_serve_batch_tasks_count") > 0
    assert metric(m, "taps_serve_resident_bytes") > 0


def test_clients(world, oracle, server, tmp_path):
    from PIL import Image

    from taps_fast.serve import AsyncClient, Client, ServerError

    img = images(2, seed=9)[0]
    path = tmp_path / "photo.jpg"
    path.write_bytes(img)
    with Client(server.url) as c:
        assert c.health()["status"] == "ok"
        for source in (img, str(path)):
            oracle.check("task0", img, c.predict("task0", source, logits=True))
        pil = c.predict("task1", Image.open(path), top_k=2)
        assert len(pil["top_k"]) == 2 and "logits" not in pil
        assert {t["name"] for t in c.tasks()["tasks"]} == set(world["names"])
        with pytest.raises(ServerError) as e:
            c.predict("no-such-task", img)
        assert e.value.status == 404 and "no-such-task" in e.value.detail

    async def go():
        async with AsyncClient(server.url) as ac:
            answers = await asyncio.gather(*(ac.predict(t, img, logits=True) for t in ("task2", "task3", "base")))
            for t, a in zip(("task2", "task3", "base"), answers):
                oracle.check(t, img, a)
            with pytest.raises(ServerError):
                await ac.remove_task("no-such-task")

    asyncio.run(go())


def test_budget_forces_evictions(world, oracle, tmp_path):
    mt = MultiTaskModel(make_base())
    nbytes = max(mt.prepare_task(n, p).nbytes for n, p in world["paths"].items())
    budget_mb = 3.5 * nbytes / 2 ** 20
    with Server(world, "--task-budget-mb", f"{budget_mb:.6f}", "--pin", "task0", "--max-wait-ms", "10") as srv:
        jobs = stream(world, 200, seed=2)
        for task, img, r in run_all(srv.url, jobs, workers=24):
            assert r.status_code == 200, r.text
            oracle.check(task, img, r.json())
        info = httpx.get(srv.url + "/v1/tasks").json()
        assert info["resident_bytes"] <= budget_mb * 2 ** 20
        assert [t["resident"] for t in info["tasks"] if t["name"] == "task0"] == [True]  # pinned
        m = httpx.get(srv.url + "/metrics").text
        assert metric(m, "taps_serve_evictions_total") > 0
        assert metric(m, "taps_serve_cache_misses_total") > 0
        assert metric(m, "taps_serve_loads_total") > 3
    assert srv.proc.returncode in CLEAN_EXIT, srv.log()


def test_add_and_remove_under_load(world, oracle, tmp_path):
    extra = str(tmp_path / "more")
    new_path = write_extra_task(world, extra, "late", seed=999)
    oracle.add("late", new_path)
    with Server(world, "--allow-load-from", extra, "--max-wait-ms", "10") as srv:
        removed_at = [None]
        added = threading.Event()
        stop = threading.Event()
        results = []
        lock = threading.Lock()
        imgs = images(6, seed=3)

        def hammer(k):
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                i = 0
                while not stop.is_set():
                    task = ["task1", "task2", "task3", "base", "late"][(i + k) % 5]
                    if task == "late" and not added.is_set():
                        task = "task4"
                    img = imgs[i % len(imgs)]
                    t_sent = time.monotonic()
                    r = predict(c, task, img)
                    with lock:
                        results.append((task, img, t_sent, r))
                    i += 1

        threads = [threading.Thread(target=hammer, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            r = c.post("/v1/tasks", json={"path": new_path, "load": True})
            assert r.status_code == 201, r.text
            assert r.json()["resident"] is True
            added.set()
            r = c.delete("/v1/tasks/task3")
            assert r.status_code == 200, r.text
            removed_at[0] = time.monotonic()
            time.sleep(1.5)
            stop.set()
            for t in threads:
                t.join()
            assert c.post("/v1/tasks/task3/predict", content=imgs[0]).status_code == 404
            names = {t["name"] for t in c.get("/v1/tasks").json()["tasks"]}
            assert "late" in names and "task3" not in names
        assert len(results) > 50
        for task, img, t_sent, r in results:
            if r.status_code == 404:
                assert task == "task3", (task, r.text)
                continue
            assert r.status_code == 200, (task, r.status_code, r.text)
            if task == "task3":
                assert t_sent < removed_at[0], "answered for a task after its removal returned"
            oracle.check(task, img, r.json())
        assert any(t == "late" and r.status_code == 200 for t, _, _, r in results)
        assert any(t == "task3" and r.status_code == 404 for t, _, _, r in results)
    assert srv.proc.returncode in CLEAN_EXIT, srv.log()


def test_graceful_shutdown_drains(world, oracle):
    srv = Server(world, "--max-wait-ms", "1500", "--max-batch", "64")
    imgs = images(4, seed=4)
    jobs = [(["task0", "task5", "base"][i % 3], imgs[i % 4]) for i in range(24)]
    out = []
    t = threading.Thread(target=lambda: out.extend(run_all(srv.url, jobs, workers=24)))
    t.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # wait until every request is queued in the server
        depth = metric(httpx.get(srv.url + "/metrics").text, "taps_serve_queue_depth")
        if depth >= len(jobs):
            break
        time.sleep(0.02)
    assert srv.stop() in CLEAN_EXIT, srv.log()
    t.join()
    assert len(out) == len(jobs)
    for task, img, r in out:
        assert r.status_code == 200, r.text
        oracle.check(task, img, r.json())


def test_start_refuses_bad_files(world, tmp_path):
    """A task folder with a corrupt file and one for another base: both refused at start, the
    others served; a --pin of a refused task stops the server with the reason."""
    import shutil

    folder = tmp_path / "tasks"
    shutil.copytree(world["tasks_dir"], folder)
    (folder / "junk.safetensors").write_bytes(os.urandom(300))
    write_extra_task(world, str(folder), "other", seed=5, base_seed=7)
    w = dict(world, tasks_dir=str(folder))
    with Server(w) as srv:
        names = {t["name"] for t in httpx.get(srv.url + "/v1/tasks").json()["tasks"]}
        assert names == set(world["names"])
        log = srv.log()
        assert "junk.safetensors" in log and "other.safetensors" in log and "another base" in log
    bad = Server.__new__(Server)
    with pytest.raises(RuntimeError, match="pin"):
        Server.__init__(bad, w, "--pin", "other")
