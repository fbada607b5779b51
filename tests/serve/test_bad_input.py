"""A server answers bad requests with the right 4xx naming the problem, refuses bad task files
at load, answers a full queue with 503 + Retry-After, and still answers good requests correctly
after hundreds of bad ones."""
import base64
import io
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from serve_helpers import CLEAN_EXIT, Oracle, Server, images, predict, write_extra_task, write_world

pytestmark = pytest.mark.slow

LIMIT_MB = 0.25


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("serve_bad"), n_tasks=4)


@pytest.fixture(scope="module")
def extra(world):
    folder = os.path.join(world["root"], "uploads")
    write_extra_task(world, folder, "other_base", seed=3, base_seed=11)
    write_extra_task(world, folder, "fine", seed=4)
    with open(os.path.join(folder, "corrupt.safetensors"), "wb") as f:
        f.write(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}" + os.urandom(64))
    with open(os.path.join(world["root"], "outside.safetensors"), "wb") as f:
        f.write(b"x")
    return folder


@pytest.fixture(scope="module")
def server(world, extra):
    srv = Server(world, "--max-body-mb", str(LIMIT_MB), "--allow-load-from", extra, "--max-queue", "4",
                 "--max-wait-ms", "30")
    yield srv
    assert srv.stop() in CLEAN_EXIT, srv.log()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def jpeg():
    return images(1, seed=0)[0]  # images(…)[0] is a JPEG


def detail(r):
    return r.json()["detail"]


BAD_PREDICTS = [
    # (what, request kwargs, status, words the message must contain)
    ("unknown task", dict(task="nope", content=b"x"), 404, "unknown task 'nope'"),
    ("not an image", dict(content=b"hello, world"), 400, "not an image"),
    ("empty body", dict(content=b""), 400, "no image"),
    ("truncated JPEG", dict(content=None), 400, "truncated"),
    ("wrong media type", dict(content=b"abc", headers={"content-type": "text/plain"}), 415, "text/plain"),
    ("JSON of the wrong form", dict(json={"picture": "abc"}), 422, "image"),
    ("JSON, not base64", dict(json={"image": "***"}), 422, "base64"),
    ("JSON, bad top_k", dict(json={"image": "aGk=", "top_k": 0}), 422, "top_k"),
    ("invalid JSON", dict(content=b"{not json", headers={"content-type": "application/json"}), 422, "JSON"),
    ("JSON array", dict(content=b"[1, 2]", headers={"content-type": "application/json"}), 422, "PredictJSON"),
    ("multipart without image", dict(files={"other": ("a.txt", b"abc", "text/plain")}), 400, "'image'"),
    ("oversize body", dict(content=b"\xff" * int(LIMIT_MB * 2 ** 20 + 10)), 413, "at most"),
    ("oversize streamed body", dict(content="stream"), 413, "limit"),
    ("top_k out of range", dict(params={"top_k": "0"}), 422, "top_k"),
]


