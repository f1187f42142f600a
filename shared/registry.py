"""Where each logical prior is served: the client-side registry of the guidance tier (YAML, validated by pydantic).

    client: {timeout_s: 60, outage_window_s: 120}
    priors:
      analytic:                      # a plain grpcio guidance server
        kind: standalone
        address: 127.0.0.1:50051
      sd:                            # a Ray Serve application behind Serve's gRPC proxy
        kind: serve
        address: guidance-serve.magic3d.svc:9000
        application: latent          # sent as gRPC metadata `application`
        prior: sd-2.1-base           # the prior's name on that server (default: the logical name)
        checkpoint_id: default       # sent in the request and as `multiplexed_model_id` ("<prior>:<checkpoint>")
      sd-in-cluster:                 # the same application called through its DeploymentHandle, no proxy hop:
        kind: serve-handle           # for callers that run inside the Ray cluster (shared/serve_handle.py)
        application: latent
        ray_address: auto            # ray.init's address: "auto" (a raylet on this node) or ray://head:10001
        prior: sd-2.1-base
      text-prior:                    # an alias: swap priors or checkpoints here, never in optimisers
        kind: alias
        target: sd
        checkpoint_id: dreambooth-dog
      cat-toy:                       # textual-inversion embeddings the server knows by name, sent with every request
        kind: alias
        target: sd
        learned_embeddings: [cat-toy]

Optimisers ask for a logical name; `Registry.resolve` turns it into a concrete `Endpoint`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.auth import SERVICE_TOKEN_ENV, ClientTlsConfig
from shared.errors import NotFound

_ADDRESS = r"^[^\s:]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$"


class _Route(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The prior's name on the server; None: the logical name itself.
    prior: str | None = Field(default=None, min_length=1)
    # Checkpoint (multiplexed model id) of that prior; "" or None: the server's default.
    checkpoint_id: str | None = None
    # Textual-inversion embeddings (names the server lists in PriorInfo.learned_embeddings) added to every
    # ComputeSds request through this name; None: the target's.
    learned_embeddings: tuple[str, ...] | None = None


class StandaloneRoute(_Route):
    kind: Literal["standalone"]
    address: str = Field(pattern=_ADDRESS)


class ServeRoute(_Route):
    kind: Literal["serve"]
    address: str = Field(pattern=_ADDRESS)
    application: str = Field(min_length=1)


class ServeHandleRoute(_Route):
    """A Serve application called through its DeploymentHandle from inside the Ray cluster (no gRPC proxy)."""

    kind: Literal["serve-handle"]
    application: str = Field(min_length=1)
    ray_address: str = Field(default="auto", min_length=1)


class AliasRoute(_Route):
    """Another logical name's server, optionally with another prior name or checkpoint on it."""

    kind: Literal["alias"]
    target: str = Field(min_length=1)


Route = Annotated[Union[StandaloneRoute, ServeRoute, ServeHandleRoute, AliasRoute], Field(discriminator="kind")]


class ClientSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Deadline of one attempt of a ComputeSds/ListPriors/CheckPrompt call.
    timeout_s: float = Field(default=60.0, gt=0)
    # How long the tier may stay down (unreachable, restarting, overloaded, a Serve replica dying mid-call) before a
    # call gives up with Unavailable (field "guidance"): such failures are retried with backoff until then, counted
    # from the call's first failure. A restarting replica or a rolling update takes tens of seconds.
    outage_window_s: float = Field(default=120.0, ge=0)
    initial_backoff_s: float = Field(default=0.2, gt=0)
    max_backoff_s: float = Field(default=5.0, gt=0)
    max_message_bytes: int = Field(default=64 * 1024 * 1024, ge=4 * 1024 * 1024)
    # The service token sent as a bearer token (guidance servers check it when they have one): read from
    # `service_token_file`, else this environment variable; unset: none sent.
    service_token_env: str = SERVICE_TOKEN_ENV
    service_token_file: Path | None = None
    tls: ClientTlsConfig | None = None  # the CA of the guidance servers' certificates, when they use TLS

    def service_token(self) -> str | None:
        from shared.auth import AuthConfig

        return AuthConfig(service_token_env=self.service_token_env, service_token_file=self.service_token_file).service_token()


@dataclass(frozen=True)
class Endpoint:
    """Where and how to call one logical prior."""

    logical_name: str
    kind: Literal["standalone", "serve", "serve-handle"]
    address: str  # host:port; for serve-handle, the Ray address
    prior: str
    checkpoint_id: str = ""
    application: str | None = None
    learned_embeddings: tuple[str, ...] = ()

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """gRPC metadata for this endpoint: Serve's application and multiplexed model id; none for standalone."""
        if self.kind != "serve":
            return ()
        return (
            ("application", self.application or ""),
            ("multiplexed_model_id", f"{self.prior}:{self.checkpoint_id or 'default'}"),
        )


class Registry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    priors: dict[str, Route] = Field(min_length=1)
    client: ClientSettings = ClientSettings()

    @model_validator(mode="after")
    def _aliases_resolve(self) -> "Registry":
        for name in self.priors:
            self.resolve(name)  # raises on unknown targets and cycles
        return self

    def resolve(self, name: str) -> Endpoint:
        """Follows aliases (the nearest alias's prior/checkpoint wins) to a concrete endpoint."""
        seen: list[str] = []
        prior: str | None = None
        checkpoint: str | None = None
        embeddings: tuple[str, ...] | None = None
        current = name
        while True:
            if current in seen:
                raise ValueError(f"alias cycle: {' -> '.join([*seen, current])}")
            seen.append(current)
            route = self.priors.get(current)
            if route is None:
                known = ", ".join(sorted(self.priors))
                if len(seen) == 1:
                    raise NotFound(f"no route for prior {name!r}; known: {known}", "prior")
                raise ValueError(f"alias {seen[-2]!r} points at unknown prior {current!r}; known: {known}")
            prior = prior if prior is not None else route.prior
            checkpoint = checkpoint if checkpoint is not None else route.checkpoint_id
            embeddings = embeddings if embeddings is not None else route.learned_embeddings
            if isinstance(route, AliasRoute):
                current = route.target
                continue
            return Endpoint(
                logical_name=name,
                kind=route.kind,
                address=route.ray_address if isinstance(route, ServeHandleRoute) else route.address,
                prior=prior or current,
                checkpoint_id=checkpoint or "",
                application=route.application if isinstance(route, (ServeRoute, ServeHandleRoute)) else None,
                learned_embeddings=tuple(embeddings or ()),
            )

    def names(self) -> list[str]:
        return sorted(self.priors)

    @classmethod
    def load(cls, path: str | Path) -> "Registry":
        return cls.model_validate(yaml.safe_load(Path(path).read_text()))

    @classmethod
    def from_yaml(cls, text: str) -> "Registry":
        return cls.model_validate(yaml.safe_load(text))
