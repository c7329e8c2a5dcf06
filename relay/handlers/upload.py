"""The multipart routes' body: read under the route's own limit and parsed as it arrives (the
small fields kept, files only located), then forwarded as the chunks it came in, held once."""
from __future__ import annotations

from relay.errors import InvalidRequest
from relay.handlers.proxy import ProxyHandler
from relay.metering.b64 import Reader
from relay.proxy.chunks import Chunks
from relay.proxy.multipart import MultipartError, MultipartParser, Part, boundary_of
from relay.proxy.request import ModelField, UpstreamRequest

MB = 1024 * 1024


class UploadHandler(ProxyHandler):
    keep_fields: frozenset[str] = frozenset()
    keep_limit = 128 * 1024  # a kept field's bytes: a 32,000-character prompt, in UTF-8
    max_body = 25 * MB

    def body_limit(self) -> int:
        return self.max_body

    async def prepare(self) -> None:
        self._parser: MultipartParser | None = None
        self._parse_error: MultipartError | None = None
        self._boundary = b""
        await super().prepare()
        if self.request.method == "OPTIONS" or self._rejected:
            return
        try:
            self._boundary = boundary_of(self.request.headers.get("Content-Type"))
            self._parser = MultipartParser(self._boundary, self.keep_fields, self.keep_limit)
        except MultipartError as exc:
            self._parse_error = exc

    def data_received(self, chunk: bytes) -> None:
        super().data_received(chunk)
        if self._rejected or self._parser is None:
            if self._parse_error is not None:
                self._chunks.clear()  # a body relay will refuse is read to its end, not kept
            return
        try:
            self._parser.feed(chunk)
        except MultipartError as exc:
            self._parse_error, self._parser = exc, None
            self._chunks.clear()

    def upload_parts(self) -> tuple[Chunks, list[Part]]:
        """The body and its parts; a body relay cannot read is a 400."""
        if self._parse_error is None and self._parser is not None:
            try:
                parts = self._parser.close()
            except MultipartError as exc:
                self._parse_error = exc
        if self._parse_error is not None or self._parser is None:
            raise InvalidRequest(f"Could not parse the multipart form: {self._parse_error}.")
        body = Chunks(self._chunks)
        self._chunks = []
        return body, parts

    def upload_request(self, body: Chunks, served: str, model: Part | None) -> UpstreamRequest:
        """The upload as it arrived; its model part renamed only where an endpoint's name for the
        model differs (and added, first, when the client sent none: OpenAI's default is explicit)."""
        assert self._parser is not None
        if model is not None:
            field = ModelField(model.start, model.end, sent=model.text())
        else:
            at = self._parser.first_part_at
            field = ModelField(at, at, prefix=b'Content-Disposition: form-data; name="model"\r\n\r\n',
                               suffix=b"\r\n--" + self._boundary + b"\r\n")
        return UpstreamRequest("POST", self.upstream_path, served, upload=body, model_field=field,
                               content_type=self.request.headers["Content-Type"])


def fields(parts: list[Part]) -> dict[str, Part]:
    """The kept fields by name (the parser refuses a kept field sent twice)."""
    return {p.name: p for p in parts if p.value is not None}


def text_field(kept: dict[str, Part], name: str) -> str | None:
    part = kept.get(name)
    if part is None:
        return None
    try:
        return part.text()
    except MultipartError as exc:
        raise InvalidRequest(f"Could not parse the multipart form: {exc}.", param=name) from None


def part_reader(body: Chunks, part: Part) -> Reader:
    """Bytes of one part's content at an offset (a ``metering.b64.Reader``), for its header."""
    def read(offset: int, length: int) -> bytes:
        if offset < 0 or length <= 0 or offset >= part.size:
            return b""
        return body.read(part.start + offset, min(length, part.size - offset))
    return read
