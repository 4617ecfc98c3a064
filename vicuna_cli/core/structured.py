"""Structured output: OpenAI's `response_format` as a constraint on every sampled token.

    grammar = compile_response_format(response_format, tokenizer, vocab_size, stop_ids)  # cached
    params = SamplingParams(..., grammar=grammar)      # each request gets its own matcher
    # RequestSampler: scores = constraint.mask(scores) before temperature/top-p; accept(token);
    # the batch engine ends the request ("stop") once `constraint.complete`.

The grammar engine is xgrammar (vLLM's default), not hand-written: it compiles a JSON schema
against the vocabulary once into a pushdown automaton with precomputed token masks, so a decode
step costs one mask fill + apply (about 1 ms per token for SmolLM2's 49K vocabulary on this 2-core
CPU, against ~60+ ms for the model's step). It was chosen over llguidance and outlines-core
because it is what vLLM runs (one behaviour for the hf and vllm backends), it installs from a
wheel (its torch/transformers/triton requirements are met by the serve install; torch is never
touched), runs on CPU, and takes its vocabulary as raw token bytes, which both our tokenizers give
(`TokenPieces`). Importing it loads transformers (~1 s), so it is imported on the first
constrained request only.

`{"type": "json_object"}` is any JSON object (OpenAI: "a valid JSON object"); `json_schema` is
compiled in strict mode (no properties or items beyond the schema), as vLLM does.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import Any, Iterable

from .errors import VicunaError

RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")
# Blanks allowed in a row between JSON tokens: enough to indent, and a bound, because small models
# under a JSON grammar tend to loop on whitespace until max_tokens (llama.cpp's JSON grammar caps
# indentation at 20 too).
MAX_WHITESPACE = 20
MAX_CACHED_GRAMMARS = 64  # compiled grammars kept per vocabulary (a judge run uses 2)
INSTALL_HINT = "pip install 'vicuna-cli[serve]'  (or: pip install --no-deps xgrammar apache-tvm-ffi)"


class ResponseFormatError(VicunaError):
    """A response_format that cannot be honoured; `param` is OpenAI's error field."""

    param = "response_format"

    def __init__(self, message: str, hint: str = "see OpenAI's response_format: text, json_object or json_schema"):
        super().__init__(f"response_format: {message}", hint=hint)


def check_response_format(value: Any) -> dict[str, Any] | None:
    """Validate an OpenAI response_format (no grammar library needed); returns the JSON schema
    to enforce ({"type": "object"} for json_object), or None for plain text."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ResponseFormatError(f"must be an object with a 'type', got {type(value).__name__}")
    kind = value.get("type")
    if kind not in RESPONSE_FORMAT_TYPES:
        raise ResponseFormatError(f"type must be one of {', '.join(RESPONSE_FORMAT_TYPES)}; got {kind!r}")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise ResponseFormatError("type json_schema needs a 'json_schema' object with 'name' and 'schema'")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise ResponseFormatError("json_schema.name must be a non-empty string")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise ResponseFormatError("json_schema.schema must be a JSON Schema object")
    return schema


class StructuredOutputUnavailable(ResponseFormatError):
    """The grammar library is missing: the message itself says what to install (it reaches HTTP
    clients, which never see a hint)."""


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as exc:
        raise StructuredOutputUnavailable(
            f"json_object/json_schema need the optional package 'xgrammar', which is not installed ({exc}): "
            f"install it with {INSTALL_HINT}",
            hint=INSTALL_HINT,
        ) from exc
    return xgrammar


# ---------------------------------------------------------------------------------------------
# The vocabulary: token bytes for the grammar library, built once per tokenizer


def token_bytes(tokenizer: Any, vocab_size: int) -> list[bytes]:
    """Each id's raw bytes as it appears in generated text; b"" for special and unused ids, which
    xgrammar never allows (except the stop tokens it is given)."""
    from .generate import TokenPieces

    pieces = TokenPieces(tokenizer)
    special = _special_ids(tokenizer)
    size = min(len(tokenizer), vocab_size)
    return [b"" if i in special else bytes(pieces(i)[1]) for i in range(size)] + [b""] * (vocab_size - size)


def _special_ids(tokenizer: Any) -> set[int]:
    backend = getattr(tokenizer, "_tok", None) or getattr(tokenizer, "backend_tokenizer", None)
    ids: set[int] = set()
    if backend is not None:
        ids.update(i for i, token in backend.get_added_tokens_decoder().items() if token.special)
    ids.update(getattr(tokenizer, "all_special_ids", None) or ())
    return ids


class Vocabulary:
    """xgrammar's TokenizerInfo + GrammarCompiler for one (tokenizer, vocab size, stop ids), and the
    compiled grammars for it, by schema (a judge run sends one schema hundreds of times)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Iterable[int]):
        import numpy as np

        xgr = _xgrammar()
        raw = token_bytes(tokenizer, vocab_size)
        self.vocab_size = vocab_size
        self.stop_ids = sorted(set(stop_ids))
        if not self.stop_ids:
            raise VicunaError("structured output needs the model's end-of-sequence token id", hint="set eos_token_id in the model config")
        info = xgr.TokenizerInfo(raw, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=self.stop_ids)
        self.compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        # Tokens that carry content (not whitespace-only, not special): when the grammar allows
        # none of them any more, the value is complete (see Constraint.complete).
        content = np.array([bool(b.strip()) for b in raw] + [False] * (-vocab_size % 32), dtype=np.uint64)
        words = (content.reshape(-1, 32) << np.arange(32, dtype=np.uint64)).sum(axis=1)
        self.content_bits = words.astype(np.uint32).view(np.int32)
        self.grammars: OrderedDict[str, Grammar] = OrderedDict()  # least recently used first
        self.compiles = 0
        self._lock = threading.Lock()

    def grammar(self, schema: dict[str, Any], strict: bool) -> "Grammar":
        key = json.dumps([schema, strict], sort_keys=True)
        with self._lock:
            if key in self.grammars:
                self.grammars.move_to_end(key)
            else:
                try:
                    compiled = self.compiler.compile_json_schema(
                        json.dumps(schema), any_whitespace=True, max_whitespace_cnt=MAX_WHITESPACE, strict_mode=strict
                    )
                except Exception as exc:  # xgrammar raises RuntimeError/ValueError with the reason
                    lines = str(exc).strip().splitlines() or [type(exc).__name__]
                    reason = re.sub(r"^\[[\d:]+\]\s*\S+:\d+:\s*", "", lines[0])  # drop "[time] file.cc:line:"
                    raise ResponseFormatError(f"the JSON schema cannot be compiled: {reason}", hint="fix or simplify the schema") from None
                self.compiles += 1
                self.grammars[key] = Grammar(compiled, self)
                if len(self.grammars) > MAX_CACHED_GRAMMARS:  # clients that send a new schema each time
                    self.grammars.popitem(last=False)
            return self.grammars[key]


