"""The Ray Serve deployment: 2 replicas on a local Ray instance answer the oracle test."""
import pytest

from serve_helpers import ARCH, CLASSES, SIZE, Oracle, free_port, images, predict, write_world, zipf

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

pytestmark = pytest.mark.slow


def test_two_replicas_answer_the_oracle(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from taps_fast.serve import ServeConfig
    from taps_fast.serve.ray_app import build_deployment

    world = write_world(tmp_path, n_tasks=16)
    oracle = Oracle(world)
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cfg = ServeConfig(model=ARCH, base_weights=world["base"], num_classes=CLASSES, img_size=SIZE,
                          tasks=[world["tasks_dir"]], max_wait_ms=10)
        serve.run(build_deployment(cfg, num_replicas=2, num_cpus=1), name="taps", route_prefix="/")
        status = serve.status().applications["taps"]
        replicas = status.deployments["taps_fast_serve"].replica_states
        assert replicas.get("RUNNING") == 2, replicas
        imgs = images(16, seed=6)
        tasks = zipf(world["names"], 160, seed=3)
        jobs = [("base" if i % 9 == 0 else t, imgs[i % len(imgs)]) for i, t in enumerate(tasks)]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            with ThreadPoolExecutor(16) as ex:
                rs = list(ex.map(lambda j: predict(c, *j), jobs))
            for (task, img), r in zip(jobs, rs):
                assert r.status_code == 200, r.text
                oracle.check(task, img, r.json())
            assert c.post("/v1/tasks/nope/predict", content=imgs[0]).status_code == 404
            assert c.get("/healthz").status_code == 200
    finally:
        serve.shutdown()
        ray.shutdown()
