"""Text around generation: incremental detokenization never emits broken UTF-8, stop strings cut the
output exactly (even when split across tokens), regex constraints hold, text streaming works, prompts
are encoded as the model's own tokenizer encodes them, and the one events-to-text loop ends and
closes streams correctly."""

import pytest
import torch
from tokenizers import Tokenizer, processors

from lmforge.errors import UserError
from lmforge.model.config import ModelConfig
from lmforge.model.generation import SamplingParams, TokenEvent
from lmforge.model.transformer import Transformer
from lmforge.serving.textgen import (
    IncrementalDetokenizer,
    RegexConstraint,
    StopStrings,
    TextDecoder,
    decode_events,
    encode_prompt,
    generate_text,
    stream_text,
)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig.from_name(
        "tiny", vocab_size=tokenizer.get_vocab_size(), init_std=0.2, tie_embeddings=False, bos_token_id=0
    )
    return Transformer(cfg).eval()


def test_incremental_detokenization_never_emits_broken_characters(tokenizer):
    text = "Crème brûlée 日本語 🙂🚀 ok"
    ids = tokenizer.encode(text).ids
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some tokens hold part of a character
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas  # a token that completed nothing printable waited for the next one


def test_incremental_detokenization_after_a_prompt(tokenizer):
    prompt = tokenizer.encode("Straße and").ids
    rest = tokenizer.encode(" café 🙂").ids
    detok = IncrementalDetokenizer(tokenizer, prompt)
    out = "".join(detok.push(i) for i in rest) + detok.flush()
    assert out == tokenizer.decode(prompt + rest)[len(tokenizer.decode(prompt)) :]


def test_flush_reports_an_unfinished_character(tokenizer):
    ids = tokenizer.encode("a🙂").ids
    detok = IncrementalDetokenizer(tokenizer)
    shown = "".join(detok.push(i) for i in ids[:-1])
    assert shown == "a"
    assert detok.flush() == "\ufffd"  # the emoji's last byte never came


def test_stop_strings_hold_back_possible_starts():
    stops = StopStrings(["STOP", "\n\n"])
    assert stops.push("Hello S") == "Hello "  # "S" may start "STOP"
    assert stops.push("T") == ""
    assert stops.push("ay") == "STay"  # it did not
    assert stops.push(" then\n") == " then"
    assert stops.push("\nmore") == "" and stops.stopped
    assert stops.push("ignored") == "" and stops.flush() == ""
    tail = StopStrings(["END"])
    assert tail.push("almost EN") == "almost " and tail.flush() == "EN"
    with pytest.raises(UserError, match="non-empty"):
        StopStrings([""])


def test_text_decoder_cuts_at_a_stop_string_split_across_tokens(tokenizer):
    ids = tokenizer.encode("The lazy dog jumps").ids
    decoder = TextDecoder(tokenizer, stop=["zy do"])
    shown = ""
    for i in ids:
        shown += decoder.push(i)
        if decoder.stopped:
            break
    shown += decoder.finish()
    assert shown == decoder.text == "The la"


def test_generate_text_stops_at_a_stop_string(model, tokenizer):
    params = SamplingParams(max_new_tokens=40, temperature=0)
    free = generate_text(model, tokenizer, "The quick", params)
    assert free.finish_reason == "length" and len(free.token_ids) == 40
    stop = free.text[10:13]
    cut = generate_text(model, tokenizer, "The quick", params, stop=[stop])
    assert cut.text == free.text[: free.text.index(stop)]
    assert cut.finish_reason == "stop" and len(cut.token_ids) < 40
    assert "".join(stream_text(model, tokenizer, "The quick", params, stop=[stop])) == cut.text
    assert "".join(stream_text(model, tokenizer, "The quick", params)) == free.text


class EosAfter(torch.nn.Module):
    """Wraps a model so that eos becomes the likeliest token from the given position on."""

    def __init__(self, inner, eos: int, from_position: int) -> None:
        super().__init__()
        self.inner, self.config, self.eos, self.from_position = inner, inner.config, eos, from_position

    def forward(self, input_ids, positions=None, kv_cache=None, attn_mask=None, last_only=False):
        logits = self.inner(input_ids, positions, kv_cache, attn_mask).clone()
        pos = positions if positions is not None else torch.arange(input_ids.shape[1])
        logits[..., self.eos] += 1000.0 * (pos >= self.from_position).to(logits.dtype)
        return logits


