"""Prices of every part of a request, exact to the unit, and their config. Pure: no sockets."""
from fractions import Fraction as F

import pytest

from relay.config import ConfigError, Price, parse_config
from relay.metering.pricing import cost
from relay.metering.quote import quote_chat
from relay.metering.usage import Usage, parse_usage

UPSTREAM = "upstreams:\n  - {name: a, base_url: 'http://x', keys: [k]}\n"
GPT_4O = Price(input=F(5, 3), cached_input=F(5, 6), output=F(20, 3))  # $2.50 / $1.25 / $10 per 1M
O3 = Price(input=F(4, 3), cached_input=F(1, 3), output=F(16, 3), reasoning=F(16, 3))


def test_cached_input_is_charged_at_its_own_price():
    # 1000 prompt tokens, 600 of them cached; 200 completion: 400 × 5/3 + 600 × 5/6 + 200 × 20/3
    # = 2000/3 + 500 + 4000/3 = 2500 exactly.
    assert cost(GPT_4O, Usage(prompt_tokens=1000, completion_tokens=200, cached_tokens=600)) == 2500
    # Without the cache: 1000 × 5/3 + 200 × 20/3 = 3000.
    assert cost(GPT_4O, Usage(prompt_tokens=1000, completion_tokens=200)) == 3000


def test_reasoning_tokens_are_part_of_the_completion_at_their_price():
    dear = Price(input=F(1), output=F(2), reasoning=F(3))
    # 10 prompt; 100 completion of which 70 reasoning: 10 + 30 × 2 + 70 × 3 = 280.
    assert cost(dear, Usage(prompt_tokens=10, completion_tokens=100, reasoning_tokens=70)) == 280
    assert cost(O3, Usage(prompt_tokens=3, completion_tokens=3, reasoning_tokens=2)) == 20  # ceil(4 + 16) = 20
    assert dear.dearest_output == 3, "an allowance is reserved at the dearest output price"


def test_a_tier_prices_the_whole_request_once_the_prompt_passes_it():
    tiered = Price(input=F(1), output=F(2), tiers=((1000, Price(input=F(2), output=F(4))),))
    assert cost(tiered, Usage(prompt_tokens=1000, completion_tokens=10)) == 1000 + 20
    assert cost(tiered, Usage(prompt_tokens=1001, completion_tokens=10)) == 2002 + 40


def test_images_seconds_and_characters():
    # dall-e-3: $0.04 a standard 1024² image = 80000/3 units; hd $0.08; 1024×1792 $0.08.
    dalle = Price(per_image={"1024x1024/standard": F(80000, 3), "1024x1024/hd": F(160000, 3),
                             "1024x1792": F(160000, 3)})
    assert cost(dalle, Usage(images=3, image_kind="1024x1024/standard")) == 80_000
    assert cost(dalle, Usage(images=1, image_kind="1024x1792/hd")) == 53_334, "the size alone, without a quality"
    assert cost(dalle, Usage(images=1, image_kind="512x512/standard")) == 53_334, "unknown: the dearest"
    whisper = Price(per_second=F(200, 3))  # $0.006 a minute = $0.0001 a second = 200/3 units
    assert cost(whisper, Usage(seconds=61)) == 4067  # ceil(12200/3)
    tts = Price(per_character=F(10))  # $15 per 1M characters
    assert cost(tts, Usage(characters=1234)) == 12340


def test_gpt_image_input_images_have_their_own_price():
    image = Price(input=F(10, 3), image_input=F(20, 3), output=F(80, 3))  # $5 / $10 / $40 per 1M
    # 50 text + 300 image input tokens, 4160 output tokens: 500/3 + 2000 + 332800/3 = 113100
    assert cost(image, Usage(prompt_tokens=350, image_tokens=300, completion_tokens=4160)) == 113_100


