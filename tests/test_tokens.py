"""Token counting of messages and embedding inputs (OpenAI's per-message formula)."""
from relay.metering.tokens import count_chat_prompt, count_embedding_input, count_text


def test_prompt_tokens_match_openai_cookbook_example():
    messages = [
        {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate "
                                      "jargon into plain English."},
        {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
        {"role": "system", "name": "example_assistant",
         "content": "Things working well together will increase revenue."},
        {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch "
                                                             "base on opportunities for increased leverage."},
        {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how "
                                                                  "to do better."},
        {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client "
                                    "deliverable."},
    ]
    assert count_chat_prompt(messages) == 129  # OpenAI's published count for gpt-3.5-turbo-0613 / gpt-4


def test_token_counting_edge_cases():
    assert count_text("") == 0
    assert count_text("<|endoftext|>") > 1  # special tokens in user text count as text
    assert count_chat_prompt([{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                           {"type": "image_url", "image_url": {"url": "x"}}]}]) == 8
    assert count_embedding_input([1, 2, 3]) == 3
    assert count_embedding_input(["hello", "hello"]) == 2

