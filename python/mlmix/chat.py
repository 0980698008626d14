"""Chat templates: Jinja strings for ChatML and Llama-3, and their Jinja-free fast renderers.

The loss mask marks the tokens the model must learn: an assistant turn's content and its end-of-turn token
(``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama-3). The template glue around them is not trained: the role
header (``<|im_start|>assistant\\n``) and, for ChatML, the ``\\n`` that follows ``<|im_end|>``. Neither is ever
sampled: the header is the generation prompt, and generation stops at ``<|im_end|>``, so they carry no learning
signal. With a model's own template, ``{% generation %}`` blocks, when present, decide the mask.

``train_glue`` trains glue as well, for users who must match other tools (docs/tokenize.md compares with TRL):
``"after_turn"`` the glue after each trained end-of-turn token (ChatML's ``\\n``; Llama-3 has none), as TRL's
``completion_only_loss`` does; ``"around_turn"`` that and the whitespace that ends the role header (ChatML's
``\\n`` after ``assistant``, Llama-3's ``\\n\\n``), as TRL's Qwen2.5 training template does. Fast templates
mark the first with the mask code ``GLUE`` and name the second in ``assistant_header_glue``; the Jinja path
(``{% generation %}`` spans included) adds the whitespace after and before each trained turn's span.

Fast path and why it is exact. HF tokenizers split a text at special (added) tokens first and pre-tokenize
each piece on its own, so tokenising a rendered conversation equals tokenising its pieces between special
tokens separately and concatenating. The fast renderers emit exactly those pieces. The one place a mask
boundary falls inside a piece is the assistant header ("assistant\\n" in ChatML, "\\n\\n" in Llama-3) followed
by the content; there the joint tokens are checked to begin with the header's own tokens, and where they do
not (a token spans the boundary, e.g. content starting with a newline), the boundary is found from character
offsets and the straddling token is trained, as transformers' ``return_assistant_tokens_mask`` does.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

__all__ = ["CHATML_TEMPLATE", "LLAMA3_TEMPLATE", "FastTemplate", "ChatML", "Llama3", "FAST_TEMPLATES", "TRAIN_GLUE"]

# which template glue next to a trained assistant turn is trained too (see the module docstring)
TRAIN_GLUE = ("none", "after_turn", "around_turn")

# ChatML as Qwen uses it (without a default system prompt), with {% generation %} around the trained span.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Llama-3's structure: BOS, then per message a role header, a blank line and the trimmed content + <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first -%}{{- bos_token -}}{%- endif -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] | trim + '<|eot_id|>' -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- message['content'] | trim + '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

# piece kinds: FIXED pieces have token ids known in advance (special tokens, constant glue between them);
# TEXT pieces are tokenised. Mask codes: 0 untrained, 1 trained, 2 = assistant run (header untrained, rest trained),
# 3 = the glue after a trained end-of-turn token (trained only with train_glue "after_turn" or "around_turn")
FIXED, TEXT = 0, 1
UNTRAINED, TRAINED, SPLIT, GLUE = 0, 1, 2, 3


class FastTemplate:
    """A chat template rendered without Jinja, as pieces split at special tokens.

    ``pieces(conv, trained, out)`` appends ``(kind, string, mask_code)`` for a conversation (a list of
    ``(role, content)``); ``trained[i]`` is 0 (message i untrained), 1 (an assistant message whose content and
    end-of-turn token are trained) or 2 (``train_on="all"``: every token of the message, glue included).
    Mask codes are ``UNTRAINED``, ``TRAINED``, ``SPLIT`` (an assistant TEXT piece: ``assistant_header``, the
    text at its start, is not trained, the rest is) and ``GLUE`` (the glue after a trained end-of-turn token,
    trained with ``train_glue`` ``"after_turn"`` or ``"around_turn"``). ``assistant_header_glue`` is the end of
    ``assistant_header`` that ``train_glue="around_turn"`` trains (whitespace between role and content).
    """

    name = "base"
    assistant_header = ""
    assistant_header_glue = ""
    required_specials: Sequence[str] = ()

    def pieces(self, conv, trained, out: list) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def render(self, conv) -> str:
        out: list = []
        self.pieces(conv, [0] * len(conv), out)
        return "".join(s for _, s, _ in out)

    def untrained_header(self, train_glue: str = "none") -> str:
        """The start of an assistant TEXT piece that is not trained under ``train_glue``."""
        if train_glue == "around_turn" and self.assistant_header_glue:
            return self.assistant_header[: len(self.assistant_header) - len(self.assistant_header_glue)]
        return self.assistant_header

    def trained_spans(self, conv, trained, train_glue: str = "none") -> list[tuple[int, int]]:
        """Character spans ``[start, end)`` of :meth:`render`'s text that are trained (adjacent ones merged)."""
        out: list = []
        self.pieces(conv, trained, out)
        spans: list[tuple[int, int]] = []
        pos = 0
        header = len(self.untrained_header(train_glue))
        on = (TRAINED, GLUE) if train_glue != "none" else (TRAINED,)
        for _, s, m in out:
            lo = pos if m in on else pos + header if m == SPLIT else None
            pos += len(s)
            if lo is None or pos <= lo:
                continue
            if spans and spans[-1][1] == lo:
                spans[-1] = (spans[-1][0], pos)
            else:
                spans.append((lo, pos))
        return spans


