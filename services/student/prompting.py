"""The one prompt builder, shared by the serving engine and the trainer.

Each categorical field is answered by ONE output token: every label gets a short code that
is a single token in the student's vocabulary. Serving restricts the next token to the
field's codes (`allowed_token_ids`) and reads the whole label distribution from one decode
step, which is ~5x faster on CPU than decoding label strings under a grammar (see README).

Two prompt styles:
- "instruct": instructions + the code table, for a base model that was never trained on the
  task (zero-shot). Long, but the shared prefix is served from vLLM's prefix cache.
- "compact": `Message: <ticket>\n<field>:` only, for a distilled adapter that learnt the codes.
  Six tokens around the ticket (the old `<|ticket|>…\n<|field|>` markers took 13, half of a
  typical BANKING77 prompt): prompt tokens are the trainer's and the engine's whole cost on
  CPU. The template is part of the prompt fingerprint the adapter's metadata records.

Prompts reach the model as token ids (`prompt_ids`): the template's chat markers are special
tokens, the ticket is plain text whatever it contains (`encode_text`: no typed string becomes
any special or added token of the loaded tokenizer). A long ticket is cut head + tail to the
prompt length the adapter was trained with (`prompt_budget`), in the trainer and the engine.

The fingerprint covers what the student's prompts and label codes depend on (`student_view`):
the inputs shown before the ticket, each field's name and its labels in order (an entities
field: its type names), the style, the template and the codes; the instruct prompt also
renders the instructions and descriptions. Teacher-only material (few-shot examples, and the
instructions and descriptions under the compact prompt adapters are trained with) is left
out, so editing it keeps the live adapter servable. A field or label added, removed, renamed
or reordered changes it: the live adapter is refused at load (README, "Changing your task").
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple, Protocol, Sequence

from schemas.task import EntityFieldSpec, FieldSpec, TaskSpec
from schemas.text import normalise_whitespace


class PromptStyle(str, Enum):
    instruct = "instruct"
    compact = "compact"


COMPACT_TEMPLATE = "Message: {body}\n{field}:"  # "Message:" is a stable first token (no BOS)
ENTITY_FORMAT = "entities:json-list-compact-v1"  # schemas.answer.entity_json


class TokenizerLike(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ..., **kwargs: Any) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class LabelCodes:
    """Bijection label <-> single-token code for one field."""

    field: str
    labels: tuple[str, ...]
    codes: tuple[str, ...]
    token_ids: tuple[int, ...]

    def label_for_token(self, token_id: int) -> str:
        return self.labels[self.token_ids.index(token_id)]

    def token_for_label(self, label: str) -> int:
        return self.token_ids[self.labels.index(label)]

    def code_for_label(self, label: str) -> str:
        return self.codes[self.labels.index(label)]


def _candidate_codes(label: str) -> list[str]:
    """Preferred codes first: initials of the label's words, so codes read as hints."""
    words = [w for w in label.replace("-", "_").split("_") if w]
    initials = "".join(w[0] for w in words).upper()
    preferred = [initials[:2], initials[:1], (words[0][:2] if words else "").upper()]
    return [c for c in preferred if c and c.isascii() and c.isalpha()]


def _fallback_pool() -> list[str]:
    letters = string.ascii_uppercase
    return list(letters) + [a + b for a in letters for b in letters]


def build_label_codes(field: FieldSpec, tokenizer: TokenizerLike) -> LabelCodes:
    """Deterministic codes: same labels + same tokenizer give the same codes everywhere."""

    def single_token(code: str) -> int | None:
        ids = tokenizer.encode(code, add_special_tokens=False)
        return ids[0] if len(ids) == 1 else None

    taken: set[str] = set()
    codes: list[str] = []
    token_ids: list[int] = []
    pool = _fallback_pool()
    for label in field.labels:
        chosen = None
        for code in _candidate_codes(label) + pool:
            if code in taken:
                continue
            token = single_token(code)
            if token is not None and token not in token_ids:
                chosen = (code, token)
                break
        if chosen is None:
            raise ValueError(f"no single-token code left for label {label!r}")
        taken.add(chosen[0])
        codes.append(chosen[0])
        token_ids.append(chosen[1])
    return LabelCodes(field.name, tuple(field.labels), tuple(codes), tuple(token_ids))


def build_all_codes(task: TaskSpec, tokenizer: TokenizerLike) -> dict[str, LabelCodes]:
    """Codes of the categorical fields (the entities field has none: it generates JSON)."""
    return {f.name: build_label_codes(f, tokenizer) for f in task.categorical_fields}


