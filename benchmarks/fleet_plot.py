"""The fleet benchmark's figure (benchmarks/fleet_bench.py): follow times per phase and CPU per request."""

from __future__ import annotations

from pathlib import Path


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.5))
    ro = results.get("rollout", {})
    for label, key in (("canary serving\n(from its decision)", "canary_serving"),
                       ("promoted serving\n(from the decision)", "promoted_serving")):
        per = (ro.get(key) or {}).get("per_replica_s", {})
        ax1.scatter([label] * len(per), list(per.values()), s=40)
        for rep, t in per.items():
            ax1.annotate(f"r{rep}", (label, t), textcoords="offset points", xytext=(6, 0), fontsize=8)
    ax1.set_ylabel("seconds until the replica reports it")
    ax1.set_title(f"rollout under load ({ro.get('decision', '?')} by {ro.get('decided_by', '?')})")
    names, values = [], []
    for phase, key in (("kill: restart to\nserving", ("kill", "restart_to_serving_s")),
                       ("holder killed:\ntakeover", ("holder", "takeover_s")),
                       ("cut: converged\nafter restore", ("cut", "converged_after_restore_s"))):
        v = results.get(key[0], {}).get(key[1])
        if v is not None:
            names.append(phase)
            values.append(v)
    ax2.bar(names, values, color="tab:orange")
    ax2.set_ylabel("seconds")
    ax2.set_title("faults")
    cpu = results.get("cpu", {})
    labels = [k for k in cpu if k != "idle_cpu_s_per_s"]
    x = list(range(len(labels)))
    for j, (offset, name) in enumerate(((-0.3, "at rate/2"), (-0.1, "at 1.5 x rate"))):
        ax3.bar([i + offset for i in x], [cpu[k]["runs"][j]["cpu_ms_per_request"] or 0 for k in labels], 0.2,
                label=f"all CPU / requests {name}")
    ax3.bar([i + 0.1 for i in x], [cpu[k]["marginal_cpu_ms_per_request"] or 0 for k in labels], 0.2,
            label="marginal (slope between the two)")
    ax3.set_xticks(x, labels)
    ax3.legend(fontsize=7)
    ax3.set_ylabel("server CPU ms per request (all replicas)")
    ax3.set_title("CPU per request, same offered load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