def send_bad(client, what, kw):
    kw = dict(kw)
    task = kw.pop("task", "task0")
    if what == "truncated JPEG":
        kw["content"] = jpeg()[: len(jpeg()) // 2]
    if kw.get("content") == "stream":
        kw["content"] = (b"\xff" * 65536 for _ in range(8))
    if what == "top_k out of range":
        kw["content"] = jpeg()
    if "headers" not in kw and "content" in kw:
        kw["headers"] = {"content-type": "application/octet-stream"}
    return client.post(f"/v1/tasks/{task}/predict", **kw)


@pytest.mark.parametrize("what,kw,status,words", BAD_PREDICTS, ids=[b[0] for b in BAD_PREDICTS])
def test_bad_predict(client, what, kw, status, words):
    r = send_bad(client, what, kw)
    assert r.status_code == status, (what, r.status_code, r.text)
    assert words.lower() in str(detail(r)).lower(), (what, r.text)


def test_good_forms(world, client):
    """The three request forms give the same answer."""
    oracle = Oracle(world)
    img = jpeg()
    raw = predict(client, "task1", img).json()
    form = client.post("/v1/tasks/task1/predict", files={"image": ("x.jpg", img, "image/jpeg")},
                       params={"logits": "true"}).json()
    js = client.post("/v1/tasks/task1/predict",
                     json={"image": base64.b64encode(img).decode(), "logits": True, "top_k": 3}).json()
    for a in (raw, form, js):
        oracle.check("task1", img, a)
    assert len(js["top_k"]) == 3 and raw["logits"] == form["logits"] == js["logits"]


def test_bad_task_files(client, extra, world):
    def add(**body):
        return client.post("/v1/tasks", json=body)

    r = add(path=os.path.join(extra, "other_base.safetensors"))
    assert r.status_code == 409 and "another base" in detail(r), r.text
    r = add(path=os.path.join(extra, "corrupt.safetensors"))
    assert r.status_code == 422 and "corrupt" in detail(r), r.text
    r = add(path=os.path.join(extra, "missing.safetensors"))
    assert r.status_code == 422 and "missing.safetensors" in detail(r), r.text
    r = add(path=os.path.join(world["root"], "outside.safetensors"))
    assert r.status_code == 403 and "outside" in detail(r), r.text
    r = add(path=os.path.join(extra, "fine.safetensors"), name="task0")
    assert r.status_code == 409 and "exists" in detail(r), r.text
    r = add(path=os.path.join(extra, "fine.safetensors"), name="base")
    assert r.status_code == 422, r.text
    r = add(pth="x")
    assert r.status_code == 422 and "path" in detail(r), r.text
    r = client.delete("/v1/tasks/nope")
    assert r.status_code == 404, r.text
    names = {t["name"] for t in client.get("/v1/tasks").json()["tasks"]}
    assert names == set(world["names"]), "a refused task file changed the server's tasks"
    r = add(path=os.path.join(extra, "fine.safetensors"))
    assert r.status_code == 201 and r.json()["name"] == "fine", r.text
    assert client.delete("/v1/tasks/fine").status_code == 200


def test_still_correct_after_many_bad(world, client):
    oracle = Oracle(world)
    for i in range(300):
        what, kw, status, _ = BAD_PREDICTS[i % len(BAD_PREDICTS)]
        assert send_bad(client, what, kw).status_code == status
    imgs = images(6, seed=8)
    for i, img in enumerate(imgs):
        task = ["task0", "task1", "task2", "task3", "base"][i % 5]
        r = predict(client, task, img)
        assert r.status_code == 200, r.text
        oracle.check(task, img, r.json())
    m = client.get("/metrics").text
    assert 'status="400"' in m and 'status="404"' in m and 'task="<unknown>"' in m


def test_full_queue_answers_503_at_once(world, server):
    oracle = Oracle(world)
    img = jpeg()
    with httpx.Client(base_url=server.url, timeout=60, limits=httpx.Limits(max_connections=64)) as c:
        with ThreadPoolExecutor(64) as ex:
            rs = list(ex.map(lambda i: predict(c, f"task{i % 4}", img), range(128)))
    codes = {r.status_code for r in rs}
    assert codes <= {200, 503}, codes
    full = [r for r in rs if r.status_code == 503]
    assert full, "a queue of 4 never filled under 64 concurrent clients"
    assert all(r.headers.get("retry-after") and "queue is full" in detail(r) for r in full)
    for i, r in enumerate(rs):
        if r.status_code == 200:
            oracle.check(f"task{i % 4}", img, r.json())


def test_decompression_bomb(client):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (12000, 9000)).save(buf, format="PNG")  # 108M pixels in a few kB
    r = client.post("/v1/tasks/task0/predict", content=buf.getvalue(),
                    headers={"content-type": "image/png"})
    assert r.status_code == 400 and "pixels" in detail(r), r.text
