"""Several nodes, simulated on one machine: two `torchrun --nnodes 2 --node_rank {0,1}` launches of one process each
(CPU, gloo, a loopback rendezvous). Training stopped and resumed with `latest` on two nodes ends bit-identical to the
same number of processes on one node; generate.py on two nodes writes the one-process .npz byte for byte; an output
folder that the nodes do not share stops every process with one line instead of a hang."""
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import (TREE, gen_sh_arguments, gen_sh_torchrun_arguments, generate_argv, run_script, shared_behaviour,
                      the_npz)
from test_train import checkpoint, loss_log, train_args
from test_train_resume import DIST_ENV, assert_same_state, torchrun


FAILED_NODE_GRACE_S = 30


def free_port():
    """A free port below the kernel's ephemeral range: a port the kernel handed out (bind to 0) may be given again to
    another test's outgoing connection before node 0 binds it, and node 1 then waits for a store that never starts."""
    first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.Random().sample(range(max(1024, first_ephemeral - 8000), first_ephemeral), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def two_nodes(tmp_path, argv_of_node, env=None, timeout=300):
    """Launches torchrun for node 0 and node 1 at once, one process each, with node_rank's argv; waits for both. Once
    one has failed, the other gets FAILED_NODE_GRACE_S to end (a failed node leaves the other's torchrun at its exit
    barrier for 300 s), then is killed (its code: None). A crash's Python stack is in the log (faulthandler).

    Returns [(returncode, stdout + stderr)] of node 0 and node 1."""
    port, logs, launches = free_port(), [], []
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **(env or {})}
    for node_rank in (0, 1):
        log = (tmp_path / f"node{node_rank}.log").open("w")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
               *argv_of_node(node_rank)]
        launches.append(subprocess.Popen(cmd, cwd=TREE, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True))  # killed with its workers below
        logs.append(log)
    deadline = time.monotonic() + timeout
    try:
        codes = [launch.poll() for launch in launches]
        while None in codes and time.monotonic() < deadline:
            if any(codes):
                deadline = min(deadline, time.monotonic() + FAILED_NODE_GRACE_S)
            time.sleep(0.2)
            codes = [launch.poll() for launch in launches]
    finally:
        for launch, log in zip(launches, logs):
            with contextlib.suppress(ProcessLookupError):  # torchrun and any worker it left behind
                os.killpg(launch.pid, signal.SIGKILL)
            launch.wait()
            log.close()
    outputs = [(tmp_path / f"node{r}.log").read_text() for r in (0, 1)]
    assert codes != [None, None], f"two nodes still running after {timeout} s (port {port}):\n" + "\n".join(
        f"--- node {r}:\n{output[-3000:]}" for r, output in enumerate(outputs))
    return list(zip(codes, outputs))


def assert_succeeded(results):
    for node_rank, (code, output) in enumerate(results):
        assert code == 0, f"node {node_rank} failed ({code}):\n{output[-4000:]}"


def test_two_nodes_train_and_resume_like_one_node(tmp_path, latent_data_dir):
    one_node, two = tmp_path / "one", tmp_path / "two"
    steps = ["--batch-size", "2", "--checkpoint-steps", "2"]
    run_script(*torchrun(*train_args(one_node, latent_data_dir, *steps, "--max-train-steps", "4")), env=DIST_ENV)
    assert_succeeded(two_nodes(tmp_path, lambda node: train_args(two, latent_data_dir, *steps, "--max-train-steps", "2"),
                               env=DIST_ENV))
    assert_succeeded(two_nodes(tmp_path, lambda node: train_args(two, latent_data_dir, *steps, "--max-train-steps", "4",
                                                                 "--resume-ckpt", "latest"), env=DIST_ENV))
    a, b = checkpoint(one_node, "step-4.pt"), checkpoint(two, "step-4.pt")
    assert len(b["rng"]) == 2
    assert_same_state(a, b)
    assert loss_log(one_node) == loss_log(two)
    assert sorted(p.name for p in (two / "exp").iterdir()) == sorted(p.name for p in (one_node / "exp").iterdir())


def test_two_nodes_generate_the_one_process_npz(tmp_path, ckpt, tiny_vae_dir, base_run):
    sample_dir = tmp_path / "samples"
    assert_succeeded(two_nodes(tmp_path, lambda node: generate_argv(ckpt, sample_dir, tiny_vae_dir)))
    npz, _ = the_npz(sample_dir)
    assert npz.name == base_run[0].name and npz.read_bytes() == base_run[0].read_bytes()


def assert_one_line_on_every_node(results, flag, folder_of_node1):
    for node_rank, (code, output) in enumerate(results):
        errors = [line for line in output.splitlines() if line.startswith("error: ")]
        assert code != 0 and len(errors) == 1, f"node {node_rank}:\n{output[-4000:]}"
        assert f"process 1 on {socket.gethostname()} cannot see the files process 0" in errors[0]
        assert f"{flag} must be on a filesystem every node shares" in errors[0]
        assert "(exitcode: 2)" in output and "terminate called" not in output  # exits 2, no abort at the exit
    assert not any(Path(folder_of_node1).rglob(".shared-check-*"))


@shared_behaviour
def test_training_folder_not_shared_stops_every_node_with_one_line(tmp_path, latent_data_dir):
    """Each node gets its own --output-dir, as when it is on each node's local disk."""
    results = two_nodes(tmp_path, lambda node: train_args(tmp_path / f"local{node}", latent_data_dir,
                                                          "--batch-size", "2", "--max-train-steps", "1"),
                        env=DIST_ENV, timeout=120)
    assert_one_line_on_every_node(results, "--output-dir", tmp_path / "local1")
    assert not (tmp_path / "local0" / "exp" / "checkpoints" / "latest").exists()


@shared_behaviour
def test_sample_folder_not_shared_stops_every_node_with_one_line(tmp_path, ckpt, tiny_vae_dir):
    results = two_nodes(tmp_path, lambda node: generate_argv(ckpt, tmp_path / f"local{node}", tiny_vae_dir),
                        timeout=120)
    assert_one_line_on_every_node(results, "--sample-dir", tmp_path / "local1")
    assert not list((tmp_path / "local0").rglob("*.png"))


def test_gen_sh_launches_one_node_of_several(tmp_path):
    recorded = gen_sh_torchrun_arguments(tmp_path, NNODES="2", NODE_RANK="1", MASTER_ADDR="node0.cluster")
    assert recorded[:6] == ["--nnodes=2", "--node_rank=1", "--master_addr=node0.cluster", "--master_port=29500",
                            "--nproc_per_node=4", "generate.py"]
    assert recorded[6:] == gen_sh_arguments(tmp_path)  # the same generate.py command as on one node
