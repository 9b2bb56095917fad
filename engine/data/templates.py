"""Chat templates, rendered in jinja2's sandbox, and where the trained-on text lies.

Templates are data, not code: one from a tokenizer file or a user is rendered in an
``ImmutableSandboxedEnvironment`` so it cannot reach Python internals.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.errors import ConfigError

Message = dict[str, str]

# Every template renders incrementally (a conversation's text starts with the text of any
# prefix of it plus the generation prompt): that is how assistant spans are located.
# Newlines sit after ``}}`` or text, never right after ``%}`` (trim_blocks would eat them).
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

ALPACA = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
    "{% else %}### Response:\n{{ m['content'] }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)

# Meta's Llama-2 chat format: the system prompt sits inside the first [INST] block.
LLAMA2 = (
    "{% set ns = namespace(system='') %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = m['content'] %}"
    "{% elif m['role'] == 'user' %}{{ bos_token }}[INST] "
    "{% if ns.system %}<<SYS>>\n{{ ns.system }}\n<</SYS>>\n\n{% set ns.system = '' %}{% endif %}"
    "{{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}"
    "{% endfor %}"
)

# Mistral-Instruct: no system role; a system prompt is prepended to the first user turn.
MISTRAL = (
    "{% set ns = namespace(system='') %}{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\n\n' %}"
    "{% elif m['role'] == 'user' %}[INST] {{ ns.system }}{{ m['content'] }} [/INST]{% set ns.system = '' %}"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)

# Microsoft phi-2's QA format.
PHI = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}Instruct: {{ m['content'] }}\n"
    "{% else %}Output: {{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Output:{% endif %}"
)

TEMPLATES: dict[str, str] = {"alpaca": ALPACA, "chatml": CHATML, "llama2": LLAMA2, "mistral": MISTRAL, "phi": PHI}


@lru_cache(maxsize=16)
def _compile(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(source)


def _raise(msg: str):
    raise ValueError(msg)


def template_source(name: str, tokenizer) -> str:
    """Jinja source of a template name: a built-in, ``model`` (the tokenizer's own) or a .jinja file."""
    if name == "model":
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                f"data.template: 'model' but this tokenizer has no chat template; pick one of {', '.join(sorted(TEMPLATES))}"
            )
        return tokenizer.chat_template
    if name in TEMPLATES:
        return TEMPLATES[name]
    path = Path(name).expanduser()
    if path.suffix in (".jinja", ".j2") and path.is_file():
        return path.read_text()
    raise ConfigError(f"data.template: unknown template '{name}'; valid: model, {', '.join(sorted(TEMPLATES))}, or a .jinja file")


def render(source: str, messages: list[Message], *, add_generation_prompt: bool, tokenizer=None) -> str:
    special = {}
    if tokenizer is not None:
        special = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}
    return _compile(source).render(messages=messages, add_generation_prompt=add_generation_prompt, **special)


def render_with_spans(source: str, messages: list[Message], tokenizer=None) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return the text and the char spans of every assistant turn.

    A span runs from the end of the generation prompt before the turn to the end of the
    turn (its end-of-turn marker included). Where the turn does not end with the
    tokenizer's EOS (alpaca, phi, or ChatML with another EOS), EOS is inserted at the end
    of the span, so the model learns to stop.
    """
    text = render(source, messages, add_generation_prompt=False, tokenizer=tokenizer)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(source, messages[:i], add_generation_prompt=True, tokenizer=tokenizer)
        upto = render(source, messages[: i + 1], add_generation_prompt=False, tokenizer=tokenizer)
        if not text.startswith(upto) or not upto.startswith(prefix):
            raise ConfigError(
                "data.template: the template does not render conversations incrementally (a turn changes the "
                "text before it), so assistant tokens cannot be located; use another template"
            )
        spans.append((len(prefix), len(upto.rstrip())))
    eos = getattr(tokenizer, "eos_token", None) if tokenizer is not None else None
    if eos:
        shift, fixed = 0, []
        for s, e in spans:
            if not text[s + shift : e + shift].endswith(eos):
                text = text[: e + shift] + eos + text[e + shift :]
                fixed.append((s + shift, e + shift + len(eos)))
                shift += len(eos)
            else:
                fixed.append((s + shift, e + shift))
        spans = fixed
    return text, spans