def normalise_text(text: str) -> str:
    """Ticket text as the student sees it: whitespace collapsed (training and serving alike).
    Typed special tokens stay text where text becomes ids (`encode_text`), not here."""
    return normalise_whitespace(text)


def _added_token_strings(tokenizer: Any) -> dict[int, str]:
    """id -> string of the tokenizer's added tokens (specials and others: `<|im_end|>`,
    `<filename>`, `[INST]`, `</s>` ...); {} for a tokenizer that lists none."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return {int(i): str(getattr(t, "content", t)) for i, t in dict(added).items()}


def encode_text(tokenizer: TokenizerLike, text: str) -> list[int]:
    """Text -> ids as plain text: no typed string becomes a special or added token of this
    tokenizer, whichever it is. The tokenizer splits its special tokens itself
    (`split_special_tokens`); an added token it still matches (one not marked special, or a
    tokenizer that ignores the flag) is broken apart in the text, `<tool_call>` ->
    `< tool_call>`, and the text encoded again."""
    added = {i: s for i, s in _added_token_strings(tokenizer).items() if len(s.strip()) > 1}
    for _ in range(len(added) + 1):
        ids = list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))
        hits = {added[i] for i in ids if i in added}
        if not hits:
            return ids
        for s in sorted(hits, key=len, reverse=True):
            text = text.replace(s, s[:1] + " " + s[1:])
    # Not reached by any tokenizer seen (each pass breaks every hit); dropped rather than a
    # failed batch: such an id must never reach the model.
    return [i for i in ids if i not in added]


def _template_ids(tokenizer: TokenizerLike, template: str) -> list[int]:
    """The template's own text, whose chat markers are meant as special tokens."""
    return list(tokenizer.encode(template, add_special_tokens=False)) if template else []


def prompt_ids(tokenizer: TokenizerLike, task: TaskSpec, field: str, text: str, style: PromptStyle,
               codes: LabelCodes | None) -> list[int]:
    """The field's prompt as token ids, identically in serving and training (no implicit BOS):
    the template's markers are special tokens, the ticket is plain text (`encode_text`). The
    markers bound the segments the tokenizer encodes apart anyway, so an ordinary ticket gets
    the ids its rendered prompt always had (adapters trained before stay valid)."""
    head, middle, tail = _prompt_parts(task, field, normalise_text(text), style, codes)
    return _template_ids(tokenizer, head) + encode_text(tokenizer, middle) + _template_ids(tokenizer, tail)


