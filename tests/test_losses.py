"""ce_regression: finds the number in each answer, predicts it with gradient, logs both terms."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, TINY_TOKENIZER, compose

from engine.errors import ConfigError
from engine.loss import LOSSES
from engine.loss.regression import RegressionSpec


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_TOKENIZER)


def make_batch(tok, answers: list[str], prompt: str = "Rate it. "):
    """Prompt tokens unlabelled, answer tokens labelled; right-padded."""
    rows = []
    for answer in answers:
        p = tok.encode(prompt, add_special_tokens=False)
        a = tok.encode(answer, add_special_tokens=False)
        rows.append((p + a, [-100] * len(p) + a))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
    return {"input_ids": ids, "labels": labels, "attention_mask": (labels != -200).long()}


def oracle(batch, vocab: int, sharp: float = 60.0):
    """Hidden states whose logits (identity LM head) put almost all mass on the true next token."""
    ids = batch["input_ids"]
    hidden = torch.zeros(*ids.shape, vocab)
    hidden[:, :-1] = torch.nn.functional.one_hot(ids[:, 1:], vocab).float() * sharp
    head = torch.nn.Linear(vocab, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(vocab))
    return hidden, head


def build(tok, **kw):
    return LOSSES.build(RegressionSpec(kind="ce_regression", **kw), tokenizer=tok)


@pytest.mark.parametrize("answer, value", [("Score: 0.42", 0.42), ("Score: -0.05", -0.05), ("Score: 1.00", 1.0)])
def test_parse_finds_the_value_and_its_digit_tokens(tok, answer, value):
    loss = build(tok)
    target = loss.parse(tuple(tok.encode(answer, add_special_tokens=False)))
    assert target.value == pytest.approx(value)
    assert target.digits, "no digit token is modelled"
    # Modelled digits plus constants reconstruct the magnitude at their place values.
    pieces = [tok.decode([i]) for i in tok.encode(answer, add_special_tokens=False)]
    rebuilt = sum(int(pieces[j].strip()) * scale for j, _, scale in target.digits) + target.constant
    assert rebuilt == pytest.approx(abs(value))


def test_expected_value_matches_the_target_when_the_model_is_certain(tok):
    batch = make_batch(tok, ["Score: 0.42", "Score: -0.05", "Score: -1.00"])
    hidden, head = oracle(batch, len(tok))
    loss, parts = build(tok)(hidden, batch["labels"], head, batch)
    assert parts["reg_values"] == 3 and parts["reg_missing"] == 0
    assert parts["reg"] < 1e-6 and parts["reg_abs_err"] < 1e-3
    assert loss.item() == pytest.approx(parts["ce"] + 10 * parts["reg"], rel=1e-4)


def test_regression_term_sends_gradient_to_the_number_positions_only(tok):
    batch = make_batch(tok, ["Score: 0.42 thanks"])
    torch.manual_seed(0)
    head = torch.nn.Linear(16, len(tok), bias=False)
    hidden = torch.randn(*batch["input_ids"].shape, 16, requires_grad=True)
    with_reg, parts = build(tok, weight=10.0)(hidden, batch["labels"], head, batch)
    (grad_total,) = torch.autograd.grad(with_reg, hidden)
    ce_only, _ = build(tok, weight=0.0)(hidden, batch["labels"], head, batch)
    (grad_ce,) = torch.autograd.grad(ce_only, hidden)
    reg_grad = (grad_total - grad_ce).abs().sum(-1)[0]
    assert parts["reg"] > 0
    moved = set(torch.nonzero(reg_grad > 1e-8).flatten().tolist())
    # The positions that predict the sign/first token and each digit token of " 0.42".
    prompt_len = len(tok.encode("Rate it. ", add_special_tokens=False))
    target = build(tok).parse(tuple(tok.encode("Score: 0.42 thanks", add_special_tokens=False)))
    expected = {prompt_len + target.sign_at - 1} | {prompt_len + j - 1 for j, _, _ in target.digits}
    assert moved == expected


def test_answers_without_a_number_contribute_ce_only_and_are_counted(tok):
    batch = make_batch(tok, ["no value here", "still nothing"])
    torch.manual_seed(0)
    head = torch.nn.Linear(16, len(tok), bias=False)
    hidden = torch.randn(*batch["input_ids"].shape, 16)
    loss, parts = build(tok)(hidden, batch["labels"], head, batch)
    ce, _ = LOSSES.build(compose([*TINY]).loss, tokenizer=tok)(hidden, batch["labels"], head, batch)
    assert parts["reg_values"] == 0 and parts["reg_missing"] == 2 and parts["reg"] == 0.0
    assert loss.item() == pytest.approx(ce.item())


def test_error_kinds(tok):
    batch = make_batch(tok, ["Score: 0.42"])
    torch.manual_seed(1)
    head = torch.nn.Linear(16, len(tok), bias=False)
    hidden = torch.randn(*batch["input_ids"].shape, 16)
    _, mse = build(tok, error="mse")(hidden, batch["labels"], head, batch)
    _, mae = build(tok, error="mae")(hidden, batch["labels"], head, batch)
    _, huber = build(tok, error="huber", huber_delta=100.0)(hidden, batch["labels"], head, batch)
    assert mae["reg"] == pytest.approx(mae["reg_abs_err"])
    assert mse["reg"] == pytest.approx(mae["reg"] ** 2, rel=1e-5)
    assert huber["reg"] == pytest.approx(0.5 * mse["reg"], rel=1e-5)


def test_a_named_group_narrows_the_match(tok):
    loss = build(tok, pattern=r"Score: (?P<value>-?\d+\.\d+)", occurrence="first")
    ids = tuple(tok.encode("Step 3 gives Score: 0.42", add_special_tokens=False))
    assert loss.parse(ids).value == pytest.approx(0.42)
    assert build(tok, occurrence="first").parse(ids).value == 3.0


def test_loss_config_is_validated():
    cfg = compose([*TINY, "loss=ce_regression"])
    assert cfg.loss.weight == 10.0 and cfg.loss.error == "mse"
    with pytest.raises(ConfigError) as err:
        compose([*TINY, "loss=ce_regression", "loss.pattern='(unclosed'", "loss.error=rmse", "loss.weight=-1"])
    message = str(err.value)
    for key in ["loss.pattern", "not a valid regular expression", "loss.error", "'huber'", "loss.weight"]:
        assert key in message, message


def test_read_gives_each_rows_expected_value_or_none(tok):
    """The evaluation readout: per row, the expected value the loss trains (None: no number)."""
    batch = make_batch(tok, ["Score: -0.35", "no value here", "Score: 0.80"])
    hidden, head = oracle(batch, len(tok))
    values = build(tok).read(hidden, batch["labels"], head)
    assert values[1] is None
    assert values[0] == pytest.approx(-0.35, abs=1e-3) and values[2] == pytest.approx(0.8, abs=1e-3)
    # An uncertain sign pulls the value toward 0: the expectation, not the argmax.
    loss = build(tok)
    row = batch["labels"][2]
    start = (row != -100).nonzero()[0].item()
    sign_pos = start + loss.parse(tuple(row[row != -100].tolist())).sign_at - 1
    hedged_hidden = hidden.clone()
    hedged_hidden[2, sign_pos, loss.vocab.minus[0]] = hedged_hidden[2, sign_pos].max()  # '-' ties the true token
    hedged = loss.read(hedged_hidden, batch["labels"], head)[2]
    assert abs(hedged) < 0.1


def test_expected_value_readout_on_a_model(tok):
    """engine/evaluation/numeric.py: tokenizes prompt + given answer, reads the value at its number."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.data import Example
    from engine.data.templates import template_source
    from engine.evaluate.numeric import expected_values, reader_for

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
        )
    )
    ex = Example([], [], [{"role": "user", "content": "Rate it."}, {"role": "assistant", "content": "Score: 0.10"}])
    reader = reader_for(compose([*TINY]).loss, tok)  # a CE run still gets a reader with default settings
    template = template_source("chatml", tok)
    values = expected_values(model, tok, template, [ex, ex], ["Score: 0.42", "no number"], reader, batch_size=2, device="cpu")
    assert values[1] is None
    assert isinstance(values[0], float) and -10 < values[0] < 10