class ChatML(FastTemplate):
    """``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message; an optional default system prompt."""

    name = "chatml"
    assistant_header = "assistant\n"
    assistant_header_glue = "\n"
    required_specials = ("<|im_start|>", "<|im_end|>")

    def __init__(self, default_system: Optional[str] = None):
        self.default_system = default_system

    def pieces(self, conv, trained, out: list) -> None:
        append = out.append
        if self.default_system is not None and conv and conv[0][0] != "system":
            m = TRAINED if trained and trained[0] == 2 else UNTRAINED
            append((FIXED, "<|im_start|>", m))
            append((TEXT, "system\n" + self.default_system, m))
            append((FIXED, "<|im_end|>", m))
            append((FIXED, "\n", m))
        for (role, content), t in zip(conv, trained):
            if t == 2:  # train_on="all": everything
                append((FIXED, "<|im_start|>", TRAINED))
                append((TEXT, role + "\n" + content, TRAINED))
                append((FIXED, "<|im_end|>", TRAINED))
                append((FIXED, "\n", TRAINED))
                continue
            append((FIXED, "<|im_start|>", UNTRAINED))
            append((TEXT, role + "\n" + content, SPLIT if t else UNTRAINED))
            append((FIXED, "<|im_end|>", TRAINED if t else UNTRAINED))
            append((FIXED, "\n", GLUE if t else UNTRAINED))


class Llama3(FastTemplate):
    """``<|begin_of_text|>`` then ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|>``."""

    name = "llama3"
    assistant_header = "\n\n"
    assistant_header_glue = "\n\n"
    required_specials = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

    def __init__(self, bos_token: str = "<|begin_of_text|>"):
        self.bos_token = bos_token
        if bos_token:
            self.required_specials = (bos_token, *Llama3.required_specials)

    def pieces(self, conv, trained, out: list) -> None:
        append = out.append
        first = True
        for (role, content), t in zip(conv, trained):
            all_on = t == 2
            if first and self.bos_token:
                append((FIXED, self.bos_token, TRAINED if all_on else UNTRAINED))
            first = False
            head = TRAINED if all_on else UNTRAINED
            append((FIXED, "<|start_header_id|>", head))
            append((FIXED, role, head))
            append((FIXED, "<|end_header_id|>", head))
            # Jinja's trim is Python's str.strip()
            append((TEXT, "\n\n" + content.strip(), TRAINED if all_on else (SPLIT if t else UNTRAINED)))
            append((FIXED, "<|eot_id|>", TRAINED if t else UNTRAINED))


FAST_TEMPLATES: dict[str, Callable[..., FastTemplate]] = {"chatml": ChatML, "llama3": Llama3}

# Conversations whose Jinja rendering must equal the fast rendering before the fast path stands in for a
# model's own template (checked once per template).
PROBES = [
    [("user", "Hi")],
    [("user", "Hello there"), ("assistant", "General Kenobi.")],
    [("system", "Be brief."), ("user", " x "), ("assistant", "\n y \n"), ("user", ""), ("assistant", "")],
    [("system", "S"), ("user", "a\n\nb"), ("assistant", "c\td"), ("user", "e"), ("assistant", "  f  ")],
    [("user", "Привет, 世界 🌍"), ("assistant", "שלום عربي")],
]


def probe_default_system(render_jinja: Callable) -> Optional[str]:
    """For a ChatML-like template: the system prompt it inserts when the first message is not one, if any."""
    text = render_jinja([("user", "Hi")])
    prefix = "<|im_start|>system\n"
    if text.startswith(prefix) and "<|im_end|>" in text:
        return text[len(prefix) : text.index("<|im_end|>")]
    return None
