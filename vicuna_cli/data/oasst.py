"""OpenAssistant (OASST1) message trees: conversations (one per path) and ranked-sibling pairs.

Two exports exist: the flat message table (one message a record: `message_id`, `parent_id`,
`message_tree_id`, `role` prompter|assistant, `text`, `lang`, `rank`, `deleted`, `review_result`,
`synthetic`) and the nested tree export (`{"message_tree_id", "prompt": {..., "replies": [...]}}`).
The table is streamed tree by tree: the official files hold each tree's messages together, so
only one tree is in memory. A tree id met again after its tree was closed cannot be joined to it
and its messages are counted as orphans, like messages whose parent is missing.

Records handed to the rest of the pipeline are `Raw`s whose value is either a conversation
(`{"id", "conversations", "lang"}`, ShareGPT turns), a tree (`{"oasst_tree": [messages]}`, for
the pair reader), or `{"oasst_skip": reason}` for a message that was left out, so every left-out
message is counted (or fails --strict) like a record of the wrong shape.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Iterator

from .formats import Raw

PATHS = ("best", "all")
_ROLES = {"prompter": "human", "assistant": "gpt"}


def is_message(value: Any) -> bool:
    return isinstance(value, dict) and "message_id" in value and "message_tree_id" in value and "role" in value


def is_tree(value: Any) -> bool:
    return isinstance(value, dict) and "message_tree_id" in value and isinstance(value.get("prompt"), dict)


def trees(raws: Iterable[Raw]) -> Iterator[tuple[Raw, list[dict[str, Any]]] | Raw]:
    """Each tree's messages with the Raw of its first record, or a skip Raw for what cannot be
    placed (a record that is not a message, a tree id that comes back after its tree closed)."""
    current: str | None = None
    first: Raw | None = None
    messages: list[dict[str, Any]] = []
    closed: set[str] = set()
    for raw in raws:
        value = raw.value
        if is_tree(value):
            yield raw, _flatten(value)
            continue
        if not is_message(value):
            yield _skip(raw, "not an OASST1 message (message_id, parent_id, message_tree_id, role, text)")
            continue
        tree = str(value["message_tree_id"])
        if tree != current:
            if first is not None:
                closed.add(current)  # type: ignore[arg-type]
                yield first, messages
            current, first, messages = tree, raw, []
        if tree in closed:
            yield _skip(raw, "orphan message (its tree appeared earlier in the file)")
            continue
        messages.append(value)
    if first is not None:
        yield first, messages


def _flatten(tree: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    stack = [(tree["prompt"], None)]
    while stack:
        node, parent = stack.pop()
        if not isinstance(node, dict):
            continue
        message = {k: v for k, v in node.items() if k != "replies"}
        message.setdefault("parent_id", parent)
        message.setdefault("message_tree_id", tree["message_tree_id"])
        out.append(message)
        stack.extend((reply, node.get("message_id")) for reply in reversed(node.get("replies") or []))
    return out


def _skip(raw: Raw, reason: str) -> Raw:
    return Raw(raw.source, raw.index, raw.line, {"oasst_skip": reason})


def _usable(message: dict[str, Any]) -> str | None:
    if message.get("deleted"):
        return "deleted message"
    if message.get("review_result") is False:
        return "message failed review"
    if message.get("synthetic"):
        return "synthetic message"
    if message.get("role") not in _ROLES or not isinstance(message.get("text"), str):
        return "message without role prompter|assistant and text"
    return None


class Tree:
    """One tree's usable messages as parent → children; the left-out ones with their reasons."""

    def __init__(self, messages: list[dict[str, Any]]):
        self.skipped: list[str] = []
        usable = {}
        for message in messages:
            why = _usable(message)
            if why:
                self.skipped.append(why)
            else:
                usable[message["message_id"]] = message
        self.children: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        self.roots: list[dict[str, Any]] = []
        for message in usable.values():
            parent = message.get("parent_id")
            if parent is None:
                self.roots.append(message)
            else:
                self.children[parent].append(message)
        reachable: set[Any] = set()
        stack = list(self.roots)
        while stack:
            node = stack.pop()
            reachable.add(node["message_id"])
            stack.extend(self.children.get(node["message_id"], []))
        self.skipped += ["orphan message (parent missing)"] * (len(usable) - len(reachable))

    def replies(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        """Replies best first: rank 0 is the best; unranked replies after the ranked ones."""
        return sorted(self.children.get(message["message_id"], []),
                      key=lambda m: (m.get("rank") is None, m.get("rank") or 0, str(m["message_id"])))

    def paths(self, mode: str) -> list[list[dict[str, Any]]]:
        found: list[list[dict[str, Any]]] = []
        stack = [[root] for root in self.roots]
        while stack:
            path = stack.pop()
            replies = self.replies(path[-1])
            if not replies:
                found.append(path)
                continue
            for reply in reversed(replies[:1] if mode == "best" else replies):
                stack.append(path + [reply])
        return found

    def ranked_pairs(self) -> Iterator[tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]]:
        """(prompt path, better reply, worse reply) for each pair of ranked assistant siblings."""
        stack = [[root] for root in self.roots]
        while stack:
            path = stack.pop()
            replies = self.replies(path[-1])
            ranked = [r for r in replies if r["role"] == "assistant" and r.get("rank") is not None]
            if path[-1]["role"] == "prompter":
                for i, better in enumerate(ranked):
                    for worse in ranked[i + 1:]:
                        if worse["rank"] > better["rank"]:
                            yield path, better, worse
            stack.extend(path + [reply] for reply in reversed(replies))


def turns(path: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"from": _ROLES[m["role"]], "value": m["text"]} for m in path]


def conversation_records(raws: Iterable[Raw], mode: str) -> Iterator[Raw]:
    """One Raw per conversation path (`best`: the best-ranked reply at every turn; `all`: every
    root-to-leaf path), plus one skip Raw per message left out."""
    for item in trees(raws):
        if isinstance(item, Raw):
            yield item
            continue
        raw, messages = item
        tree = Tree(messages)
        for reason in tree.skipped:
            yield _skip(raw, reason)
        for path in tree.paths(mode):
            yield Raw(raw.source, raw.index, raw.line, {
                "id": str(path[-1]["message_id"]), "conversations": turns(path),
                "lang": path[0].get("lang"), "tree_id": str(path[0]["message_tree_id"])})


def tree_records(raws: Iterable[Raw]) -> Iterator[Raw]:
    """One Raw per tree (`{"oasst_tree": messages}`), for the pair reader."""
    for item in trees(raws):
        if isinstance(item, Raw):
            yield item
        else:
            raw, messages = item
            yield Raw(raw.source, raw.index, raw.line, {"oasst_tree": messages})
