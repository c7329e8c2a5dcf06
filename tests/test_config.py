"""upstreams.yaml parsing: the example works, and every mistake names its key path."""
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from relay.cli import main
from relay.config import ConfigError, parse_config

ROOT = Path(__file__).resolve().parent.parent
GOOD = """
upstreams:
  - name: a
    base_url: https://api.example.com/v1/
    keys: ["${K1}", sk-plain]
"""


def test_shipped_example_is_the_embedded_default_and_parses():
    top = (ROOT / "upstreams.yaml").read_text()
    assert top == (ROOT / "relay/examples/upstreams.yaml").read_text()
    cfg = parse_config(top, {})
    assert [u.name for u in cfg.upstreams] == ["primary", "backup"]
    assert cfg.map_model("gpt-3.5-turbo") == "gpt-3.5-turbo-1106"
    assert cfg.price_of("gpt-3.5-turbo-1106").input == Fraction(2, 3)
    assert cfg.price_of("gpt-4-1106-preview").input == Fraction(20, 3)
    assert cfg.price_of("text-embedding-ada-002").output == 0
    assert cfg.price_of("unpriced-model") is None
    assert cfg.upstreams[1].keys == ("sk-fake-backup-1",)


def test_env_vars_expand_and_defaults_apply():
    cfg = parse_config(GOOD, {"K1": "sk-from-env"})
    u = cfg.upstreams[0]
    assert u.keys == ("sk-from-env", "sk-plain")
    assert u.base_url == "https://api.example.com/v1"
    assert (u.weight, u.priority, u.models) == (1, 0, None)


def test_star_pricing_entry_is_the_default_price():
    cfg = parse_config(GOOD + "pricing:\n  '*': {input: 3}\n", {"K1": "k"})
    assert cfg.price_of("anything").input == 3


@pytest.mark.parametrize("text,path,reason", [
    ("", "", "empty file"),
    ("upstreams: []", "upstreams", "non-empty list"),
    ("upstreams:\n  - name: a\n    base_url: ftp://x\n    keys: [k]", "upstreams[0].base_url", "not an http(s) URL"),
    ("upstreams:\n  - name: a\n    keys: [k]", "upstreams[0].base_url", "required"),
    ("upstreams:\n  - {name: a, base_url: 'http://x', keys: [k]}\n  - {name: b, base_url: 'nope', keys: [k]}",
     "upstreams[1].base_url", "not an http(s) URL"),
    ("upstreams:\n  - {name: a, base_url: 'http://x', keys: [k], wieght: 2}", "upstreams[0].wieght", "unknown key"),
    ("upstreams:\n  - {name: a, base_url: 'http://x', keys: []}", "upstreams[0].keys", "non-empty"),
    ("upstreams:\n  - {name: a, base_url: 'http://x', keys: ['${NOPE}']}", "upstreams[0].keys[0]",
     "NOPE is not set"),
    ("upstreams:\n  - {name: a, base_url: 'http://x', keys: [k], weight: 0}", "upstreams[0].weight", ">= 1"),
    ("upstreams:\n  - {name: a, base_url: 'http://x', keys: [k], weight: 1000000000000000000000}",
     "upstreams[0].weight", "<= 1000000"),
    ("upstreams:\n  - {name: a, base_url: 'http://x', keys: [k], priority: -1}", "upstreams[0].priority", ">= 0"),
    ("upstreams:\n  - {name: a, base_url: 'http://x', keys: [k], models: 5}", "upstreams[0].models", "model names"),
    ("upstreams:\n  - {name: a, base_url: 'http://x', keys: [k]}\n  - {name: a, base_url: 'http://y', keys: [j]}",
     "upstreams[1].name", "duplicate"),
    ("upstreams:\n  - {name: a, base_url: 'http://x', keys: [k]}\npricing:\n  gpt-4: {input: '2/0'}",
     "pricing.gpt-4.input", "fraction"),
    ("upstreams:\n  - {name: a, base_url: 'http://x', keys: [k]}\npricing:\n  gpt-4: {output: 1}",
     "pricing.gpt-4.input", "required"),
    ("upstreams:\n  - {name: a, base_url: 'http://x', keys: [k]}\ntimeouts: {idle_s: -1}", "timeouts.idle_s", "> 0"),
    ("upstreams:\n  - {name: a, base_url: 'http://x', keys: [k]}\nlimits: {max_body_bytes: 1.5}",
     "limits.max_body_bytes", "whole number"),
    ("upstreams:\n  - {name: a, base_url: 'http://x', keys: [k]}\nmodel_map: {gpt-4: 7}", "model_map.gpt-4",
     "model name"),
    ("upstreams:\n  - {name: a, base_url: 'http://x', keys: [k]}\nextra: 1", "extra", "unknown key"),
    ("upstreams: [\n", "line", "not valid YAML"),
])
def test_mistakes_name_their_key_path(text, path, reason):
    with pytest.raises(ConfigError) as info:
        parse_config(text, {})
    assert info.value.path.startswith(path)
    assert reason in info.value.reason


