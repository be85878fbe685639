"""The two-node topology the cluster tests run on: the head does no work, and what the worker node
writes to its disk (temp folder, the tests' output root) is invisible on the head, as on separate machines."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

PROBE = """
import json, os, tempfile, ray
ray.init(logging_level="ERROR")

@ray.remote(num_cpus=1)
def write(path):
    with open(path, "w") as f:
        f.write("from the worker node")
    return {{"node": ray.get_runtime_context().get_node_id(), "tmp": tempfile.gettempdir()}}

@ray.remote(num_cpus=1)
def exists(path):
    return os.path.exists(path)

wrote = ray.get(write.remote({path!r}))
nodes = {{n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}}
print(json.dumps({{**wrote, "seen_there": ray.get(exists.remote({path!r})), "nodes": nodes}}))
"""


def test_worker_node_disk_is_private_and_head_does_no_work(ray_cluster):
    path = ray_cluster.outputs / "written-on-worker.txt"
    result = ray_cluster.python(PROBE.format(path=str(path)))
    assert result.returncode == 0, result.stderr[-3000:]
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(probe["nodes"]) == 2
    head = [node for node, res in probe["nodes"].items() if res.get("CPU", 0) == 0]
    assert len(head) == 1 and probe["node"] != head[0]  # the CPU task ran on the worker node
    assert probe["nodes"][probe["node"]].get("worker_node") == 1
    assert probe["tmp"] == str(ray_cluster.worker_private)  # its temp folder is the private one
    assert probe["seen_there"]  # the worker node keeps its file ...
    assert not path.exists()  # ... which the head (this process's view) cannot see
    assert not any(ray_cluster.worker_private.iterdir())  # nor anything in the worker's temp folder
