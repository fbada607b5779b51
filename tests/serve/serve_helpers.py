"""What the server tests share: a small base and its task files on disk, a real server process on
a free loopback port, and the oracle (each task's own converted model, float64)."""
from __future__ import annotations

import copy
import io
import os
import random
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional

import httpx
import timm
import torch
from safetensors.torch import save_file

from taps_fast import convert, load_task, save_task, taps_layers

from helpers import RTOL_MODEL, rel_err

ARCH, SIZE, CLASSES = "test_resnet", 32, 5
# A server stopped by SIGTERM drains, then exits by the signal (uvicorn re-raises it once shut down).
CLEAN_EXIT = (0, -signal.SIGTERM)


def make_base(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(ARCH, pretrained=False, num_classes=CLASSES).eval()


def make_task(base: torch.nn.Module, seed: int, classes: int) -> torch.nn.Module:
    """A converted copy of ``base`` with its own head, every third layer closed, random deltas,
    norm state and head."""
    m = copy.deepcopy(base)
    m.reset_classifier(classes)
    m = convert(m)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, (_, layer) in enumerate(taps_layers(m)):
            closed = (i + seed) % 3 == 0
            layer.score.fill_(0.02 if closed else 0.3)
            layer.delta.copy_(0 if closed else torch.randn(layer.delta.shape, generator=g) * 0.05)
        for mod in m.modules():
            if "Norm" in type(mod).__name__:
                for p in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
                    if p.is_floating_point():
                        p.add_(torch.rand(p.shape, generator=g) * 0.2)
        head = m.get_classifier()
        head.weight.copy_(torch.randn(head.weight.shape, generator=g))
    return m.eval()


def write_world(root, n_tasks: int = 18, base_seed: int = 0, prefix: str = "task") -> Dict:
    """``root``/base.safetensors and ``root``/tasks/<prefix><i>.safetensors (every other task
    with class names); returns their paths and names."""
    root = str(root)
    os.makedirs(os.path.join(root, "tasks"), exist_ok=True)
    base = make_base(base_seed)
    base_path = os.path.join(root, "base.safetensors")
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, base_path)
    names, paths = [], []
    for i in range(n_tasks):
        classes = 3 + i % 6
        t = make_task(base, seed=100 + i, classes=classes)
        name = f"{prefix}{i}"
        path = os.path.join(root, "tasks", f"{name}.safetensors")
        save_task(t, path, labels=[f"{name}-class{c}" for c in range(classes)] if i % 2 == 0 else None)
        names.append(name)
        paths.append(path)
    return {"root": root, "base": base_path, "tasks_dir": os.path.join(root, "tasks"), "names": names,
            "paths": dict(zip(names, paths))}


def write_extra_task(world: Dict, folder: str, name: str, seed: int, base_seed: int = 0) -> str:
    """Another task file, for ``base_seed``'s base, in ``folder``."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.safetensors")
    save_task(make_task(make_base(base_seed), seed=seed, classes=4), path)
    return path


def images(n: int, seed: int = 0) -> List[bytes]:
    """``n`` small PNG and JPEG images of various sizes."""
    from PIL import Image

    rng = random.Random(seed)
    out = []
    for i in range(n):
        w, h = rng.randint(24, 64), rng.randint(24, 64)
        g = torch.Generator().manual_seed(seed * 1000 + i)
        arr = (torch.rand(h, w, 3, generator=g) * 255).byte().numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG" if i % 2 else "JPEG")
        out.append(buf.getvalue())
    return out


class Oracle:
    """Each task's own model (the base converted, the task file loaded; float64) on the image as
    the server pre-processes it."""

    def __init__(self, world: Dict) -> None:
        from taps_fast.serve.processing import Preprocessor
        from taps_fast.serve.service import ServeConfig, data_config

        base = make_base()
        self.pre = Preprocessor(data_config=data_config(ServeConfig(model=ARCH, img_size=SIZE), base))
        self.models = {"base": base.double()}
        self.paths = dict(world["paths"])
        self._x: Dict[bytes, torch.Tensor] = {}

    def add(self, name: str, path: str) -> None:
        self.paths[name] = path
        self.models.pop(name, None)

    def model(self, task: str) -> torch.nn.Module:
        if task not in self.models:
            from taps_fast.checkpoint import TaskFile

            header = TaskFile(self.paths[task]).header
            classes = header["state/fc.weight"][0][0]
            m = make_base()
            m.reset_classifier(classes)
            self.models[task] = load_task(convert(m), self.paths[task]).double().eval()
        return self.models[task]

    def logits(self, task: str, img: bytes) -> torch.Tensor:
        if img not in self._x:
            self._x[img] = self.pre(img)
        with torch.no_grad():
            return self.model(task)(self._x[img][None].double())[0]

    def check(self, task: str, img: bytes, answer: Dict) -> None:
        assert answer["task"] == task, answer
        got = torch.tensor(answer["logits"], dtype=torch.float64)
        want = self.logits(task, img)
        assert got.shape == want.shape, (task, got.shape, want.shape)
        err = rel_err(got, want)
        assert err <= RTOL_MODEL[torch.float32], f"task {task}: relative error {err:.3g} against its own model"
        probs = torch.softmax(got, 0)
        top = answer["top_k"]
        assert [p["index"] for p in top] == probs.topk(len(top)).indices.tolist(), (task, top)
        assert abs(top[0]["prob"] - float(probs.max())) < 1e-5, (task, top)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``taps-fast serve`` in a subprocess on 127.0.0.1:<free port>; ``stop()`` sends SIGTERM."""

    def __init__(self, world: Dict, *extra: str, tasks: bool = True, log_path: Optional[str] = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "taps_fast.serve", "--model", ARCH, "--base-weights", world["base"],
               "--num-classes", str(CLASSES), "--img-size", str(SIZE), "--port", str(self.port),
               "--log-level", "warning", *(["--tasks", world["tasks_dir"]] if tasks else []), *extra]
        self.log_path = log_path or os.path.join(world["root"], f"server-{self.port}.log")
        self._log = open(self.log_path, "w")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.log()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"the server did not start:\n{self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path) as f:
            return f.read()[-5000:]

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def zipf(names: List[str], n: int, seed: int) -> List[str]:
    rng = random.Random(seed)
    return rng.choices(names, [1.0 / (i + 1) for i in range(len(names))], k=n)


def predict(client: httpx.Client, task: str, img: bytes, **params) -> httpx.Response:
    return client.post(f"/v1/tasks/{task}/predict", content=img, params={"logits": "true", **params},
                       headers={"content-type": "application/octet-stream"})


def metric(text: str, name: str) -> float:
    """The sum of a Prometheus metric's samples (every label set)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total
