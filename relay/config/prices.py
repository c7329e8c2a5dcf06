"""Prices: quota units per token (and per image, second or character), exact fractions. Pure.

One unit is one gpt-3.5-turbo (4k) input token ($0.0015 per 1k at official prices). Every
part of a request's usage has its own price; those not given fall back to ``input`` (the
input parts) or ``output`` (the output parts).
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from fractions import Fraction
from functools import cached_property
from typing import Any

from relay.config.fields import ANY_MODEL, ConfigError, is_int, join, kind, mapping

MAX_PRICE = 1_000_000               # units per token (gpt-4-32k output is 80); per image or second, likewise
MAX_PRICE_DENOMINATOR = 1_000_000   # six decimals, or a fraction like "2/3": exact costs stay small
MAX_TIERS = 8
_PRICE_TEXT = re.compile(r"[0-9]{1,20}(?:\.[0-9]{1,20})?(?:/[0-9]{1,20})?")  # no exponents: "1e999999999"
_IMAGE_KIND = re.compile(r"(?:[0-9]{2,5}x[0-9]{2,5}|\*)(?:/[a-z]{1,16})?")  # 1024x1024, 1024x1792/hd, */low

_PER_TOKEN = ("input", "output", "cached_input", "reasoning", "image_input", "audio_input", "audio_output")
_OTHER = ("per_image", "per_second", "per_character")


@dataclass(frozen=True)
class Price:
    """Units per token of each part of a request; per image, second of audio or character."""

    input: Fraction = Fraction(0)
    output: Fraction = Fraction(0)
    cached_input: Fraction | None = None   # prompt tokens read from the upstream's cache (default: input)
    reasoning: Fraction | None = None      # reasoning tokens (default: output)
    image_input: Fraction | None = None    # input image tokens (default: input)
    audio_input: Fraction | None = None    # input audio tokens (default: input)
    audio_output: Fraction | None = None   # output audio tokens (default: output)
    per_image: Mapping[str, Fraction] = field(default_factory=dict)  # "1024x1024/hd", "1024x1024", "*"
    per_second: Fraction = Fraction(0)     # of audio transcribed or translated
    per_character: Fraction = Fraction(0)  # of text read aloud
    tiers: tuple[tuple[int, Price], ...] = ()  # (above, price): once the prompt passes ``above`` tokens

    def for_prompt(self, prompt_tokens: int) -> Price:
        """The price that applies to a request with this many prompt tokens (to all of it)."""
        chosen = self
        for above, price in self.tiers:
            if prompt_tokens > above:
                chosen = price
        return chosen

    def image(self, size: str = "", quality: str = "") -> Fraction:
        """Per image of that size and quality: the most specific entry that matches."""
        table = self.per_image
        for name in (f"{size}/{quality}", size, f"*/{quality}", "*"):
            if name in table:
                return table[name]
        return max(table.values(), default=Fraction(0))

    @cached_property
    def scaled(self) -> tuple[int, tuple[int, ...]]:
        """The prices of text input, cached input, image input, audio input, text output,
        reasoning, audio output, per second and per character (defaults applied) as integers
        over one common denominator: what a cost is computed with on every request, in integer
        arithmetic (Fraction arithmetic was a tenth of relay's CPU per request in the bench)."""
        values = (self.input, _or(self.cached_input, self.input), _or(self.image_input, self.input),
                  _or(self.audio_input, self.input), self.output, _or(self.reasoning, self.output),
                  _or(self.audio_output, self.output), self.per_second, self.per_character)
        d = math.lcm(*(v.denominator for v in values))
        return d, tuple(v.numerator * (d // v.denominator) for v in values)

    @cached_property
    def dearest_output(self) -> Fraction:
        """The dearest an output token can be under this price, its tiers' included."""
        return max(self.output, _or(self.reasoning, self.output), _or(self.audio_output, self.output),
                   *(max(t.output, _or(t.reasoning, t.output)) for _, t in self.tiers))

    @property
    def most_per_image(self) -> Fraction:
        return max(self.per_image.values(), default=Fraction(0))


def _or(value: Fraction | None, default: Fraction) -> Fraction:
    return default if value is None else value


def parse_pricing(raw: Any, path: str) -> tuple[dict[str, Price], Price | None]:
    if raw is None:
        return {}, None
    if not isinstance(raw, dict):
        raise ConfigError(path, f"must be a mapping of model name to prices, got {kind(raw)}")
    prices = {str(model): _price(entry, join(path, str(model))) for model, entry in raw.items()}
    default = prices.pop(ANY_MODEL, None)
    return prices, default


def _price(entry: Any, path: str) -> Price:
    e = mapping(entry, path, set(_PER_TOKEN) | set(_OTHER) | {"tiers"})
    if not e.keys() & (set(_PER_TOKEN) | set(_OTHER)):
        raise ConfigError(path, "give at least one price (input, output, per_image, per_second, per_character, ...)")
    if e.keys() & set(_PER_TOKEN) and "input" not in e:
        raise ConfigError(f"{path}.input", "required when a model is priced per token")
    values: dict[str, Any] = {name: fraction(e[name], f"{path}.{name}") for name in _PER_TOKEN + _OTHER[1:]
                              if name in e}
    if "per_image" in e:
        values["per_image"] = _per_image(e["per_image"], f"{path}.per_image")
    price = Price(**values)
    if "tiers" in e:
        price = replace(price, tiers=_tiers(e["tiers"], f"{path}.tiers", price))
    return price


def _per_image(raw: Any, path: str) -> dict[str, Fraction]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(path, 'must map image sizes ("1024x1024", "1024x1792/hd", "*") to units per image')
    out = {}
    for name, value in raw.items():
        if not isinstance(name, str) or not _IMAGE_KIND.fullmatch(name):
            raise ConfigError(join(path, str(name)), 'must be a size such as "1024x1024", optionally '
                                                     'with a quality ("1024x1024/hd"), or "*"')
        out[name] = fraction(value, join(path, name))
    return out


def _tiers(raw: Any, path: str, base: Price) -> tuple[tuple[int, Price], ...]:
    """Each tier names only the prices that change once the prompt passes ``above`` tokens."""
    if not isinstance(raw, list) or not raw or len(raw) > MAX_TIERS:
        raise ConfigError(path, f"must be a list of 1 to {MAX_TIERS} tiers ({{above: N, input: ..., ...}})")
    out: list[tuple[int, Price]] = []
    for i, entry in enumerate(raw):
        p = f"{path}[{i}]"
        e = mapping(entry, p, set(_PER_TOKEN) | {"per_second", "per_character", "above"}, {"above"})
        above = e["above"]
        if not is_int(above) or not 0 < above < 2**31 or (out and above <= out[-1][0]):
            raise ConfigError(f"{p}.above", "must be a whole number of prompt tokens, each tier above the last")
        # Only the Fraction prices (per token, second, character): Any since ``replace`` checks
        # ``**changes`` against every field of Price, the per-image table and the tiers too.
        changes: dict[str, Any] = {name: fraction(value, f"{p}.{name}") for name, value in e.items() if name != "above"}
        if not changes:
            raise ConfigError(p, "give the prices that change above that many prompt tokens")
        out.append((above, replace(base, **changes)))
    return tuple(out)


def fraction(value: Any, path: str) -> Fraction:
    """Multipliers are exact: an int, a decimal as written, or a fraction string like "2/3"."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(path, "must be a finite number")
    frac = None
    if is_int(value) or isinstance(value, float) or (isinstance(value, str) and _PRICE_TEXT.fullmatch(value)):
        try:
            frac = Fraction(str(value))
        except (ValueError, ZeroDivisionError):
            pass
    if frac is None or frac < 0:
        raise ConfigError(path, "must be a number >= 0 or a fraction like \"2/3\"")
    if frac > MAX_PRICE:
        raise ConfigError(path, f"must be at most {MAX_PRICE} units")
    if frac.denominator > MAX_PRICE_DENOMINATOR:
        raise ConfigError(path, f"too fine: use at most six decimals, or a fraction like \"2/3\" with a "
                                f"denominator up to {MAX_PRICE_DENOMINATOR}")
    return frac
