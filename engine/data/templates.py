"""Chat templates, rendered in jinja2's sandbox, and where the trained-on text lies.

Templates are data, not code: one from a tokenizer file or a user is rendered in an
``ImmutableSandboxedEnvironment`` so it cannot reach Python internals.
"""

from __future__ import annotations

from functools import lru_cache

from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.errors import ConfigError

Message = dict[str, str]

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TEMPLATES: dict[str, str] = {"chatml": CHATML}


@lru_cache(maxsize=16)
def _compile(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(source)


def _raise(msg: str):
    raise ValueError(msg)


def template_source(name: str, tokenizer) -> str:
    if name == "model":
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("data.template: 'model' but this tokenizer has no chat template; "
                              f"pick one of {sorted(TEMPLATES)}")
        return tokenizer.chat_template
    if name not in TEMPLATES:
        raise ConfigError(f"data.template: unknown template '{name}'; valid: model, {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


def render(source: str, messages: list[Message], *, add_generation_prompt: bool, tokenizer=None) -> str:
    special = {}
    if tokenizer is not None:
        special = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}
    return _compile(source).render(messages=messages, add_generation_prompt=add_generation_prompt, **special)


def render_with_spans(source: str, messages: list[Message], tokenizer=None) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return the text and the char spans of every assistant turn.

    A span runs from the end of the generation prompt before the turn to the end of the
    turn (its end-of-turn marker included, so the model learns to stop).
    """
    text = render(source, messages, add_generation_prompt=False, tokenizer=tokenizer)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(source, messages[:i], add_generation_prompt=True, tokenizer=tokenizer)
        upto = render(source, messages[: i + 1], add_generation_prompt=False, tokenizer=tokenizer)
        if not text.startswith(upto) or not upto.startswith(prefix):
            raise ValueError("template does not render conversations incrementally")
        spans.append((len(prefix), len(upto.rstrip())))
    return text, spans
