"""The models one simulated vLLM server serves: base models and LoRA adapters.

vLLM lists an adapter in `/v1/models` as a model of its own, with `parent` = the base model
and `root` = the adapter's path, and serves it only where it was started with (or loaded)
the adapter: a request naming it elsewhere gets 404 `model_not_found`. Adapters can be added
and removed at runtime (`POST /v1/load_lora_adapter`, `/v1/unload_lora_adapter`), which is
what a router that learns models from `/v1/models` has to follow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from affinity_node.sim.vllm_api import ApiError


@dataclass(frozen=True)
class Adapter:
    name: str
    parent: str
    path: str


def adapter_path(name: str) -> str:
    """Where a command-line adapter pretends to live (vLLM's `root` is the path given)."""
    return f"/adapters/{name}"


class ServedModels:
    """Base models (fixed at start) and adapters (changed at runtime)."""

    def __init__(self, base: Sequence[str], adapters: Mapping[str, str | None]) -> None:
        if not base:
            raise ValueError("a backend serves at least one base model")
        self.base = list(base)
        self._adapters: dict[str, Adapter] = {}
        for name, parent in adapters.items():
            self.load(name, adapter_path(name), parent)

    @property
    def adapters(self) -> list[Adapter]:
        return list(self._adapters.values())

    def names(self) -> list[str]:
        """Every model id a request may name."""
        return [*self.base, *self._adapters]

    def __contains__(self, name: object) -> bool:
        return name in self.base or name in self._adapters

    def base_of(self, name: str) -> str:
        """The base model of `name` (itself when it is one): the label of vLLM's metrics."""
        adapter = self._adapters.get(name)
        return adapter.parent if adapter is not None else name

    def load(self, name: str, path: str, parent: str | None = None) -> Adapter:
        if not name or not path:
            raise ApiError(400, "lora_name and lora_path are required", param="lora_name")
        if name in self.base:
            raise ApiError(400, f"The lora adapter '{name}' names a base model.", param="lora_name")
        if name in self._adapters:
            raise ApiError(
                400, f"The lora adapter '{name}' has already been loaded.", param="lora_name"
            )
        base = parent if parent is not None else self.base[0]
        if base not in self.base:
            raise ApiError(
                404, f"The model `{base}` does not exist.", param="parent", code="model_not_found"
            )
        adapter = Adapter(name, base, path)
        self._adapters[name] = adapter
        return adapter

    def unload(self, name: str) -> None:
        if self._adapters.pop(name, None) is None:
            raise ApiError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name")

    def listing(self, created: int, max_model_len: int) -> list[dict[str, Any]]:
        """The `data` of `GET /v1/models`, in vLLM's shape."""
        common = {"object": "model", "created": created, "owned_by": "fake-vllm"}
        data: list[dict[str, Any]] = [
            {"id": m, **common, "root": m, "parent": None, "max_model_len": max_model_len}
            for m in self.base
        ]
        data.extend(
            {"id": a.name, **common, "root": a.path, "parent": a.parent, "max_model_len": None}
            for a in self._adapters.values()
        )
        return data


class LoraRoutes:
    """vLLM's runtime adapter endpoints (always enabled here; vLLM needs
    VLLM_ALLOW_RUNTIME_LORA_UPDATING). Plain-text success bodies, as vLLM answers."""

    def __init__(self, served: ServedModels) -> None:
        self.served = served

    def add_to(self, app: web.Application) -> None:
        app.router.add_post("/v1/load_lora_adapter", self.load_lora)
        app.router.add_post("/v1/unload_lora_adapter", self.unload_lora)

    async def load_lora(self, request: web.Request) -> web.Response:
        """vLLM's `POST /v1/load_lora_adapter {lora_name, lora_path[, base_model_name]}`."""
        try:
            body = await self._admin_body(request)
            name, path = body.get("lora_name"), body.get("lora_path")
            parent = body.get("base_model_name")
            if not isinstance(name, str) or not isinstance(path, str):
                raise ApiError(400, "lora_name and lora_path must be strings", param="lora_name")
            if parent is not None and not isinstance(parent, str):
                raise ApiError(400, "base_model_name must be a string", param="base_model_name")
            self.served.load(name, path, parent)
        except ApiError as exc:
            return exc.response()
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora(self, request: web.Request) -> web.Response:
        """vLLM's `POST /v1/unload_lora_adapter {lora_name}`."""
        try:
            body = await self._admin_body(request)
            name = body.get("lora_name")
            if not isinstance(name, str):
                raise ApiError(400, "lora_name must be a string", param="lora_name")
            self.served.unload(name)
        except ApiError as exc:
            return exc.response()
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    async def _admin_body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body
