"""GET /models: the models this relay serves, under the names clients may ask for."""
from __future__ import annotations

from relay.handlers.base import AuthenticatedHandler


class ModelsHandler(AuthenticatedHandler):
    route = "models"

    def get(self) -> None:
        names = self.services.config.client_model_names()
        self.write_json({"object": "list", "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": "relay"} for n in names]})

