"""Prompt scoring through the server (real Ray Serve, the default model): the legacy completions API's
`echo` with `logprobs` as the `openai` client and lm-evaluation-harness use it, several prompts in one
request, streaming, gRPC, and refusals that disturb nothing else."""

from __future__ import annotations

import grpc
import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from protos.adept.v1 import adept_pb2 as pb
from protos.adept.v1 import adept_pb2_grpc
from tests.test_serve_http import client, wait_for_clean_blocks
from workers.model_store import load_tokenizer

TEXTS = ["The capital of France is Paris.", "Water boils at a temperature of", "One, two, three, four"]
FULL = {"adept": {"policy": "none"}}


@pytest.fixture(scope="module")
def reference(default_model_dir):
    """Token ids of TEXTS and the full model's log-softmax over each (Hugging Face, float32)."""
    tokenizer = load_tokenizer(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    out = []
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        with torch.no_grad():
            out.append((ids, torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)))
    return out


def expected_logprobs(ids: list[int], logp: torch.Tensor) -> list[float]:
    return logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()


def test_echo_scores_the_prompt_as_hf_does(served, reference):
    """max_tokens 0 with echo: the prompt's text back, its first token's log-probability null, the others
    the full model's log-softmax; top_logprobs the best token's; text offsets into the echoed text."""
    c = client(served)
    ids, logp = reference[0]
    r = c.completions.create(
        model=served.model, prompt=TEXTS[0], max_tokens=0, echo=True, logprobs=1, temperature=0, extra_body=FULL
    )
    choice = r.choices[0]
    assert choice.text == TEXTS[0] and choice.finish_reason == "length"
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(expected_logprobs(ids, logp), abs=2e-3)
    assert "".join(lp.tokens) == TEXTS[0] and lp.text_offset[0] == 0
    assert [TEXTS[0][o:].startswith(t) for o, t in zip(lp.text_offset, lp.tokens, strict=True)] == [True] * len(ids)
    for p, top in enumerate(lp.top_logprobs[1:]):
        assert len(top) == 1 and next(iter(top.values())) == pytest.approx(float(logp[p].max()), abs=2e-3)
    assert choice.model_extra["adept"]["prompt_exit_layers"] == [30] * len(ids)
    usage = r.usage.model_extra
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    assert usage["prompt_layers_computed"] == usage["prompt_layers_total"] == 30 * len(ids)


def test_several_prompts_as_token_ids_one_choice_each(served, reference):
    """A list of token-id prompts (as lm-eval sends them): one choice per prompt, in order, each what the
    prompt gives alone; usage summed; then echo with generation puts the prompt before the completion."""
    c = client(served)
    prompts = [ids for ids, _ in reference]
    together = c.completions.create(
        model=served.model, prompt=prompts, max_tokens=0, echo=True, logprobs=0, temperature=0, extra_body=FULL
    )
    assert [ch.index for ch in together.choices] == [0, 1, 2]
    assert together.usage.prompt_tokens == sum(len(p) for p in prompts)
    for choice, (ids, logp), text in zip(together.choices, reference, TEXTS, strict=True):
        assert choice.text == text
        assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected_logprobs(ids, logp), abs=2e-3)

    both = c.completions.create(
        model=served.model, prompt=TEXTS[1], max_tokens=3, echo=True, logprobs=2, temperature=0, extra_body=FULL
    )
    plain = c.completions.create(
        model=served.model, prompt=TEXTS[1], max_tokens=3, logprobs=2, temperature=0, extra_body=FULL
    )
    n = len(reference[1][0])
    assert both.choices[0].text == TEXTS[1] + plain.choices[0].text
    assert both.choices[0].logprobs.tokens[n:] == plain.choices[0].logprobs.tokens
    assert both.choices[0].logprobs.token_logprobs[n:] == pytest.approx(
        plain.choices[0].logprobs.token_logprobs, abs=1e-4
    )
    assert both.choices[0].logprobs.text_offset[n] == len(TEXTS[1])

    stream = list(
        c.completions.create(
            model=served.model, prompt=TEXTS[1:], max_tokens=4, echo=True, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body=FULL,
        )
    )  # fmt: skip
    texts = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    single = [
        c.completions.create(model=served.model, prompt=t, max_tokens=4, temperature=0, extra_body=FULL)
        for t in TEXTS[1:]
    ]
    assert [texts[0], texts[1]] == [t + s.choices[0].text for t, s in zip(TEXTS[1:], single, strict=True)]
    assert stream[-1].usage.completion_tokens == 8
    wait_for_clean_blocks(served)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),  # nothing to generate and nothing to echo
        ({"prompt": ["hi"] * 65, "max_tokens": 1}, "prompt"),  # over max_prompts_per_request
        ({"prompt": [], "max_tokens": 1}, "prompt"),
        ({"prompt": [[1, 2], []], "max_tokens": 0, "echo": True}, "prompt"),
        ({"prompt": "hi", "echo": True, "logprobs": 21}, "logprobs"),
        ({"prompt": "hi", "adept": {"prefill": {"policy": "sometimes"}}}, "adept.prefill.policy"),
    ],
)
def test_bad_scoring_requests_are_refused(served, body, param):
    r = httpx.post(f"{served.http}/v1/completions", json={"model": served.model, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_chat_has_no_echo(served):
    body = {"model": served.model, "messages": [{"role": "user", "content": "hi"}], "echo": True}
    r = httpx.post(f"{served.http}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"
    ok = client(served).completions.create(model=served.model, prompt="Hello", max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens == 2  # the server goes on serving


def test_grpc_scores_the_prompt(served, reference):
    ids, _logp = reference[2]
    request = pb.GenerateRequest(
        prompt=TEXTS[2], max_tokens=0, prompt_logprobs=1, adept=pb.ExitControls(policy="none"),
        prefill=pb.ExitControls(policy="static", max_depth=16, full_depth_last=1),
    )  # fmt: skip
    with grpc.insecure_channel(served.grpc) as channel:
        (message,) = list(adept_pb2_grpc.AdeptServiceStub(channel).Generate(request, timeout=120))
    assert message.finish_reason == "length" and message.usage.completion_tokens == 0
    assert [t.token_id for t in message.prompt] == ids
    assert [t.exit_layer for t in message.prompt] == [16] * (len(ids) - 1) + [30]
    assert not message.prompt[0].HasField("logprob") and all(t.HasField("logprob") for t in message.prompt[1:])
    assert all(len(t.top_logprobs) == 1 for t in message.prompt[1:])
    assert message.usage.prompt_layers_computed == 16 * (len(ids) - 1) + 30
    with grpc.insecure_channel(served.grpc) as channel:
        bad = pb.GenerateRequest(prompt="hi", max_tokens=0)
        with pytest.raises(grpc.RpcError) as error:
            list(adept_pb2_grpc.AdeptServiceStub(channel).Generate(bad, timeout=60))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens" in error.value.details()