def truncate_tokens(tokenizer: TokenizerLike, body_ids: Sequence[int], budget: int) -> str:
    """A long ticket cut by tokens to `budget`: its head (2/3) and tail (1/3), joined by " … ".
    Deterministic, so the trainer and the engine cut the same ticket the same way."""
    if len(body_ids) <= budget:
        return tokenizer.decode(list(body_ids))
    head = max(1, budget * 2 // 3)
    tail = max(0, budget - head)
    kept_tail = tokenizer.decode(list(body_ids[len(body_ids) - tail:])) if tail else ""
    return tokenizer.decode(list(body_ids[:head])) + " … " + kept_tail


def entity_max_tokens(spec: Any) -> int:
    """Output budget of the entities JSON: ~10 tokens of structure per entity plus its span
    (a token is >= 1 character... usually ~3): bounded by the schema's maxItems/maxLength."""
    return 4 + spec.max_entities * (10 + spec.max_span_chars // 2)


def adapter_max_prompt_tokens(adapter: Any) -> int | None:
    """The prompt length an adapter was trained with (longer tickets cut to fit it), from its
    metadata (`max_prompt_tokens`; older adapters: the trainer's `max_tokens` argument);
    None: the base model, or an adapter that recorded none."""
    meta = getattr(adapter, "meta", None) or {}
    value = meta.get("max_prompt_tokens") or (meta.get("hyperparameters") or {}).get("max_tokens")
    return int(value) if value else None


def prompt_budget(task: TaskSpec, field_name: str, max_model_len: int, adapter: Any = None) -> int:
    """The most tokens the field's prompt may take when served: the cut the adapter was trained
    with, within the model's length less room for the output (one code token; the entities
    JSON). The trainer cuts at its `max_tokens` and records it with the adapter, so a long
    ticket is cut the same way in both (past max_model_len the engine cannot follow)."""
    spec = task.field(field_name)
    room = entity_max_tokens(spec) if isinstance(spec, EntityFieldSpec) else 1
    trained = adapter_max_prompt_tokens(adapter)
    return max_model_len - room if trained is None else min(trained, max_model_len - room)


class Fitted(NamedTuple):
    ids: list[int]
    truncated: bool
    text: str  # the ticket as the prompt holds it (cut: "head … tail", normalised)


def fit_ticket(
    task: TaskSpec, field_name: str, text: str, style: PromptStyle, codes: LabelCodes | None,
    tokenizer: TokenizerLike, max_tokens: int,
) -> Fitted | None:
    """The field's prompt with the ticket cut (head + tail, by tokens) to fit `max_tokens`, or
    None when even an empty ticket does not fit. The engine and the trainer both call it with
    `prompt_budget`'s number, so a long ticket is cut identically in training and serving."""
    ids = prompt_ids(tokenizer, task, field_name, text, style, codes)
    if len(ids) <= max_tokens:
        return Fitted(ids, False, normalise_text(text))
    overhead = len(prompt_ids(tokenizer, task, field_name, "", style, codes))
    budget = max_tokens - overhead - 4  # the joiner and re-tokenisation at the cut points
    body = encode_text(tokenizer, normalise_text(text))
    while budget > 0:
        cut = truncate_tokens(tokenizer, body, budget)
        ids = prompt_ids(tokenizer, task, field_name, cut, style, codes)
        if len(ids) <= max_tokens:
            return Fitted(ids, True, normalise_text(cut))
        budget -= max(1, len(ids) - max_tokens)
    return None


def fit_prompt(
    task: TaskSpec, field_name: str, text: str, style: PromptStyle, codes: LabelCodes | None,
    tokenizer: TokenizerLike, max_tokens: int,
) -> tuple[list[int], bool] | None:
    """`fit_ticket` as (ids, truncated)."""
    fitted = fit_ticket(task, field_name, text, style, codes, tokenizer, max_tokens)
    return None if fitted is None else (fitted.ids, fitted.truncated)


def stored_fingerprint(adapter: Any) -> str | None:
    """The prompt fingerprint an adapter's metadata records (None: none recorded)."""
    meta = getattr(adapter, "meta", None) or {}
    task_meta = meta.get("task") if isinstance(meta.get("task"), dict) else {}
    return task_meta.get("prompt_fingerprint")


def fingerprint_matches(adapter: Any, task: TaskSpec, codes: Sequence[LabelCodes]) -> bool:
    """Whether `adapter` was trained for the prompts this task renders with these codes."""
    style = adapter.prompt_style
    stored = stored_fingerprint(adapter)
    # Adapters trained before the fingerprint left teacher material out recorded the whole
    # task's hash: they keep loading while the task file is unchanged; after any edit of it
    # they need one re-distil (README, "Changing your task").
    return stored in (prompt_fingerprint(task, style, codes), legacy_prompt_fingerprint(task, style, codes))


def trained_for_same_prompt(adapter: Any, reference: Any, task: TaskSpec) -> bool:
    """`fingerprint_matches` without a tokenizer: judged against `reference`, an adapter just
    trained for `task` (its metadata records the task's fingerprint and codes today)."""
    if stored_fingerprint(adapter) == stored_fingerprint(reference):
        return True
    fields = ((getattr(reference, "meta", None) or {}).get("task") or {}).get("fields") or {}
    codes = [LabelCodes(name, tuple(f["labels"]), tuple(f["codes"]), tuple(f["token_ids"]))
             for name, f in fields.items()]
    return stored_fingerprint(adapter) == legacy_prompt_fingerprint(task, adapter.prompt_style, codes)


def check_adapter_servable(adapter: Any, task: TaskSpec, codes: dict[str, LabelCodes], max_lora_rank: int) -> None:
    """ValueError unless the adapter was trained for exactly this prompt (the student's view of
    the task, label codes, style: the fingerprint stored in its metadata) and fits the engine's
    LoRA rank."""
    from pathlib import Path

    if not fingerprint_matches(adapter, task, list(codes.values())):
        expected = prompt_fingerprint(task, adapter.prompt_style, list(codes.values()))
        raise ValueError(
            f"adapter {adapter.adapter_id} was trained for prompt fingerprint {stored_fingerprint(adapter)!r}; "
            f"this engine renders {expected!r} (task {task.name!r}: a field, label or input changed "
            f"since it was trained): refusing to serve it until `triage distill` trains one for this task")
    config = Path(adapter.path) / "adapter_config.json"
    rank = json.loads(config.read_text()).get("r", 0) if config.is_file() else 0
    if rank > max_lora_rank:
        raise ValueError(f"adapter {adapter.adapter_id} has LoRA rank {rank} > this engine's "
                         f"max_lora_rank {max_lora_rank}: refusing to load it")


def render_prompt(
    task: TaskSpec, field: str, text: str, style: PromptStyle, codes: LabelCodes | None
) -> str:
    """The prompt whose next token is the field's code (categorical) or the start of its JSON
    list (the entities field: `codes` is None), as text; `prompt_ids` is what the model reads."""
    return "".join(_prompt_parts(task, field, normalise_text(text), style, codes))


def _prompt_parts(
    task: TaskSpec, field: str, body: str, style: PromptStyle, codes: LabelCodes | None
) -> tuple[str, str, str]:
    """(template before, the text segment holding the ticket, template after): the chat
    markers are in the first and last, the middle one is text only."""
    if PromptStyle(style) is PromptStyle.compact:
        # No instructions: the adapter learnt the task. The field name keeps fields apart; the
        # entities prompt shares the ticket's prefix with the categorical ones (prefix cache).
        return "", COMPACT_TEMPLATE.format(body=body, field=field), ""
    spec = task.field(field)
    after = "<|im_end|>\n<|im_start|>assistant\n"
    if isinstance(spec, EntityFieldSpec):
        types = "\n".join(f"- {t.name}: {t.description}" for t in spec.entity_types)
        return (
            f"<|im_start|>system\n{task.instructions}\nField: {spec.name} ({spec.description}).\n"
            f"Reply with a JSON list of {{\"type\",\"text\"}} objects, each text copied exactly "
            f"from the message; [] when there is none.\nTypes:\n{types}<|im_end|>\n<|im_start|>",
            f"user\n{body}", after)
    assert codes is not None, f"categorical field {field!r} needs its label codes"
    table = "\n".join(f"{c} = {label}" for c, label in zip(codes.codes, codes.labels))
    # Shared prefix first (instructions + table), ticket last: maximises prefix-cache hits.
    return (
        f"<|im_start|>system\n{task.instructions}\nField: {spec.name} ({spec.description}).\n"
        f"Reply with the code of the best label, nothing else.\nCodes:\n{table}<|im_end|>\n<|im_start|>",
        f"user\n{body}", after)


def student_view(task: TaskSpec, style: PromptStyle) -> str:
    """The task as the student's prompts and label codes depend on it (JSON): the inputs shown
    before the ticket, each field's name and labels in order (an entities field: its type
    names), and what `render_prompt` shows in this style besides (instruct: the instructions
    and descriptions). Output limits (max_entities, max_span_chars) bound decoding, not what
    an adapter learnt: left out too."""
    instruct = PromptStyle(style) is PromptStyle.instruct
    fields: list[dict[str, Any]] = []
    for spec in task.fields:
        if isinstance(spec, EntityFieldSpec):
            types = [[t.name, t.description] if instruct else t.name for t in spec.entity_types]
            item: dict[str, Any] = {"name": spec.name, "entity_types": types}
        else:
            item = {"name": spec.name, "labels": list(spec.labels)}
        if instruct:
            item["description"] = spec.description
        fields.append(item)
    view: dict[str, Any] = {"inputs": [[i.name, i.shown_as] for i in task.inputs], "fields": fields}
    if instruct:
        view["instructions"] = task.instructions
    return json.dumps(view, separators=(",", ":"), ensure_ascii=False)


def prompt_fingerprint(task: TaskSpec, style: PromptStyle, codes: Sequence[LabelCodes]) -> str:
    """Hash of everything that shapes the student's prompts and codes: stored with adapters."""
    return _fingerprint("student-v2:" + student_view(task, style), task, style, codes)


def legacy_prompt_fingerprint(task: TaskSpec, style: PromptStyle, codes: Sequence[LabelCodes]) -> str:
    """The fingerprint adapters recorded before `student_view`: the whole task, teacher
    material included (`TaskSpec.fingerprint_json`). Only ever compared, never written."""
    return _fingerprint(task.fingerprint_json(), task, style, codes)


def _fingerprint(material: str, task: TaskSpec, style: PromptStyle, codes: Sequence[LabelCodes]) -> str:
    material += str(PromptStyle(style).value)
    if task.entity_field is not None:
        material += ENTITY_FORMAT  # how the entities are written is part of the prompt contract
    if PromptStyle(style) is PromptStyle.compact:
        material += COMPACT_TEMPLATE  # a new template is a new prompt: old adapters must not load
    material += "".join(f"{c.field}:{','.join(c.codes)}" for c in codes)
    return hashlib.sha256(material.encode()).hexdigest()[:16]
