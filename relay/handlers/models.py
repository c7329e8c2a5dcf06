"""GET /models and GET /models/{id}: the models this relay serves, under the names clients may ask for."""
from __future__ import annotations

from relay.errors import ModelNotFound
from relay.handlers.base import AuthenticatedHandler


class ModelsHandler(AuthenticatedHandler):
    route = "models"

    def get(self) -> None:
        names = self.services.config.client_model_names()
        self.write_json({"object": "list", "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": "relay"} for n in names]})


class ModelHandler(AuthenticatedHandler):
    """One model, as OpenAI describes it (``client.models.retrieve`` is a common connectivity
    check); an id may hold ``/`` and ``:``, as fine-tunes' do (``ft:gpt-4o-mini:org::id``)."""

    route = "models"

    def get(self, name: str) -> None:
        if name not in self.services.config.client_model_names():
            raise ModelNotFound(f"The model '{name[:256]}' does not exist or is not served by this relay.",
                                param="model")
        self.model = name
        self.write_json({"id": name, "object": "model", "created": 0, "owned_by": "relay"})
