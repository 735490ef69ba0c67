"""A mesh over two processes (``jax.distributed.initialize`` through ``jaxkv generate
--coordinator``): two processes of 4 simulated CPU devices each run the same command on a 2x4
mesh, their collectives over gloo, as two hosts would; both print the single-device tokens.
And the usage errors of the process arguments, before anything is loaded."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from jaxkv import cli
from jaxkv.engine import generate

PROMPT = "One,two,three,four,"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_generate_what_one_device_does(cli_model):
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    argv = [
        sys.executable, "-m", "jaxkv", "generate", "--raw", PROMPT, "--max-new-tokens", "8",
        "--json", "--quiet", "--cache", "paged", "--mesh", "data=2,tensor=4",
        "--mesh-indivisible", "replicate", "--coordinator", f"127.0.0.1:{_free_port()}",
        "--num-processes", "2",
    ]  # fmt: skip
    processes = [
        subprocess.Popen(
            [*argv, "--process-id", str(rank)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (1, 0)
    ]
    records = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=600)
            assert process.returncode == 0, err[-4000:]
            records.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    expected = generate(cli_model, [PROMPT], max_new_tokens=8, cache="paged").generations[0]
    for record in records:
        assert record["token_ids"] == expected.token_ids
        assert record["text"] == expected.text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--process-id", "1"], "expected --coordinator HOST:PORT"),
        (["--coordinator", "h:1", "--num-processes", "2"], "expected --mesh"),
        (["--coordinator", "h:1", "--mesh", "data=2"], "--num-processes of at least 2"),
        (
            [
                "--coordinator",
                "h:1",
                "--mesh",
                "data=2",
                "--num-processes",
                "2",
                "--process-id",
                "2",
            ],
            "expected an id in [0, 2)",
        ),
    ],
)
def test_process_arguments_are_checked_before_loading(capsys, no_loading, argv, message):
    assert cli.main(["generate", "hi", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err, err
