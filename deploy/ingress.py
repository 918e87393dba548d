"""LlamaIngress: the HTTP front of an application whose requests are routed by prefix
(`prefix_routing: true` in deploy/config.yaml's args).

Serve's HTTP proxy hands a replica each request before its body is read, so a router between
the proxy and the gangs never sees a prompt. With prefix routing the proxy's requests go to
this small deployment instead (CPU only, no gang): it parses, checks and tokenises them with
the same routes (deploy/api.py) and the same API keys, then calls a gang's replica
(LlamaDeployment.run) through a handle whose router sees the tokens and prefers the replica
holding the prompt's prefix (deploy/routing.py:PrefixAffinityRouter), as Ray Serve LLM's
ingress does for its LLM servers. It costs one more Ray call per request, and the deltas cross
one more process. GET /health and GET /cluster answer for the replica the router picks.
"""
from __future__ import annotations

from ray import serve

from cluster.config import GangConfig
from deploy.api import build_api
from deploy.auth import ApiKeySource, require_api_keys
from deploy.routed_client import RoutedClient


@serve.deployment(max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0.1})
@serve.ingress()
class LlamaIngress:
    def __init__(self, gangs, gang: GangConfig, model_id: str, api_keys: ApiKeySource = ApiKeySource()):
        self.api_keys = api_keys.load()
        self.client = RoutedClient(gangs)
        self.tokenizer = gang.checkpoint.tokenizer()
        self.model_id = model_id
        self.max_seq_len = gang.engine.max_seq_len

    def __serve_build_asgi_app__(self):
        app = build_api(self.client, self.tokenizer, self.model_id, self.max_seq_len)
        require_api_keys(app, self.api_keys)
        return app