_vocabularies: dict[tuple[int, int, tuple[int, ...]], tuple[Any, Vocabulary]] = {}
_vocab_lock = threading.Lock()


def vocabulary(tokenizer: Any, vocab_size: int, stop_ids: Iterable[int]) -> Vocabulary:
    """The Vocabulary for this tokenizer object (built once: ~2 s for a 49K vocabulary here). The
    entry holds the tokenizer, so its id cannot be reused by another one while cached."""
    stops = tuple(sorted(set(stop_ids)))
    key = (id(tokenizer), vocab_size, stops)
    with _vocab_lock:
        entry = _vocabularies.get(key)
        if entry is None:
            entry = (tokenizer, Vocabulary(tokenizer, vocab_size, stops))
            _vocabularies[key] = entry
        return entry[1]


def compile_response_format(response_format: Any, tokenizer: Any, vocab_size: int, stop_ids: Iterable[int]) -> "Grammar | None":
    """response_format -> a shared compiled Grammar (None for text). Raises ResponseFormatError."""
    schema = check_response_format(response_format)
    if schema is None:
        return None
    strict = response_format["type"] == "json_schema"
    return vocabulary(tokenizer, vocab_size, stop_ids).grammar(schema, strict)


# ---------------------------------------------------------------------------------------------
# Per-request state


class Grammar:
    """A compiled response_format for one vocabulary; immutable, shared by its requests."""

    def __init__(self, compiled: Any, vocab: Vocabulary):
        self.compiled = compiled
        self.vocab = vocab

    def start(self) -> "Constraint":
        return Constraint(self)


class Constraint:
    """One request's position in the grammar: masks the logits, follows the chosen tokens."""

    def __init__(self, grammar: Grammar):
        xgr = _xgrammar()
        self.vocab = grammar.vocab
        self.matcher = xgr.GrammarMatcher(grammar.compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, self.vocab.vocab_size)
        self._apply = xgr.apply_token_bitmask_inplace
        self._filled = False
        self.complete = False

    def _fill(self) -> None:
        if not self._filled:
            self.matcher.fill_next_token_bitmask(self.bitmask)
            self._filled = True

    def mask(self, scores: Any) -> Any:
        """scores [1, vocab] float (a copy the caller owns) -> the same, disallowed tokens at -inf."""
        self._fill()
        self._apply(scores, self.bitmask.to(scores.device), vocab_size=self.vocab.vocab_size)
        if scores.shape[-1] > self.vocab.vocab_size:  # a padded lm_head: ids no tokenizer has
            scores[:, self.vocab.vocab_size :] = float("-inf")
        return scores

    def accept(self, token_id: int) -> None:
        if not self.matcher.accept_token(token_id):
            raise VicunaError(f"token {token_id} does not fit the response_format grammar", hint="this is a bug in structured output")
        self._filled = False
        if self.matcher.is_completed():
            # Complete once the value is closed and only whitespace (or the stop token) may follow:
            # a closed object ends here instead of letting the model pad it with blanks.
            import numpy as np

            self._fill()
            allowed = self.bitmask.numpy()[0]
            self.complete = not np.any(allowed & self.vocab.content_bits)
