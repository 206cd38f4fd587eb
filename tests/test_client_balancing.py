"""Clients balance round robin over every address their target resolves to (`dns:///name:port` for a Kubernetes
headless Service, `ipv4:a:p1,b:p2`): two real servers, the CLI's Client and the load generator's channels."""

from __future__ import annotations

import re
import urllib.request

from benchmarks.loadgen import LoadConfig, run_load
from contracts.client import Client
from tests.conftest import running_server, server_config, wait_for


def ok_recommends(server) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    m = re.search(r'livetower_responses_total\{code="OK",method="Recommend"\} ([0-9.e+]+)', text)
    return float(m.group(1)) if m else 0.0


def test_client_and_load_generator_spread_requests_over_every_replica(trained_dir):
    # one after the other: two torch engines deserialised at once in one process trip torch.export's global state
    with running_server(server_config(trained_dir)) as (a, port_a):
        wait_for(lambda: a.manager.stable is not None, 30, "replica a")
        with running_server(server_config(trained_dir)) as (b, port_b):
            wait_for(lambda: b.manager.stable is not None, 30, "replica b")
            spread(a, port_a, b, port_b)


def spread(a, port_a: int, b, port_b: int) -> None:
    """Requests through one channel over both replicas reach both, about evenly."""
    target = f"ipv4:127.0.0.1:{port_a},127.0.0.1:{port_b}"
    client = Client(target)
    client.wait_ready(10)
    for i in range(40):
        assert client.recommend(f"user-{i}", k=5, history=["item-1"]).item_ids
    client.close()
    counts = ok_recommends(a), ok_recommends(b)
    assert sum(counts) == 40 and min(counts) >= 15, counts  # round robin: about half each (not pick_first)
    result = run_load(LoadConfig(target=target, rate=100, duration_s=2.0, warmup_s=0.5, procs=1, channels=1,
                                 users=50, items=250, k=10, mix=(("recommend", 1.0),), progress=False),
                      log=lambda m: None)
    after = ok_recommends(a) - counts[0], ok_recommends(b) - counts[1]
    assert result["errors"]["rate"] == 0 and min(after) >= 0.3 * sum(after), after