def test_yaml_tags_are_not_executed():
    with pytest.raises(ConfigError):
        parse_config("upstreams: !!python/object/apply:os.system ['true']", {})


def test_check_config_command_exit_codes(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(GOOD.replace("${K1}", "sk-1"))
    assert main(["check-config", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstreams:\n  - {name: a, base_url: 'http://x', keys: [k]}\n"
                   "  - {name: b, base_url: 'not-a-url', keys: [k]}\n")
    assert main(["check-config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "upstreams[1].base_url: not an http(s) URL" in err


def test_check_config_as_installed_command(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstreams:\n  - {name: a, base_url: 'http://x', keys: [k], colour: red}\n")
    proc = subprocess.run([sys.executable, "-m", "relay", "check-config", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 1 and "upstreams[0].colour: unknown key" in proc.stderr


def test_site_section_is_validated():
    base = "upstreams:\n  - {name: a, base_url: 'http://x', keys: [k]}\n"
    cfg = parse_config(base + "site: {primary_host: API.example.com, backup_host: 'b.example.net:8443', "
                              "usage_host: u.example.com, shop_url: 'https://shop.example.com/r'}", {})
    assert (cfg.site.primary_host, cfg.site.backup_host, cfg.site.shop_url) == (
        "api.example.com", "b.example.net:8443", "https://shop.example.com/r")
    for bad, path in (("{primary_host: 'https://x.com'}", "site.primary_host"), ("{shop_url: 'shop'}", "site.shop_url"),
                      ("{scheme: ftp}", "site.scheme"), ("{colour: red}", "site.colour")):
        with pytest.raises(ConfigError) as info:
            parse_config(base + f"site: {bad}", {})
        assert info.value.path == path


def test_commented_site_example_is_valid_when_uncommented():
    text = (ROOT / "upstreams.yaml").read_text()
    lines = text.splitlines()
    start = lines.index("# site:")
    block = [line[2:] for line in lines[start:start + 6]]
    cfg = parse_config(text + "\n" + "\n".join(block) + "\n", {})
    assert cfg.site.usage_host == "usage.example.com" and cfg.site.shop_url.startswith("https://")


def test_base_url_with_credentials_is_refused_without_echoing_them(tmp_path, capsys):
    for url in ("https://user:s3cret-pw@api.example.com/v1", "https://s3cret-pw@api.example.com/v1",
                "http://user:s3cret-pw@127.0.0.1:9000/v1"):
        with pytest.raises(ConfigError) as info:
            parse_config(f"upstreams:\n  - {{name: a, base_url: '{url}', keys: [k]}}\n", {})
        assert info.value.path == "upstreams[0].base_url" and "credentials" in info.value.reason
        assert "s3cret" not in str(info.value)
    bad = tmp_path / "creds.yaml"
    bad.write_text("upstreams:\n  - {name: a, base_url: 'https://user:s3cret-pw@x.example/v1', keys: [k]}\n")
    assert main(["check-config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "upstreams[0].base_url: must not carry credentials" in err and "s3cret" not in err


ONE = "upstreams:\n  - {name: a, base_url: 'http://x', keys: [k]}\n"


@pytest.mark.parametrize("extra,path,reason", [
    ("timeouts: {idle_s: .nan}", "timeouts.idle_s", "finite"),
    ("timeouts: {connect_s: .inf}", "timeouts.connect_s", "finite"),
    ("timeouts: {first_byte_s: 86401}", "timeouts.first_byte_s", "at most 86400"),
    ("health: {interval_s: .inf}", "health.interval_s", "finite"),
    ("health: {max_cooldown_s: -.inf}", "health.max_cooldown_s", "finite"),
    ("health: {probe_timeout_s: .NaN}", "health.probe_timeout_s", "finite"),
    ("health: {recheck_disabled_s: 1.0e+300}", "health.recheck_disabled_s", "at most 86400"),
    ("retries: {budget_ratio: .nan}", "retries.budget_ratio", "finite"),
    ("retries: {budget_ratio: .inf}", "retries.budget_ratio", "finite"),
    ("retries: {budget_ratio: 1.5}", "retries.budget_ratio", "at most 1"),
    ("retries: {budget_window_s: .inf}", "retries.budget_window_s", "finite"),
    ("retries: {max_attempts: 1099511627776}", "retries.max_attempts", "at most 2147483647"),
    ("limits: {max_body_bytes: .inf}", "limits.max_body_bytes", "whole number"),
    ("pricing:\n  m: {input: .nan}", "pricing.m.input", "finite"),
    ("pricing:\n  m: {input: 1, output: .inf}", "pricing.m.output", "finite"),
    ("pricing:\n  m: {input: 1.0e+300}", "pricing.m.input", "at most 1000000"),
    ("pricing:\n  m: {input: 1000000000000000000000000000000}", "pricing.m.input", "at most 1000000"),
    ("pricing:\n  m: {input: '1/99999999999999999999'}", "pricing.m.input", "too fine"),
    ("pricing:\n  m: {input: 0.0000001}", "pricing.m.input", "too fine"),
    ("pricing:\n  m: {input: '1e99999'}", "pricing.m.input", "a number >= 0"),
    ("pricing:\n  '*': {input: 'inf'}", "pricing.*.input", "a number >= 0"),
])
def test_non_finite_and_absurd_numbers_are_refused(extra, path, reason):
    with pytest.raises(ConfigError) as info:
        parse_config(ONE + extra, {})
    assert info.value.path == path
    assert reason in info.value.reason


def test_numbers_at_their_bounds_are_accepted():
    cfg = parse_config(ONE.replace("keys: [k]", "keys: [k], weight: 1000000") +
                       "timeouts: {first_byte_s: 86400}\nretries: {budget_ratio: 1, max_attempts: 2147483647}\n"
                       "pricing:\n  a: {input: 1000000, output: '1/1000000'}\n  b: {input: 0.000001}\n", {})
    assert cfg.timeouts.first_byte_s == 86400.0 and cfg.retries.budget_ratio == 1.0
    assert cfg.upstreams[0].weight == 1_000_000
    assert cfg.price_of("a") == type(cfg.price_of("a"))(Fraction(1_000_000), Fraction(1, 1_000_000))
    assert cfg.price_of("b").input == Fraction(1, 1_000_000)


def test_models_take_patterns_and_a_star_and_apis_name_what_an_upstream_serves():
    cfg = parse_config("upstreams:\n"
                       "  - {name: a, base_url: 'http://a', keys: [k], models: ['gpt-4o*', 'o?-mini', gpt-4],"
                       " apis: [chat, responses]}\n"
                       "  - {name: b, base_url: 'http://b', keys: [k], models: ['*'], apis: [embeddings]}\n", {})
    a, b = cfg.upstreams
    assert [a.serves(m) for m in ("gpt-4o", "gpt-4o-mini", "o4-mini", "gpt-4", "gpt-4-32k", "o3")] == \
        [True, True, True, True, False, False]
    assert a.serves("gpt-4o", "responses") and not a.serves("gpt-4o", "embeddings")
    assert b.models is None and b.serves("anything", "embeddings") and not b.serves("anything", "chat")
    assert cfg.routing.affinity is True and cfg.routing.overload_factor == 2.0


@pytest.mark.parametrize("extra,path,reason", [
    ("apis: [chat, chatt]", "upstreams[0].apis[1]", "unknown API 'chatt' (known: chat, completions, embeddings"),
    ("apis: []", "upstreams[0].apis", "non-empty list of APIs"),
    ("apis: chat", "upstreams[0].apis", "non-empty list of APIs"),
    ("models: []", "upstreams[0].models", "names or patterns"),
])
def test_upstream_apis_and_models_mistakes_name_their_key_path(extra, path, reason):
    with pytest.raises(ConfigError) as info:
        parse_config(ONE.replace("keys: [k]", f"keys: [k], {extra}"), {})
    assert info.value.path == path and reason in info.value.reason


@pytest.mark.parametrize("routing,path,reason", [
    ("{affinity: yes please}", "routing.affinity", "true or false"),
    ("{overload_factor: 0.5}", "routing.overload_factor", "at least 1"),
    ("{overload_factor: .inf}", "routing.overload_factor", "finite"),
    ("{overload_factor: 5000}", "routing.overload_factor", "at most 1000"),
    ("{sticky: true}", "routing.sticky", "unknown key"),
])
def test_routing_section_is_validated(routing, path, reason):
    with pytest.raises(ConfigError) as info:
        parse_config(ONE + f"routing: {routing}\n", {})
    assert info.value.path == path and reason in info.value.reason
    cfg = parse_config(ONE + "routing: {affinity: false, overload_factor: 1.5}\n", {})
    assert (cfg.routing.affinity, cfg.routing.overload_factor) == (False, 1.5)


def test_check_config_warns_about_patterns_that_match_nothing_priced(tmp_path, capsys):
    path = tmp_path / "globs.yaml"
    path.write_text("upstreams:\n  - {name: a, base_url: 'http://a', keys: [k], models: ['gpt-4o*', 'gtp-5*', o3]}\n"
                    "  - {name: b, base_url: 'http://b', keys: [k], models: ['*'], apis: [chat]}\n"
                    "pricing:\n  gpt-4o-mini: {input: 1}\n  '*': {input: 1}\n")
    assert main(["check-config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == f"warning: {path}: upstreams[0].models[1]: pattern 'gtp-5*' matches no priced model " \
                  f"(GET /models lists nothing for it)\n"
    assert out.startswith("ok: ")
    path.write_text(ONE.replace("keys: [k]", "keys: [k], apis: [chat, speech]"))
    assert main(["check-config", str(path)]) == 1
    assert "upstreams[0].apis[1]: unknown API 'speech'" in capsys.readouterr().err
