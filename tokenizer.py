"""Tokenizers on tiktoken: an HF byte-level BPE (Qwen2/Qwen3) converted, or a built-in byte-level one.

A byte-level BPE maps text to UTF-8 bytes, splits it with a pre-tokenizer regex, and merges
byte pairs by rank. HF's `tokenizer.json` writes bytes as printable unicode characters (the
GPT-2 byte-to-unicode table); tiktoken wants the raw bytes with a rank per token. In the Qwen
layout a token's id is its merge rank, so the conversion is a relabelling, checked on load.

The tokenizer is saved beside a checkpoint as an HF `tokenizer.json`, so a checkpoint
directory is self-contained and also readable by HF `tokenizers`. Paper §3
(special tokens, ChatML without a system prompt).
"""
from __future__ import annotations

import json
import os
import unicodedata
from pathlib import Path

import tiktoken

from blocks import MEMENTO_TOKENS, THINK_END, THINK_START

# The pre-tokenizer regex of Qwen2/Qwen3 (the same split as cl100k, single digits).
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

CHAT_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", THINK_START, THINK_END]
# The special tokens an assistant turn may carry back into a conversation (Tokenizer.chat_ids):
# what the model itself writes, never the turn tokens.
ASSISTANT_SPECIALS = frozenset([THINK_START, THINK_END, *MEMENTO_TOKENS])

# ChatML as a Hugging Face chat template: the messages as given, no default system prompt,
# and the opening of the assistant turn (the same text as Tokenizer.chat_prompt).
CHATML_TEMPLATE = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] "
                   "+ '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
                   "{%- endif %}")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


