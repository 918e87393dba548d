"""build_app: the builder that deploy/config.yaml names (`import_path: deploy.app:build_app`).

Validates the YAML's args, inspects the checkpoint (the embedded demo model when none is
named) once, settles the device once, and sizes the replica's placement group from them:
bundle 0 for the replica, one bundle per model-parallel rank; a group the cluster's nodes could
never hold is refused here, naming what it needs and what the nodes have. Serve options given in the YAML
(num_replicas, ray_actor_options, health checks) are applied by Serve on top of these. With
`prefix_routing: true`, HTTP goes to LlamaIngress (deploy/ingress.py) in front of the gangs.
"""
from __future__ import annotations

import ray
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from cluster.placement import check_possible, plan_bundles, settle_device
from deploy.ingress import LlamaIngress
from deploy.server import LlamaDeployment, LlamaGangs
from deploy.settings import AppArgs


def build_app(raw_args: dict) -> Application:
    return application(AppArgs.parse(raw_args))


def application(args: AppArgs, num_replicas: int | None = None) -> Application:
    """The application `args` describe; num_replicas: the gangs' replicas (None: Serve's, or
    the YAML's `deployments:` section), for tests and benches that have no YAML."""
    parallel = settle_device(args.parallel)
    # Fail here, with the file and the fix named, rather than inside N rank actors.
    gang = args.gang_config(parallel)
    bundles = plan_bundles(parallel, replica_cpus=args.replica_cpus)
    if ray.is_initialized() and not parallel.autoscaling:  # `serve run` builds the app on the cluster
        check_possible(bundles, parallel.placement_strategy, ray.nodes())  # rather than wait forever
    options = dict(
        placement_group_bundles=bundles,
        placement_group_strategy=parallel.placement_strategy,
        ray_actor_options={"num_cpus": args.replica_cpus},
        # Above the replica's own bound (max_batch_size running + max_waiting queued), so that
        # requests past it reach the replica and get a 429 at once instead of queueing unbounded
        # in Serve's router; the rest is room for /health and /cluster.
        max_ongoing_requests=args.engine.max_batch_size + args.engine.max_waiting + 16,
        **({} if num_replicas is None else {"num_replicas": num_replicas}),
    )
    if not args.prefix_routing:  # $api_keys_env is read in the replica, not here
        return LlamaDeployment.options(**options).bind(gang, args.model, args.api_key_source())
    # The proxy's requests go to LlamaIngress, whose handle to the gangs routes by prefix.
    router = RequestRouterConfig(request_router_class="deploy.routing:PrefixAffinityRouter",
                                 request_routing_stats_period_s=1)
    gangs = LlamaGangs.options(request_router_config=router, **options).bind(gang, args.model, args.api_key_source())
    return LlamaIngress.bind(gangs, gang, args.model, args.api_key_source())