@pytest.mark.parametrize("reported,expected", [
    ({"prompt_tokens": 100, "completion_tokens": 20, "prompt_tokens_details": {"cached_tokens": 64},
      "completion_tokens_details": {"reasoning_tokens": 12}}, Usage(100, 20, cached_tokens=64, reasoning_tokens=12)),
    ({"input_tokens": 100, "output_tokens": 20, "input_tokens_details": {"cached_tokens": 64},
      "output_tokens_details": {"reasoning_tokens": 12}}, Usage(100, 20, cached_tokens=64, reasoning_tokens=12)),
    ({"prompt_tokens": 8, "total_tokens": 8}, Usage(8, 0)),  # embeddings
    ({"prompt_tokens": 8, "completion_tokens": True}, None),
    ({"prompt_tokens": 8, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": -1}}, Usage(8, 1)),
])
def test_usage_as_upstreams_report_it(reported, expected):
    assert parse_usage({"usage": reported}) == expected


def test_parts_beyond_their_whole_are_clamped():
    u = Usage(prompt_tokens=10, completion_tokens=5, cached_tokens=50, reasoning_tokens=2**40).clamped()
    assert (u.cached_tokens, u.reasoning_tokens) == (10, 5)


def test_prices_in_the_config_file():
    cfg = parse_config(UPSTREAM + """
pricing:
  gpt-4o: {input: "5/3", cached_input: "5/6", output: "20/3"}
  o3: {input: "4/3", output: "16/3", reasoning: 8, tiers: [{above: 200000, input: "8/3"}]}
  dall-e-3: {per_image: {"1024x1024/standard": "80000/3", "1024x1024/hd": "160000/3"}}
  whisper-1: {per_second: "200/3"}
  tts-1: {per_character: 10}
""", {})
    assert cfg.pricing["gpt-4o"] == GPT_4O
    o3 = cfg.pricing["o3"]
    assert o3.for_prompt(200_001) == Price(input=F(8, 3), output=F(16, 3), reasoning=F(8))
    assert cfg.pricing["dall-e-3"].image("1024x1024", "hd") == F(160000, 3)
    assert cfg.pricing["whisper-1"].per_second == F(200, 3) and cfg.pricing["tts-1"].per_character == 10


@pytest.mark.parametrize("entry,path", [
    ("{output: 1}", "pricing.m.input"),
    ("{}", "pricing.m"),
    ("{per_image: {huge: 1}}", "pricing.m.per_image.huge"),
    ("{input: 1, tiers: [{above: 10}]}", "pricing.m.tiers[0]"),
    ("{input: 1, tiers: [{above: 10, input: 2}, {above: 5, input: 3}]}", "pricing.m.tiers[1].above"),
    ("{input: 1, cached_input: -1}", "pricing.m.cached_input"),
    ("{input: 1, per_second: .inf}", "pricing.m.per_second"),
])
def test_price_mistakes_name_their_key_path(entry, path):
    with pytest.raises(ConfigError) as info:
        parse_config(UPSTREAM + f"pricing:\n  m: {entry}\n", {})
    assert info.value.path == path, info.value


def test_the_allowance_is_per_model_and_reserved_at_the_dearest_output():
    cfg = parse_config(UPSTREAM + """
quota: {default_max_tokens: {"o*": 32768, "*": 1000}}
pricing:
  o3: {input: 1, output: 2, reasoning: 3}
  gpt-4: {input: 20, output: 40}
""", {})
    body = {"model": "o3", "messages": [{"role": "user", "content": "Hi"}]}
    q = quote_chat(cfg, "o3", body)
    assert q.allowance == 32768 and q.full == q.minimum + 32768 * 3 and not q.limited
    q = quote_chat(cfg, "gpt-4", {**body, "model": "gpt-4"})
    assert q.allowance == 1000 and q.full == q.minimum + 1000 * 40
    q = quote_chat(cfg, "gpt-4", {**body, "max_completion_tokens": 5, "n": 2})
    assert q.allowance == 10 and q.limited


def test_cost_is_exact_and_rounds_up_once():
    assert cost(Price(F(2, 3), F(4, 3)), Usage(3, 3)) == 6
    assert cost(Price(F(2, 3), F(4, 3)), Usage(1, 1)) == 2  # 2/3 + 4/3 = 2 exactly, no float drift
    assert cost(Price(F(2, 3), F(4, 3)), Usage(1, 0)) == 1
    assert cost(Price(F(20), F(40)), Usage(129, 10)) == 2980
    assert cost(Price(F(1, 15)), Usage(16, 0)) == 2


def test_cost_in_integers_is_the_ceiling_of_the_exact_sum_for_any_price_and_usage():
    """cost() adds integers over the prices' common denominator; it must equal the ceiling of
    the Fraction sum, part by part, tiers and images included."""
    from math import ceil

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from relay.metering.pricing import exact, reservation

    rate = st.fractions(min_value=0, max_value=1000, max_denominator=10**6)
    maybe = st.none() | rate
    count = st.integers(min_value=0, max_value=2**31 - 1)

    @st.composite
    def prices(draw):
        base = Price(input=draw(rate), output=draw(rate), cached_input=draw(maybe), reasoning=draw(maybe),
                     image_input=draw(maybe), audio_input=draw(maybe), audio_output=draw(maybe),
                     per_second=draw(rate), per_character=draw(rate),
                     per_image=draw(st.dictionaries(st.sampled_from(["1024x1024", "1024x1024/hd", "*"]), rate,
                                                    max_size=3)))
        tier = Price(input=draw(rate), output=draw(rate), cached_input=draw(maybe))
        return Price(**{**base.__dict__, "tiers": ((draw(st.integers(1, 10**6)), tier),)}) \
            if draw(st.booleans()) else base

    @st.composite
    def usages(draw):
        p, c = draw(count), draw(count)
        part = lambda whole: draw(st.integers(0, whole))  # noqa: E731
        return Usage(prompt_tokens=p, completion_tokens=c, cached_tokens=part(p), image_tokens=part(p),
                     audio_input_tokens=part(p), reasoning_tokens=part(c), audio_output_tokens=part(c),
                     images=draw(st.integers(0, 10)), seconds=draw(count), characters=draw(count),
                     image_kind=draw(st.sampled_from(["", "1024x1024", "1024x1024/hd", "512x512/low"])))

    @settings(max_examples=400, deadline=None)
    @given(prices(), usages(), st.integers(min_value=0, max_value=2**31 - 1))
    def check(price, usage, allowance):
        assert cost(price, usage) == ceil(exact(price, usage))
        tier = price.for_prompt(usage.prompt_tokens)
        assert reservation(price, usage, allowance) == ceil(exact(price, usage) + allowance * tier.dearest_output)
    check()


def test_usage_within_bounds_says_whether_clamping_changes_it():
    from relay.metering.bounds import MAX_TOKENS
    fine = Usage(prompt_tokens=10, completion_tokens=5, cached_tokens=10, reasoning_tokens=5, image_kind="x" * 64)
    assert fine.within_bounds() and fine.clamped() is fine
    for bad in (Usage(prompt_tokens=-1), Usage(prompt_tokens=MAX_TOKENS + 1), Usage(prompt_tokens=3, cached_tokens=4),
                Usage(completion_tokens=2, reasoning_tokens=3), Usage(completion_tokens=2, audio_output_tokens=3),
                Usage(prompt_tokens=1, image_tokens=2), Usage(prompt_tokens=1, audio_input_tokens=2),
                Usage(images=-1), Usage(seconds=MAX_TOKENS + 1), Usage(characters=-5), Usage(image_kind="x" * 65)):
        assert not bad.within_bounds(), bad
        assert bad.clamped() != bad and bad.clamped().within_bounds(), bad