class Tokenizer:
    """Byte-level BPE tokenizer backed by a `tiktoken.Encoding`.

    Special (and HF "added") tokens written in text become their ids in `encode`, as HF
    tokenizers do, unless `special=False`: then the text is plain text, byte for byte. What a
    user or a data file writes (a problem, a prompt, a chat message) goes through the plain
    path (`prompt_ids`, `chat_ids`), so that only the template makes control tokens.
    Build with `from_file`, `from_dir` or `byte_level`.
    """

    def __init__(self, hf_json: dict, source: str = "tokenizer.json", config: dict | None = None):
        self.source = source
        self.hf_json = hf_json
        self.config = dict(config or {})  # tokenizer_config.json, carried over on save
        model = hf_json.get("model") or {}
        if model.get("type") != "BPE" or "vocab" not in model:
            raise ValueError(f"{source}: not a BPE tokenizer (model.type={model.get('type')!r}); "
                             "only byte-level BPE (Qwen2/Qwen3 layout) is supported")
        self.pattern = _pre_tokenizer_pattern(hf_json.get("pre_tokenizer"), source)
        self.nfc = (hf_json.get("normalizer") or {}).get("type") == "NFC"
        b2u = bytes_to_unicode()
        u2b = {c: b for b, c in b2u.items()}
        added = {t["id"] for t in hf_json.get("added_tokens", [])}
        ranks: dict[bytes, int] = {}
        for tok, idx in model["vocab"].items():
            if idx in added:  # trainers may list special tokens in the vocab too; they are not merged
                continue
            try:
                ranks[bytes(u2b[c] for c in tok)] = idx
            except KeyError:
                raise ValueError(f"{source}: vocab entry {tok!r} is not in byte-to-unicode form; "
                                 "only byte-level BPE tokenizers are supported") from None
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise ValueError(f"{source}: vocabulary lacks {len(missing)} of the 256 single bytes; not a byte-level BPE")
        _check_merge_order(model.get("merges") or [], model["vocab"], source)
        self.special_ids = {t["content"]: t["id"] for t in hf_json.get("added_tokens", [])}
        self.ranks = ranks
        self._build()

    def _build(self):
        self.enc = tiktoken.Encoding(name=f"memento:{self.source}", pat_str=self.pattern,
                                     mergeable_ranks=self.ranks, special_tokens=self.special_ids)
        self.id_to_special = {i: t for t, i in self.special_ids.items()}

    # ------------------------------------------------------------------------- construction

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load an HF `tokenizer.json` (byte-level BPE). Raises ValueError if it is not one."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls(data, source=str(path))

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load the tokenizer.json (and tokenizer_config.json, if any) saved beside a checkpoint.

        Raises FileNotFoundError if tokenizer.json is absent, ValueError if a file is not
        valid JSON or not a byte-level BPE."""
        f = Path(path) / "tokenizer.json"
        if not f.exists():
            raise FileNotFoundError(f"{path}: no tokenizer.json beside the checkpoint")
        tok = cls.from_file(f)
        cfg = Path(path) / "tokenizer_config.json"
        if cfg.exists():
            try:
                tok.config = json.loads(cfg.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{cfg}: not valid JSON ({e.msg})") from None
        return tok

    @classmethod
    def byte_level(cls) -> "Tokenizer":
        """The embedded default: 256 byte tokens (ids 0-255), no merges, then the chat
        tokens (<|endoftext|>, <|im_start|>, <|im_end|>, <think>, </think>) and the four
        memento tokens, ids 256-264."""
        b2u = bytes_to_unicode()
        specials = CHAT_TOKENS + list(MEMENTO_TOKENS)
        data = {
            "version": "1.0",
            "added_tokens": [_added(t, 256 + i) for i, t in enumerate(specials)],
            "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "vocab": {b2u[b]: b for b in range(256)}, "merges": []},
        }
        return cls(data, source="byte-level")

    def add_special_tokens(self, tokens: list[str]) -> dict[str, int]:
        """Register tokens as special; existing ones keep their ids, new ones get the next
        free ids after every id in use. Returns {token: id} for all `tokens`."""
        for t in tokens:
            if t not in self.special_ids:
                self.special_ids[t] = self.n_vocab
                self.hf_json.setdefault("added_tokens", []).append(_added(t, self.special_ids[t]))
        self._build()
        return {t: self.special_ids[t] for t in tokens}

    def save(self, out_dir: str | os.PathLike, eos_token: str | None = None) -> None:
        """Write tokenizer.json and tokenizer_config.json into out_dir (each temp file + rename).

        tokenizer_config.json keeps what was loaded (a Qwen3 chat template, say) and states
        every special token (the memento tokens included) in added_tokens_decoder, the eos
        token (`eos_token`, e.g. the one config.json names; else the loaded one, else
        <|im_end|>), <|endoftext|> as padding, and the ChatML template when none was loaded,
        so that transformers' AutoTokenizer and apply_chat_template agree with this class
        (paper §3: ChatML, no system prompt). Raises KeyError for an eos_token that is not a
        special token.
        """
        out = Path(out_dir)
        cfg = dict(self.config)
        cfg["added_tokens_decoder"] = {str(t["id"]): {k: v for k, v in t.items() if k != "id"}
                                       for t in sorted(self.hf_json.get("added_tokens", []), key=lambda t: t["id"])}
        eos = eos_token or cfg.get("eos_token") or "<|im_end|>"
        self.token_id(eos if isinstance(eos, str) else eos.get("content"))
        cfg["eos_token"] = eos
        if "<|endoftext|>" in self.special_ids:
            cfg.setdefault("pad_token", "<|endoftext|>")
        cfg.setdefault("bos_token", None)
        cfg.setdefault("chat_template", CHATML_TEMPLATE)
        cfg.setdefault("tokenizer_class", "Qwen2Tokenizer")
        cfg.setdefault("clean_up_tokenization_spaces", False)
        cfg.setdefault("split_special_tokens", False)
        for name, obj in (("tokenizer.json", self.hf_json), ("tokenizer_config.json", cfg)):
            tmp = out / f".{name}.tmp"
            tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=None if name == "tokenizer.json" else 2),
                           encoding="utf-8")
            os.replace(tmp, out / name)

    # ------------------------------------------------------------------------- use

    @property
    def n_vocab(self) -> int:
        """One more than the largest id in use (the embedding needs at least this many rows)."""
        return max(max(self.ranks.values()), max(self.special_ids.values(), default=-1)) + 1

    def encode(self, text: str, special: bool | frozenset[str] = True) -> list[int]:
        """Token ids of `text` (a str; paper §3 format).

        special: True, every special token written in the text becomes its id (a trace, a
        template); False, none does: "<|im_end|>" in the text is the bytes of those nine
        characters, as any other text (what a user or a data file wrote); a set of special
        token strings: only those become ids. Raises nothing for any str."""
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        if special is True:
            return self.enc.encode(text, allowed_special="all")
        allowed = set(special) if special else set()
        return self.enc.encode(text, allowed_special=allowed, disallowed_special=())

    def decode(self, ids) -> str:
        """Text of `ids` (invalid UTF-8 from a cut multi-byte character becomes U+FFFD)."""
        return self.enc.decode(list(ids), errors="replace")

    def decode_bytes(self, ids) -> bytes:
        """Raw bytes of `ids`, for streaming output that may split a character."""
        return self.enc.decode_bytes(list(ids))

    def token_id(self, name: str) -> int:
        """Id of a special token by its text. Raises KeyError naming the token if unknown."""
        try:
            return self.special_ids[name]
        except KeyError:
            raise KeyError(f"tokenizer has no special token {name!r}; "
                           "add the memento tokens with checkpoint.add_memento_tokens") from None

    def chat_prompt(self, problem: str) -> str:
        """ChatML for one user turn, no system prompt, opening the assistant turn (§2), as text.
        To tokenize a prompt use `prompt_ids`, which keeps the problem's text plain."""
        return f"<|im_start|>user\n{problem}<|im_end|>\n<|im_start|>assistant\n"

    def prompt_ids(self, problem: str) -> list[int]:
        """The ids of chat_prompt(problem) (paper §3: ChatML, no system prompt), the problem
        tokenized as plain text: a control token written in it (ChatML, memento, <think>) stays
        text and can neither close the user turn nor open a block. Equals
        encode(chat_prompt(problem)) for a problem without special tokens. Raises nothing."""
        return self.chat_ids([("user", problem)])

    def chat_ids(self, messages: list[tuple[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """ChatML ids of (role, content) turns, `<|im_start|>role\ncontent<|im_end|>\n` each,
        then the assistant turn opened (paper §3). The turn tokens come only from this
        template. Role and content are plain text (`encode(special=False)`), except that an
        assistant turn's content keeps the reasoning and memento tokens it was generated with
        (<think>, </think> and the four block/summary tokens): a conversation sent back
        reads as the model wrote it, and no turn can forge a turn boundary. Raises KeyError
        if the tokenizer lacks <|im_start|> or <|im_end|>."""
        start, end = self.token_id("<|im_start|>"), self.token_id("<|im_end|>")
        newline = self.encode("\n", special=False)
        own = ASSISTANT_SPECIALS & self.special_ids.keys()
        out = []
        for role, content in messages:
            # role and content as one piece, as encode(chat_prompt(...)) splits them
            out += [start, *self.encode(f"{role}\n{content}", special=own if role == "assistant" else False), end, *newline]
        if add_generation_prompt:
            out += [start, *self.encode("assistant\n", special=False)]
        return out


def _added(content: str, idx: int) -> dict:
    return {"id": idx, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def _pre_tokenizer_pattern(pre: dict | None, source: str) -> str:
    """The split regex of an HF byte-level pre-tokenizer (Qwen: Split + ByteLevel(use_regex=False))."""
    if not pre:
        raise ValueError(f"{source}: no pre_tokenizer; expected a byte-level one")
    parts = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    pattern, byte_level = None, False
    for p in parts:
        if p.get("type") == "Split":
            pattern = p["pattern"].get("Regex") or p["pattern"].get("String")
        elif p.get("type") == "ByteLevel":
            byte_level = True
            if p.get("use_regex", True):
                pattern = pattern or GPT2_PATTERN
            if p.get("add_prefix_space"):
                raise ValueError(f"{source}: ByteLevel add_prefix_space=True is not supported")
    if not byte_level:
        raise ValueError(f"{source}: pre_tokenizer has no ByteLevel step; only byte-level BPE is supported")
    if pattern is None:
        raise ValueError(f"{source}: byte-level pre_tokenizer has no split regex")
    return pattern


def _check_merge_order(merges: list, vocab: dict[str, int], source: str) -> None:
    """tiktoken merges by the rank of the merged token; HF by merge index. They agree when
    each merge's result has a larger id than any earlier merge's (true for Qwen layouts)."""
    last = -1
    for i, m in enumerate(merges):
        a, b = m.split(" ") if isinstance(m, str) else m
        idx = vocab.get(a + b)
        if idx is None or idx <= last:
            raise ValueError(f"{source}: merge {i} ({a!r}, {b!r}) is out of id order; "
                             "this BPE cannot be converted to tiktoken ranks")
        last = idx
