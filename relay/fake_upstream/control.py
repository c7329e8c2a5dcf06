"""The test's side door: change the behaviour, read what was sent, reset."""
from __future__ import annotations

import dataclasses
import json

import tornado.web

from relay.fake_upstream.state import Behaviour, FakeState


class ControlHandler(tornado.web.RequestHandler):
    def initialize(self, state: FakeState) -> None:
        self.state = state

    def get(self, what: str) -> None:
        if what == "requests":
            self.finish({"requests": [{k: v for k, v in r.items() if k != "headers"}
                                      for r in self.state.requests]})
        else:
            self.finish({"behaviour": dataclasses.asdict(self.state.behaviour)})

    def post(self, what: str) -> None:
        if what == "reset":
            self.state.reset()
        else:
            fields = {f.name for f in dataclasses.fields(Behaviour)}
            changes = {k: v for k, v in json.loads(self.request.body or b"{}").items() if k in fields}
            self.state.behaviour = dataclasses.replace(self.state.behaviour, **changes)
        self.finish({"behaviour": dataclasses.asdict(self.state.behaviour)})

