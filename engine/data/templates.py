"""Chat templates, rendered in jinja2's sandbox, and where the trained-on text lies.

Templates are data, not code: one from a tokenizer file or a user is rendered in an
``ImmutableSandboxedEnvironment`` so it cannot reach Python internals. A user's .jinja file
is compiled and trial-rendered at validation (``check_template_file``): a syntax error is
reported with its line, a sandbox violation with what was reached for, before anything loads.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from jinja2 import TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

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

PLAIN_KINDS = frozenset({"text", "documents"})
"""Data kinds that are plain text: no chat template, no prompt, every token trained on."""


def templated(kind: str) -> bool:
    """Does data of this kind go through a chat template (and so have prompts and answers)?

    The one rule behind: tokenizing (plain text is not rendered), the template an export
    embeds (plain text leaves the tokenizer's own), and validation refusing what needs a
    prompt (retrieval passages in prompts, GRPO) on plain text.
    """
    return kind not in PLAIN_KINDS


# A conversation with every role, for the trial render at validation.
TRIAL = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is a wetland?"},
    {"role": "assistant", "content": "Land covered by shallow water."},
    {"role": "user", "content": "And a bog?"},
    {"role": "assistant", "content": "A wetland of peat."},
]
ALLOWED = "templates may read messages, add_generation_prompt, bos_token and eos_token, and call raise_exception"


@lru_cache(maxsize=16)
def _compile(source: str):
    """The one jinja environment every chat render goes through (training, merge, both serving backends).

    Sandboxed and immutable, with what hub chat templates use beyond plain jinja (as transformers'
    own renderer has them): ``loopcontrols`` (break/continue) and a ``tojson`` filter.
    """
    import json

    import jinja2.ext

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = _raise
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    return env.from_string(source)


def compiled(source: str):
    """A template source compiled in the one environment (cached): ``TemplateSyntaxError`` if it cannot be."""
    return _compile(source)


def _raise(msg: str):
    raise ValueError(msg)


def check_template_file(path: str) -> str | None:
    """What is wrong with a user's template file (syntax, sandbox), or None; validation reports it.

    The trial render covers what every conversation reaches (roles, contents, the
    generation prompt). Errors other than the sandbox's, such as a template that refuses
    a system message with raise_exception, are left to the rows that trigger them.
    """
    source = Path(path).expanduser().read_text()
    try:
        compiled = _compile(source)
    except TemplateSyntaxError as e:
        return _syntax(Path(path).name, e)
    for prompt in (False, True):
        for messages in (TRIAL, TRIAL[1:3]):
            try:
                compiled.render(messages=messages, add_generation_prompt=prompt, bos_token="<s>", eos_token="</s>")
            except (SecurityError, OverflowError) as e:
                return _sandboxed(f"template {Path(path).name}", e)
            except Exception:  # the template's own checks on a row (raise_exception): not a config problem
                pass
    return None


def _syntax(name: str, e: TemplateSyntaxError) -> str:
    return f"{name} line {e.lineno}: {e.message}; fix the template (jinja2 syntax) or use a built-in: {', '.join(TEMPLATES)}"


def _sandboxed(what: str, e: Exception) -> str:
    """``what`` tried to reach something the sandbox forbids: say what, not jinja2's traceback."""
    m = re.search(r"access to attribute '([^']+)' of '([^']+)' object", str(e))
    if m:
        return (
            f"{what} tried to access attribute '{m.group(1)}' of a {m.group(2)}, which is not allowed in the sandbox ({ALLOWED})"
        )
    return f"{what} was stopped by the sandbox: {str(e).rstrip('.')} ({ALLOWED})"


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
        source = path.read_text()
        try:
            _compile(source)
        except TemplateSyntaxError as e:
            raise ConfigError(f"data.template: {_syntax(path.name, e)}") from None
        return source
    raise ConfigError(f"data.template: unknown template '{name}'; valid: model, {', '.join(sorted(TEMPLATES))}, or a .jinja file")


def render(
    source: str,
    messages: list[Message],
    *,
    add_generation_prompt: bool,
    tokenizer=None,
    bos_token: str | None = None,
    eos_token: str | None = None,
) -> str:
    """The conversation as text; a sandbox violation is a ``ConfigError`` naming what was reached for.

    The one chat renderer: training, merge, and both serving backends call it with the run's recorded
    template (``recorded_template``), so a served prompt is the text the run trained on. ``bos_token`` /
    ``eos_token`` override the tokenizer's (llama.cpp names its own from the GGUF).
    """
    special = {}
    if tokenizer is not None:
        special = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}
    special |= {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v is not None}
    try:
        return _compile(source).render(messages=messages, add_generation_prompt=add_generation_prompt, **special)
    except (SecurityError, OverflowError) as e:
        raise TemplateStopped(_sandboxed("the chat template", e)) from None


class TemplateStopped(ConfigError):
    """The sandbox stopped a chat template: a config problem at training time (data.template, exit 2);
    a server says ``reason`` in its own words (the template came with the model or the run)."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"data.template: {reason}; use a built-in: {', '.join(TEMPLATES)}")


TEMPLATE_FILE = "chat_template.jinja"
"""The template a run trained with, saved beside its trained weights (adapter/ or model/): what merge
embeds in the export and what serving renders with, whatever the tokenizer or the preset says later."""


def save_template(weights_dir: Path, source: str) -> None:
    """Record the training template with the trained weights (nothing for plain-text data: no template)."""
    if source:
        (Path(weights_dir) / TEMPLATE_FILE).write_text(source)


def recorded_template(run_dir: Path | None) -> str | None:
    """The template a finished run trained with (adapter/ or model/ of ``run_dir``); None if it recorded none."""
    if run_dir is None:
        return None
    for where in ("adapter", "model"):
        path = Path(run_dir) / where / TEMPLATE_FILE
        if path.is_file():
            return path.read_text()
    return None


def render_with_spans(source: str, messages: list[Message], tokenizer=None) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return the text and the char spans of every assistant turn.

    A span runs from the end of the generation prompt before the turn to the end of the
    turn (its end-of-turn marker included). Where the turn does not end with the
    tokenizer's EOS (alpaca, phi, or ChatML with another EOS), EOS is inserted at the end
    of the span, so the model learns to stop.
    """
    text = render(source, messages, add_generation_prompt=False, tokenizer=tokenizer)
    spans = []
    last = len(messages) - 1
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(source, messages[:i], add_generation_prompt=True, tokenizer=tokenizer)
        # The last turn's text up to its end is the whole text: not rendered twice (a third of the renders of a Q&A row).
        upto = text if i == last else render(source, messages[: i + 1], add_generation_prompt=False, tokenizer=tokenizer)
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
