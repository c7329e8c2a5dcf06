"""What a legacy /completions request holds: its prompts counted (token arrays as given), and a
completion allowance for every choice the upstream generates and bills. Pure."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from relay.config import Config
from relay.metering.encodings import count_tokens, encoding_for
from relay.metering.quote import Quote, price_for, quote_tokens
from relay.metering.usage import Usage

# OpenAI's default max_tokens for legacy completions: what relay reserves per choice when the
# client sets none.
DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True)
class CompletionPrompt:
    tokens: int        # of every prompt, each counted once (a token array as given)
    prompts: int       # how many prompts: each gets its own choices
    suffix: int = 0    # tokens of the suffix, read with each prompt


def count_completion_prompt(body: Mapping[str, Any], encoding: str) -> CompletionPrompt:
    """The prompt a validated body sends: a string, strings, a token array or token arrays."""
    prompt = body.get("prompt")
    suffix = body.get("suffix")
    suffix_tokens = count_tokens(suffix, encoding) if isinstance(suffix, str) else 0
    if isinstance(prompt, str):
        return CompletionPrompt(count_tokens(prompt, encoding), 1, suffix_tokens)
    if not isinstance(prompt, list) or not prompt:
        return CompletionPrompt(0, 1, suffix_tokens)
    if isinstance(prompt[0], int):  # one token array
        return CompletionPrompt(len(prompt), 1, suffix_tokens)
    tokens = sum(count_tokens(p, encoding) if isinstance(p, str) else len(p) if isinstance(p, list) else 0
                 for p in prompt)
    return CompletionPrompt(tokens, len(prompt), suffix_tokens)


def choices_generated(body: Mapping[str, Any]) -> int:
    """Completions generated per prompt: ``best_of`` of them when it is above ``n`` (the upstream
    bills them all and returns ``n``)."""
    n, best_of = body.get("n"), body.get("best_of")
    return max(n if isinstance(n, int) else 1, best_of if isinstance(best_of, int) else 1, 1)


def echoed_tokens(body: Mapping[str, Any], prompt: CompletionPrompt) -> int:
    """Prompt tokens the reply's text repeats (``echo``: each returned choice starts with its prompt)."""
    if body.get("echo") is not True:
        return 0
    n = body.get("n")
    return prompt.tokens * (n if isinstance(n, int) and n > 1 else 1)


def quote_completion(config: Config, model: str, body: Mapping[str, Any]) -> tuple[Quote, CompletionPrompt]:
    """The prompts (and the suffix with each), plus ``max_tokens`` (16 when absent) for every
    completion generated; limited only when the client set ``max_tokens``."""
    prompt = count_completion_prompt(body, encoding_for(model, config.quota.encodings))
    limit = body.get("max_tokens")
    limited = isinstance(limit, int) and not isinstance(limit, bool)
    per_choice = limit if isinstance(limit, int) and limited else DEFAULT_MAX_TOKENS
    allowance = per_choice * choices_generated(body) * prompt.prompts
    usage = Usage(prompt_tokens=prompt.tokens + prompt.suffix * prompt.prompts)
    quote = quote_tokens(model, price_for(config, model), usage, allowance, limited=limited)
    return quote, prompt