def test_generate_text_stops_at_the_tokenizers_eos(model, tokenizer):
    eos = tokenizer.token_to_id("<|eos|>")
    assert model.config.eos_token_id is None  # the model config names none: the tokenizer's is used
    params = SamplingParams(max_new_tokens=20, temperature=0)
    prompt_len = len(tokenizer.encode("The quick").ids)  # lmforge's tokenizer adds no bos
    free = generate_text(model, tokenizer, "The quick", params)
    out = generate_text(EosAfter(model, eos, prompt_len + 3), tokenizer, "The quick", params)
    assert out.finish_reason == "stop"
    assert out.token_ids == free.token_ids[:4] + [eos]
    assert out.text == tokenizer.decode(free.token_ids[:4])  # the special token itself is not shown


# bounded patterns: a random model must be able to complete a match within max_new_tokens
@pytest.mark.parametrize("pattern", [r"\d{3}-\d{2}", r"(yes|no)", r"[a-z]{1,8} [0-9]{1,2}\."])
@pytest.mark.parametrize("seed", [0, 1])
def test_regex_constraint_output_matches(model, tokenizer, pattern, seed):
    import regex

    eos = tokenizer.token_to_id("<|eos|>")
    constraint = RegexConstraint(pattern, tokenizer, model.config.vocab_size, [eos])
    params = SamplingParams(max_new_tokens=30, temperature=1.0, seed=seed)
    out = generate_text(model, tokenizer, "Answer:", params, constraint=constraint)
    assert regex.fullmatch(pattern, out.text), out.text
    assert out.finish_reason == "stop"


def test_regex_constraint_rejects_a_bad_pattern(tokenizer):
    with pytest.raises(UserError, match="invalid --regex"):
        RegexConstraint("(unclosed", tokenizer, tokenizer.get_vocab_size())


def _events(tokenizer, text: str, finish_reason: str | None = None, log: list | None = None):
    """Token events spelling `text`, the last one carrying `finish_reason`; `log` records what was read."""
    ids = tokenizer.encode(text).ids
    try:
        for n, token_id in enumerate(ids, 1):
            if log is not None:
                log.append(token_id)
            yield TokenEvent("r", 0, token_id, finish_reason=finish_reason if n == len(ids) else None)
    finally:
        if log is not None:
            log.append("closed")


def test_decode_events_stops_at_a_stop_string_and_closes_the_stream(tokenizer):
    log: list = []
    decoder = TextDecoder(tokenizer, stop=["zy do"])
    text = "".join(decode_events(_events(tokenizer, "The lazy dog jumps over it", log=log), decoder))
    assert text == decoder.text == "The la" and decoder.finish_reason == "stop"
    assert log[-1] == "closed" and len(log) - 1 < len(tokenizer.encode("The lazy dog jumps over it").ids)
    assert decoder.token_ids == log[:-1]  # every token read, the one completing the stop string included


@pytest.mark.parametrize("finish_reason", ["length", None])  # None: the stream just ends
def test_decode_events_releases_the_held_back_tail_at_the_end(tokenizer, finish_reason):
    decoder = TextDecoder(tokenizer, stop=["END"])
    deltas = list(decode_events(_events(tokenizer, "almost EN", finish_reason), decoder))
    assert "".join(deltas) == "almost EN" and deltas[-1].endswith("EN")  # "EN" waited for the end
    assert decoder.finish_reason == "length"
    assert decoder.feed(TokenEvent("r", 0, 5)) == "" and decoder.finish() == ""  # finished is final


def test_prompts_are_encoded_as_the_model_tokenizer_encodes_them(tokenizer):
    plain = tokenizer.encode("The quick", add_special_tokens=False).ids
    # lmforge's tokenizer declares no bos: none is added, whatever the model config's bos_token_id
    assert encode_prompt(tokenizer, "The quick", bos_token_id=0) == plain and plain[0] != 0
    # a tokenizer whose post-processor adds bos (Llama 3 style) gets it exactly once
    with_bos = Tokenizer.from_str(tokenizer.to_str())
    with_bos.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", 0)]
    )
    assert encode_prompt(with_bos, "The quick", bos_token_id=0) == [0, *plain]
    # a rendered chat template spells out its special tokens: nothing is added to them
    chat = "<|bos|><|im_start|>user\nhi<|im_end|>\n"
    chat_ids = encode_prompt(with_bos, chat, 0, add_special_tokens=False)
    assert chat_ids[:2] == [0, 3] and chat_ids.count(0) == 1
    # an empty prompt starts from the model's bos, and is refused when there is none
    assert encode_prompt(tokenizer, "", bos_token_id=0) == [0]
    with pytest.raises(UserError, match="empty"):
        encode_prompt(tokenizer, "")
