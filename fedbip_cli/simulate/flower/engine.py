"""``fedbip simulate --engine flower``: the run on Flower's Simulation Engine, on this machine.

One virtual SuperNode per client (the engine gives node i ``partition-id=i``), the ClientApps run by
Flower's Ray backend, the ServerApp in this process. The same apps serve a real deployment.
"""

from __future__ import annotations

from pathlib import Path

from fedbip_cli.errors import FedbipError
from fedbip_cli.simulate.loop import SimulationConfig, check_out
from fedbip_cli.simulate.runner import SimulationResult


def simulate_on_flower(
    config: SimulationConfig,
    out: Path,
    *,
    overwrite: bool = False,
    cpus_per_client: float = 1.0,
    round_timeout: float = 600.0,
) -> SimulationResult:
    """Run every strategy of ``config`` on Flower's Simulation Engine and write ``simulate``'s outputs.

    Args:
        config: the run's options; one virtual SuperNode is started per client.
        out: the output directory (refused when not empty, unless ``overwrite``).
        cpus_per_client: CPUs Ray reserves for each ClientApp (how many train at once).
        round_timeout: seconds to wait for a round's replies.
    """
    check_out(Path(out), resume=False, overwrite=overwrite)
    # flwr is imported here: `fedbip simulate` without --engine flower needs no flwr.
    from flwr.simulation import run_simulation

    from fedbip_cli.simulate.flower.apps import client_app, expected_clients, make_server_app

    results: list[SimulationResult] = []
    server_app = make_server_app(
        config, Path(out), overwrite=overwrite, round_timeout=round_timeout, collect=results.append
    )
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=expected_clients(config),
        backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0}},
    )
    if not results:
        raise FedbipError("the Flower simulation ended without a result", hint="see Flower's log above for why")
    return results[0]
