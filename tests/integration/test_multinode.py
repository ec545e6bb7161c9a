"""Two "nodes" on localhost through Lightning's own launcher: ``lit-unlearn fit --trainer.num_nodes 2
--trainer.devices 1`` started twice (NODE_RANK 0 and 1, MASTER_ADDR/PORT), each from its own
working directory, ends exactly where one node with 2 devices does."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest

from tests.integration.cli_helpers import ENV, TINY, command, results, run, run_dirs, saved_weights

COMMON = ["fit", "--config", TINY, "--trainer.max_steps", "6", "--trainer.strategy", "ddp"]
COMMON += ["--data.forget_batch_size", "4", "--data.retain_batch_size", "4"]
COMMON += ["--model.optimizer", "torch.optim.SGD", "--model.optimizer.init_args.lr", "0.05"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.integration
def test_two_nodes_on_lightnings_launcher_equal_one_node_with_two_devices(tmp_path):
    single = run(
        "lit-unlearn",
        *COMMON,
        "--trainer.devices",
        "2",
        "--trainer.default_root_dir",
        str(tmp_path / "one"),
        timeout=240,
    )
    assert single.returncode == 0, single.stderr[-3000:]

    port = str(_free_port())
    shared = str(tmp_path / "nodes")  # the run directory on a filesystem both nodes see
    procs = []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"  # each node starts from its own folder
        cwd.mkdir()
        env = {**ENV, "NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        env.pop("LOCAL_RANK", None)
        args = [
            *COMMON,
            "--trainer.num_nodes",
            "2",
            "--trainer.devices",
            "1",
            "--trainer.default_root_dir",
            shared,
        ]
        procs.append(
            subprocess.Popen(
                command("lit-unlearn", *args),
                cwd=cwd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=240))
    finally:
        for proc in procs:
            proc.kill()
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]

    (a,), (b,) = run_dirs(str(tmp_path / "one")), run_dirs(shared)
    ra, rb = results(a), results(b)
    assert ra["world_size"] == rb["world_size"] == 2
    manifests = [json.load(open(os.path.join(d, "manifest.json"))) for d in (a, b)]
    assert [m["num_nodes"] for m in manifests] == [1, 2] and [m["world_size"] for m in manifests] == [2, 2]
    assert ra["history"] == rb["history"] and ra["steps"] == rb["steps"] == 6
    wa, wb = saved_weights(a), saved_weights(b)
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)  # bit-identical
    # no node built anything in its working directory: the target and data caches are the machine's
    assert not any(name for node in (0, 1) for name in os.listdir(tmp_path / f"node{node}"))
