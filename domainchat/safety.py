"""Safety: input limits, risk-rule triggers, and screening of text before it reaches the model.

Owns the explicit limits a user can hit (question length, history length), the checks that run on
a question before anything else, the screening of document text for instruction-like content
(prompt injection: OWASP LLM01) and the check that an answer does not repeat the system prompt
(LLM07). It knows a domain's risk rules but nothing about models or retrieval; `knowledge` and
`chat` decide what to do with what it finds.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from domainchat.domains import Domain, RiskRule
from domainchat.errors import BadInput, TooLarge

MAX_QUESTION_CHARS = 2000
MAX_HISTORY_TURNS = 20  # user+assistant pairs kept; older turns are dropped by prompts.render anyway
MAX_TURN_CHARS = 8000

# Control characters (C0/C1, but not tab/newline) and other invisible format characters, which can
# hide instructions or break the tokenizer; right-to-left marks and emoji are kept.
# Zero-width space, word joiner, BOM and soft hyphen: invisible, and a way to split a word past a
# filter ("ign\u200bore"). The zero-width joiner stays: emoji sequences need it.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u2060\ufeff\u00ad]")


def remove_invisible(text: str) -> str:
    """Normalize Unicode (NFC) and drop control and invisible characters (tab and newline stay)."""
    return _CONTROL.sub("", unicodedata.normalize("NFC", text))


def clean_text(text: str) -> str:
    """`remove_invisible`, then drop chat-template markup and trim whitespace."""
    return strip_role_markup(remove_invisible(text)).strip()


def clean_question(question: str) -> str:
    """The question as the pipeline will use it, or BadInput saying what to change."""
    if not isinstance(question, str):
        raise BadInput("The question must be text.")
    cleaned = clean_text(question)
    if not cleaned:
        raise BadInput("The question is empty: type a question.")
    if len(cleaned) > MAX_QUESTION_CHARS:
        raise TooLarge(
            f"The question is {len(cleaned)} characters long; the limit is {MAX_QUESTION_CHARS}. Shorten it."
        )
    return cleaned


def clean_history(history: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Earlier (user, assistant) turns, cleaned; only the last MAX_HISTORY_TURNS are kept."""
    turns = []
    for user, assistant in list(history)[-MAX_HISTORY_TURNS:]:
        user, assistant = clean_text(str(user))[:MAX_TURN_CHARS], clean_text(str(assistant))[:MAX_TURN_CHARS]
        if user:
            turns.append((user, assistant))
    return turns


# Instruction-like text inside a document: it addresses the model instead of informing a reader.
# Each pattern matches within one sentence; the sentence (or tag block) is replaced, the rest of
# the document is kept. Patterns are specific on purpose: the shipped knowledge base must not
# trigger any of them (tests/test_safety.py checks it), since a false positive deletes facts.
# One pattern per line, however long: a regex split across lines is harder to read and to check.
_INJECTION_PATTERNS = [
    r"\b(ignore|disregard|forget|override|bypass)\b[^.!?\n]{0,40}\b(previous|prior|above|preceding|earlier|all|any|your|the system|these|those|other)\b[^.!?\n]{0,30}\b(instructions?|prompts?|rules?|directions?|guidelines?|context|messages?|text|policies|polic(y|ies))",  # noqa: E501
    r"\b(new|updated|real|actual|hidden|secret|important) (system )?(instructions?|directives?|orders)\s*[:\-]",
    r"\b(you are now|from now on,? you|you must now|you will now|act as if you|pretend (to be|you are)|roleplay as)\b",
    r"\b(forget|ignore|disregard)\b (everything|all|anything)( that was| you were| you've been)?( said| told| written)? (above|before|so far|previously|earlier)",  # noqa: E501
    r"\byour (only|new|real|true|actual) (task|job|role|goal|purpose|instruction) (is|now)\b",
    r"^\s*(assistant|ai|chatbot|bot|llm)\s*[:,]\s+\w+",
    r"\b(reveal|print|repeat|output|show|display|tell me|disclose|leak|dump|recite|list)\b[^.!?\n]{0,40}\b(system prompt|(your|the) (hidden |initial |original |secret )?(instructions|prompt|configuration|rules)|other documents?|all (the )?documents?|every document|the passages?|(your|the) knowledge base)",  # noqa: E501
    r"\b(always|only|must)\s+(respond|reply|answer|say|begin|start|end|finish|append|include|add)\b[^.!?\n]{0,60}(\"|'|“|‘|\bwith\b|\bthe (word|phrase|code|text|string|link|url)\b)",  # noqa: E501
    r"\b(respond|reply|answer|say|end|begin|start)\b[^.!?\n]{0,30}\b(with|by saying|exactly)\b[^.!?\n]{0,20}(\"|'|“|‘)",
    r"\b(when|if) (asked|the user asks|a user asks|anyone asks)\b[^.!?\n]{0,80}\b(say|respond|reply|answer|tell|include|print|output|send)\b",  # noqa: E501
    r"\b(send|post|forward|upload|append|attach|include|transmit|exfiltrate)\b[^.!?\n]{0,60}\b(the |this |their |user'?s? |)(question|conversation|chat|query|prompt|message|history)\b[^.!?\n]{0,40}\b(to|into|in)\b[^.!?\n]{0,40}(https?://|\burl\b|\blink\b|\bendpoint\b|\bserver\b)",  # noqa: E501
    r"\b(assistant|ai|chatbot|language model|llm|model)s?\b[^.!?\n]{0,30}\b(must|should|shall|are required to|need to)\b[^.!?\n]{0,40}\b(ignore|disregard|reveal|say|respond|reply|output|print|include|append)\b",  # noqa: E501
]
_INJECTION = re.compile("|".join(f"(?:{p})" for p in _INJECTION_PATTERNS), re.IGNORECASE)
# Role and control markup of chat templates, and fake system tags: never data.
_ROLE_MARKUP = re.compile(
    r"<\|[^|>\n]{0,40}\|>|\[/?INST\]|<</?SYS>>|</?\s*(system|sys|instructions?|admin|developer|assistant|user)\s*>"
    r"|^\s*#{0,4}\s*(system|assistant|developer)\s*(prompt|message)?\s*:",
    re.IGNORECASE | re.MULTILINE,
)
_TAG_BLOCK = re.compile(r"<\s*(system|sys|instructions?|admin|developer)\s*>.*?<\s*/\s*\1\s*>|\[INST\].*?\[/INST\]"
                        r"|<<SYS>>.*?<</SYS>>|<\|im_start\|>.*?(<\|im_end\|>|$)", re.IGNORECASE | re.DOTALL)
