"""``fedbip simulate --engine flower``: the run on Flower's Simulation Engine, on this machine.

One virtual SuperNode per client (the engine gives node i ``partition-id=i``), the ClientApps run by
Flower's Ray backend, the ServerApp in this process. The same apps serve a real deployment. With
several seeds, each seed is one Flower run, written where the in-process loop writes it
(``runner.simulate`` with this engine: ``OUT/seed-<s>`` and the aggregate over seeds).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedbip_cli.errors import FedbipError
from fedbip_cli.simulate.loop import SimulationConfig
from fedbip_cli.simulate.runner import BASE, SimulationResult, simulate


def simulate_on_flower(
    config: SimulationConfig,
    out: Path,
    *,
    seed_list: Sequence[int] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    cpus_per_client: float = 1.0,
    round_timeout: float = 600.0,
) -> SimulationResult:
    """Run every strategy of ``config`` on Flower's Simulation Engine and write ``simulate``'s outputs.

    Args:
        config: the run's options; one virtual SuperNode is started per client.
        out: the output directory (refused when not empty, unless ``overwrite``).
        seed_list: run each of these seeds (one Flower run each) instead of ``config.seed``.
        resume: continue each seed's strategies from their checkpoints in ``out`` (written by either engine).
        cpus_per_client: CPUs Ray reserves for each ClientApp (how many train at once).
        round_timeout: seconds to wait for a round's replies.
    """

    def one_seed(config: SimulationConfig, work: Path, final: Path, resume: bool, *_: Any) -> dict[str, Any]:
        options = {"resume": resume, "round_timeout": round_timeout, "base_path": final / BASE}
        return _one_run(config, work, cpus_per_client=cpus_per_client, **options)

    return simulate(
        config, Path(out), seed_list=seed_list, resume=resume, overwrite=overwrite, device="cpu", engine=one_seed
    )


def _one_run(config: SimulationConfig, out: Path, *, cpus_per_client: float, **options: Any) -> dict[str, Any]:
    """One Flower run of ``config`` into ``out`` (``run_federation``'s ``options``); returns its summary."""
    # flwr is imported here: `fedbip simulate` without --engine flower needs no flwr.
    from flwr.simulation import run_simulation

    from fedbip_cli.simulate.flower.apps import client_app, expected_clients, make_server_app

    outcome: list[SimulationResult | FedbipError] = []
    server_app = make_server_app(config, out, outcome, **options)
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=expected_clients(config),
        backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0}},
    )
    if not outcome:
        raise FedbipError("the Flower simulation ended without a result", hint="see Flower's log above for why")
    if isinstance(outcome[0], FedbipError):
        raise outcome[0]
    return outcome[0].summary