# Links built to carry the conversation out: a URL with a placeholder for the question, or a
# markdown image (fetched by a renderer without a click) whose URL has a query string.
_EXFILTRATION = re.compile(
    r"!\[[^\]]*\]\(\s*https?://[^)\s]*\?[^)]*\)"
    r"|https?://\S*(\{|%7b|\$\{|<)\s*(question|query|prompt|input|user|conversation|chat|data|message)\S*",
    re.IGNORECASE,
)
# A sentence ends at . ! ? followed by a space or the end, or at a newline: a dot inside a URL or
# a number does not end it.
_SENTENCE = re.compile(r"(?:[^.!?\n]|[.!?]+(?=[^\s.!?]))*(?:[.!?]+|\n|$)")
NEUTRALIZED = "[instruction-like text removed]"


@dataclass(frozen=True)
class Screened:
    text: str
    findings: int  # instruction-like passages neutralized; 0 = the text is unchanged


def screen_document_text(text: str) -> Screened:
    """Neutralize instruction-like content in document text (flagged by the caller, document kept):
    fake system blocks and chat-template markup are removed, and every sentence that addresses the
    model (\"ignore the above…\", \"reveal your prompt\", exfiltration links) is replaced."""
    findings = 0

    def block(_: re.Match) -> str:
        nonlocal findings
        findings += 1
        return NEUTRALIZED

    text = _TAG_BLOCK.sub(block, text)
    text = _EXFILTRATION.sub(block, text)
    text = _ROLE_MARKUP.sub(block, text)
    out = []
    for match in _SENTENCE.finditer(text):
        sentence = match.group(0)
        if sentence and _INJECTION.search(sentence):
            findings += 1
            lead = sentence[: len(sentence) - len(sentence.lstrip())]
            out.append(lead + NEUTRALIZED + ("\n" if sentence.endswith("\n") else ""))
        else:
            out.append(sentence)
    return Screened(text="".join(out) if findings else text, findings=findings)


def strip_role_markup(text: str) -> str:
    """A user's own text with chat-template markup removed, so it cannot open a system turn."""
    return _ROLE_MARKUP.sub("", text)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


@functools.lru_cache(maxsize=64)
def _word_runs(system_prompt: str, words: int) -> tuple[str, ...]:
    """Every run of `words` consecutive words of a prompt; cached, since chat checks every token."""
    prompt = _words(system_prompt)
    return tuple(" ".join(prompt[i:i + words]) for i in range(max(len(prompt) - words + 1, 0)))


def repeats_system_prompt(answer: str, system_prompt: str, words: int = 8) -> bool:
    """True when the answer quotes any run of `words` consecutive words of the system prompt."""
    said = " ".join(_words(answer))
    return any(run in said for run in _word_runs(system_prompt, words))


def triggered_rules(domain: Domain, question: str) -> list[RiskRule]:
    """The domain's risk rules that the question triggers, in the order the domain lists them."""
    return [rule for rule in domain.risk_rules if rule.matches(question)]


def triggered_rule_ids(domain: Domain, question: str) -> list[str]:
    return [rule.id for rule in triggered_rules(domain, question)]
